"""Road-network benchmark: cold load, cached reload, peak RSS and spatial-query rate per map.

Run: ``python -m bench.network [--runs 5] [--maps ...] [--peer]``

Each measurement runs in a fresh subprocess pinned to core 0 (``taskset -c 0`` when available),
so load time and peak RSS are those of a whole process. The osmnx peer (``--peer``) builds a
simplified drive graph from the same map (converted to OSM XML, the only format osmnx reads)
in the same run, for a side-by-side ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAPS = REPO.parent / "shared" / "data" / "maps"
DEFAULT_MAPS = [
    "helsinki-2019.osm.pbf", "kotka-karhula.osm.pbf", "monaco-2021.osm.pbf", "andorra-2021.osm.pbf",
    "liechtenstein-2024.osm.pbf", "kaiserslautern-2013.osm.gz", "baltimore-2015.osm.pbf", "harrisburg-2015.osm.pbf",
]

_COLD = """
import json, resource, sys, time
t0 = time.perf_counter()
from geo.network import load_network
net = load_network(sys.argv[1], cache=sys.argv[2] if len(sys.argv) > 2 else False)
dt = time.perf_counter() - t0
print(json.dumps({"s": dt, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "segments": net.n_segments}))
"""

_QUERY = """
import json, sys, time
import numpy as np
from geo.network import load_network
net = load_network(sys.argv[1], cache=sys.argv[2])
rng = np.random.default_rng(20261128)
n = 200_000
# GPS-like points: random road vertices plus 10 m Gaussian noise, queried in trace-like batches.
pts = net.geom_xy[rng.integers(0, len(net.geom_xy), n)] + rng.normal(0, 10.0, (n, 2))
net.nearby_segments(pts[:1000], 50.0)
t0 = time.perf_counter()
res = net.nearby_segments(pts, 50.0)
dt = time.perf_counter() - t0
print(json.dumps({"pts_per_s": n / dt, "pairs_per_point": len(res.point) / n}))
"""

_OSMNX = """
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
t0 = time.perf_counter()
import osmnx as ox
g = ox.graph_from_xml(sys.argv[1], simplify=True, retain_all=True)
dt = time.perf_counter() - t0
print(json.dumps({"s": dt, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "edges": g.number_of_edges()}))
"""


def _run(code: str, *args: str) -> dict:
    cmd = [sys.executable, "-c", code, *args]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _drive_xml(src: Path, dest: Path) -> None:
    """Drivable ways and their nodes as OSM XML, for osmnx (which reads XML only)."""
    import osmium

    from geo.roads import is_drivable

    ways = []
    needed: set[int] = set()
    for w in osmium.FileProcessor(str(src), osmium.osm.WAY):
        tags = dict(w.tags)
        if is_drivable(tags):
            refs = [n.ref for n in w.nodes]
            ways.append((w.id, refs, tags))
            needed.update(refs)
    from xml.sax.saxutils import quoteattr

    with open(dest, "w", encoding="utf-8") as fh:
        fh.write('<?xml version="1.0" encoding="UTF-8"?>\n<osm version="0.6">\n')
        for n in osmium.FileProcessor(str(src), osmium.osm.NODE):
            if n.id in needed and n.location.valid():
                fh.write(f'<node id="{n.id}" lat="{n.location.lat}" lon="{n.location.lon}"/>\n')
                needed.discard(n.id)
        for wid, refs, tags in ways:
            refs = [r for r in refs if r not in needed]  # drop nodes missing from a clipped extract
            if len(refs) < 2:
                continue
            fh.write(f'<way id="{wid}">')
            fh.write("".join(f'<nd ref="{r}"/>' for r in refs))
            fh.write("".join(f"<tag k={quoteattr(k)} v={quoteattr(v)}/>" for k, v in tags.items()))
            fh.write("</way>\n")
        fh.write("</osm>\n")


def _stats(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--maps", nargs="*", default=DEFAULT_MAPS)
    ap.add_argument("--peer", action="store_true", help="also time osmnx.graph_from_xml on the same maps")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.maps:
            path = MAPS / name
            if not path.is_file():
                print(f"skip {name}: not found", file=sys.stderr)
                continue
            cache_dir = Path(tmp) / "cache"
            _run(_COLD, str(path))  # warm-up (page cache, imports)
            cold = [_run(_COLD, str(path)) for _ in range(args.runs)]
            _run(_COLD, str(path), str(cache_dir))  # writes the cache
            cached = [_run(_COLD, str(path), str(cache_dir)) for _ in range(args.runs)]
            query = [_run(_QUERY, str(path), str(cache_dir)) for _ in range(args.runs)]
            row = {
                "map": name,
                "segments": cold[0]["segments"],
                "cold_s": _stats([r["s"] for r in cold]),
                "cold_rss_mb": f"{statistics.median(r['rss_mb'] for r in cold):.0f}",
                "cached_s": _stats([r["s"] for r in cached]),
                "query_kpts_s": f"{statistics.median(r['pts_per_s'] for r in query) / 1000:.0f}",
                "pairs_per_pt": f"{query[0]['pairs_per_point']:.1f}",
            }
            if args.peer:
                xml = Path(tmp) / (name.split(".")[0] + ".osm")
                _drive_xml(path, xml)
                peer = [_run(_OSMNX, str(xml)) for _ in range(max(1, min(args.runs, 3)))]
                peer_s = statistics.median(r["s"] for r in peer)
                ours = statistics.median(r["s"] for r in cold)
                row["osmnx_s"] = f"{peer_s:.2f}"
                row["osmnx_rss_mb"] = f"{statistics.median(r['rss_mb'] for r in peer):.0f}"
                row["ratio"] = f"{peer_s / ours:.1f}×"
            rows.append(row)
            print(json.dumps(row), flush=True)
    cols = list(rows[0].keys()) if rows else []
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
