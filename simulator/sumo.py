"""Eclipse SUMO as an independent source of probes and ground truth.

:func:`read_fcd` reads SUMO floating-car data (``sumo --fcd-output FILE --fcd-output.geo true``)
as pings; :func:`formats.read_pings` uses it for ``.xml`` files. :func:`run_sumo` (needs the
optional ``[sumo]`` extra: ``pip install 'roadpulse[sumo]'``) runs SUMO on an OSM map:
netconvert -> randomTrips -> sumo, writing FCD probes and per-edge ``edgeData`` ground truth,
following ``../shared/notes/geo/sumo_pipeline.sh``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

from geo.model import Ping
from geo.pings import PingRejected
from simulator.config import day_epoch
from simulator.formats import ReadReport, _accept, open_text

#: SUMO's simulation second 0 is placed at this epoch time unless told otherwise: the
#: simulator's default date, so SUMO and roadpulse days line up.
DEFAULT_FCD_EPOCH_S = day_epoch("2024-05-14")


def read_fcd(
    path: str | os.PathLike[str], report: ReadReport | None = None, *, begin_epoch_s: float = DEFAULT_FCD_EPOCH_S
) -> Iterator[Ping]:
    """Yield pings from a SUMO FCD XML file written with ``--fcd-output.geo true``.

    Each ``<vehicle>`` of each ``<timestep time=...>`` is one ping: ``id`` -> device, ``x`` ->
    lon, ``y`` -> lat, ``speed`` -> speed_mps, ``angle`` -> heading_deg (SUMO measures it
    clockwise from north, as pings do). Persons and containers are skipped. Times are SUMO
    seconds, placed on the epoch axis at ``begin_epoch_s``. A file without ``.geo`` has metric
    x/y; those rows are rejected (``lat_out_of_range``/``lon_out_of_range``), counted in ``report``.

    Raises
    ------
    ValueError
        The file is not XML or not an ``fcd-export``.
    """
    report = report if report is not None else ReadReport()
    with open_text(path) as fh:
        time_s: str | None = None
        root_seen = False
        try:
            for event, el in ElementTree.iterparse(fh, events=("start", "end")):
                if event == "start":
                    if not root_seen:
                        root_seen = True
                        if el.tag != "fcd-export":
                            raise ValueError(f"{path}: not a SUMO FCD file (root <{el.tag}>, expected <fcd-export>)")
                    elif el.tag == "timestep":
                        time_s = el.get("time")
                    continue
                if el.tag == "vehicle":
                    a = el.attrib
                    raw = {"device": a.get("id"), "lon": a.get("x"), "lat": a.get("y"),
                           "speed_mps": a.get("speed"), "heading_deg": a.get("angle")}
                    raw["ts"] = _fcd_time(time_s, begin_epoch_s)
                    line = getattr(el, "sourceline", report.rows + 1)
                    ping = _accept(raw, line, report)
                    if ping is not None:
                        yield ping
                    el.clear()
                elif el.tag == "timestep":
                    el.clear()
        except ElementTree.ParseError as exc:
            if not root_seen:
                raise ValueError(f"{path}: not an XML file ({exc})") from None
            report.rows += 1
            report.reject(report.rows, PingRejected("bad_type", f"XML broken after {report.rows - 1} rows"))


def _fcd_time(time_s: str | None, begin_epoch_s: float) -> float | None:
    if time_s is None:
        return None
    try:
        return begin_epoch_s + float(time_s)
    except ValueError:
        return None  # rejected as missing_field by the validator


# ----------------------------------------------------------------------------- running SUMO
def sumo_home() -> Path:
    """SUMO_HOME of the ``eclipse-sumo`` wheel (the ``[sumo]`` extra)."""
    try:
        import sumo  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeError("Eclipse SUMO is not installed; pip install 'roadpulse[sumo]' (about 770 MB)") from None
    return Path(sumo.SUMO_HOME)


def run_sumo(
    osm_xml: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    hours: float = 1.0,
    insertion_rate_vph: float = 1500.0,
    probe_share: float = 0.05,
    interval_s: float = 5.0,
    window_s: int = 300,
    seed: int = 42,
) -> dict[str, Path]:
    """Run SUMO on an OSM XML map: random demand, FCD probes and per-edge ground truth.

    Parameters
    ----------
    osm_xml
        ``.osm`` / ``.osm.gz`` XML (netconvert does not read ``.pbf``; convert first, e.g. with
        ``osmium cat map.osm.pbf -o map.osm``).
    hours
        Simulated time, hours.
    insertion_rate_vph
        Vehicles inserted per hour (randomTrips).
    probe_share
        Share of vehicles reporting FCD (``--device.fcd.probability``).
    interval_s
        FCD period, seconds.
    window_s
        Ground truth interval (edgeData period), seconds.

    Returns
    -------
    dict
        ``net``, ``routes``, ``fcd`` (read with :func:`read_fcd`), ``edgedata`` paths.
    """
    home = sumo_home()
    bin_dir = home / "bin"
    env = dict(os.environ, SUMO_HOME=str(home), PROJ_LIB=str(home / "data" / "proj"))
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    osm = Path(osm_xml).resolve()
    end = int(hours * 3600)
    paths = {"net": out / "net.net.xml.gz", "routes": out / "routes.rou.xml", "fcd": out / "fcd.xml.gz",
             "edgedata": out / "edgedata.xml"}

    def sh(*cmd: str, log: str) -> None:
        with open(out / log, "w") as fh:
            done = subprocess.run(list(cmd), cwd=out, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if done.returncode:
            raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {done.returncode}); see {out / log}")

    exe = lambda name: str(bin_dir / name) if (bin_dir / name).exists() else (shutil.which(name) or name)  # noqa: E731
    sh(exe("netconvert"), "--osm-files", str(osm), "-o", str(paths["net"]), "--geometry.remove",
       "--roundabouts.guess", "--ramps.guess", "--junctions.join", "--tls.guess-signals", "--tls.discard-simple",
       "--tls.join", "--keep-edges.by-vclass", "passenger", "--remove-edges.isolated", "--output.original-names",
       log="netconvert.log")
    sh(sys.executable, str(home / "tools" / "randomTrips.py"), "-n", str(paths["net"]), "-b", "0", "-e", str(end),
       "--insertion-rate", str(insertion_rate_vph), "--fringe-factor", "5", "--min-distance", "300",
       "--seed", str(seed), "--validate", "--vehicle-class", "passenger", "-o", str(out / "trips.xml"),
       "-r", str(paths["routes"]), log="randomTrips.log")
    (out / "gt.add.xml").write_text(
        f'<additional>\n  <edgeData id="gt" period="{window_s}" file="{paths["edgedata"].name}" '
        'excludeEmpty="true"/>\n</additional>\n')
    sh(exe("sumo"), "-n", str(paths["net"]), "-r", str(paths["routes"]), "-a", str(out / "gt.add.xml"),
       "--begin", "0", "--end", str(end), "--seed", str(seed), "--time-to-teleport", "300",
       "--fcd-output", str(paths["fcd"]), "--fcd-output.geo", "true",
       "--fcd-output.attributes", "id,x,y,speed,angle,lane",
       "--device.fcd.probability", str(probe_share), "--device.fcd.period", str(interval_s),
       "--no-step-log", "true", log="sumo.log")
    return paths
