"""Ping files: read and write CSV / JSONL (optionally gzipped), read GPX.

One reader for every command (``match``, ``replay``, ``evaluate``...): :func:`read_pings` yields
valid :class:`~geo.model.Ping` s and reports every bad row through :class:`ReadReport` with a
reason from :data:`geo.pings.REJECT_REASONS` — nothing is dropped silently.

Columns (CSV header / JSON keys) are those of DESIGN.md: ``device, ts, lat, lon`` and optionally
``accuracy_m, speed_mps, heading_deg``. A JSONL line may also be a batch
``{"device": ..., "pings": [{...}, ...]}``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from xml.etree import ElementTree

from geo.model import Ping
from geo.pings import PingRejected, parse_ping

PING_COLUMNS: tuple[str, ...] = ("device", "ts", "lat", "lon", "accuracy_m", "speed_mps", "heading_deg")


@dataclass
class ReadReport:
    """What a reader saw: rows read, pings accepted, rejections by reason (with line numbers)."""

    rows: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    examples: list[tuple[int, str]] = field(default_factory=list)
    #: GPX points without a ``<time>`` that got a synthetic one (see :func:`read_pings`).
    synthetic_times: int = 0

    def reject(self, line: int, exc: PingRejected) -> None:
        self.rejected[exc.reason] += 1
        if len(self.examples) < 20:
            self.examples.append((line, str(exc)))

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())


def open_text(path: str | os.PathLike[str], mode: str = "rt") -> IO[str]:
    """Open a text file, transparently gzipped when the name ends with ``.gz``.

    Gzip output carries no timestamp (``mtime=0``) and uses level 6, so the same content gives
    the same bytes (reproducible simulator output) and big files compress fast.
    """
    path = Path(path)
    if path.suffix == ".gz":
        if "w" in mode:
            return _GzipTextWriter(path)
        return gzip.open(path, mode, encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8", newline="" if "w" in mode else None)


class _GzipTextWriter(io.TextIOWrapper):
    """UTF-8 text into a reproducible gzip file (no mtime in the header)."""

    def __init__(self, path: Path) -> None:
        self._raw_file = open(path, "wb")
        gz = gzip.GzipFile(filename=path.name, mode="wb", fileobj=self._raw_file, compresslevel=6, mtime=0)
        super().__init__(gz, encoding="utf-8", newline="")

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw_file.close()  # GzipFile leaves a fileobj it was given open


def detect_format(path: str | os.PathLike[str]) -> str:
    """``csv``, ``jsonl``, ``gpx`` or ``fcd`` from the file name (``.gz`` ignored)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, fmt in ((".csv", "csv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"),
                        (".gpx", "gpx"), (".fcd.xml", "fcd"), (".xml", "fcd")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"{path}: unknown ping file format; use .csv, .jsonl, .gpx or SUMO FCD .xml (optionally .gz)")


def read_pings(
    path: str | os.PathLike[str],
    report: ReadReport | None = None,
    *,
    fmt: str | None = None,
    device: str | None = None,
) -> Iterator[Ping]:
    """Yield the valid pings of a file, in file order.

    Parameters
    ----------
    path
        CSV, JSONL, GPX (each optionally ``.gz``) or SUMO FCD XML.
    report
        Filled with counts and rejection reasons as the file is read.
    fmt
        Force a format instead of guessing from the name.
    device
        Device id for formats without one (GPX: default is the file's stem).

    Raises
    ------
    ValueError
        Unknown format, or a file that is not of its format at all (no CSV header, not XML).
    """
    report = report if report is not None else ReadReport()
    fmt = fmt or detect_format(path)
    if fmt == "csv":
        yield from _read_csv(path, report)
    elif fmt == "jsonl":
        yield from _read_jsonl(path, report)
    elif fmt == "gpx":
        yield from _read_gpx(path, report, device or Path(path).name.split(".")[0])
    elif fmt == "fcd":
        from simulator.sumo import read_fcd  # SUMO floating-car data lives with the SUMO tooling

        yield from read_fcd(path, report)
    else:
        raise ValueError(f"unknown ping format {fmt!r}")


def _accept(raw: Any, line: int, report: ReadReport, device: str | None = None) -> Ping | None:
    report.rows += 1
    try:
        ping = parse_ping(raw, device=device)
    except PingRejected as exc:
        report.reject(line, exc)
        return None
    report.accepted += 1
    return ping


def _read_csv(path: str | os.PathLike[str], report: ReadReport) -> Iterator[Ping]:
    with open_text(path) as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = {"ts", "lat", "lon"} - set(header)
        if missing:
            raise ValueError(f"{path}: CSV header lacks {sorted(missing)} (need device, ts, lat, lon)")
        for row in reader:
            if None in row:  # more cells than header columns
                report.rows += 1
                report.reject(reader.line_num, PingRejected("bad_type", "row has more cells than the header"))
                continue
            ping = _accept(row, reader.line_num, report)
            if ping is not None:
                yield ping


def _read_jsonl(path: str | os.PathLike[str], report: ReadReport) -> Iterator[Ping]:
    with open_text(path) as fh:
        for n, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                report.rows += 1
                report.reject(n, PingRejected("malformed_json", "line is not valid JSON"))
                continue
            if isinstance(obj, dict) and isinstance(obj.get("pings"), list):
                if not obj["pings"]:
                    report.rows += 1
                    report.reject(n, PingRejected("empty_batch", "batch has no pings"))
                for raw in obj["pings"]:
                    ping = _accept(raw, n, report, device=obj.get("device"))
                    if ping is not None:
                        yield ping
            else:
                ping = _accept(obj, n, report)
                if ping is not None:
                    yield ping


def _read_gpx(path: str | os.PathLike[str], report: ReadReport, device: str) -> Iterator[Ping]:
    with open_text(path) as fh:
        try:
            root = ElementTree.parse(fh).getroot()
        except ElementTree.ParseError as exc:
            raise ValueError(f"{path}: not a GPX file ({exc})") from None
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    last: Ping | None = None
    for n, pt in enumerate(root.iter(f"{ns}trkpt"), start=1):
        time_el = pt.find(f"{ns}time")
        raw: dict[str, Any] = {"device": device, "lat": pt.get("lat"), "lon": pt.get("lon"),
                               "ts": time_el.text if time_el is not None else None}
        if raw["ts"] is None:
            # Untimed GPX (hand-drawn routes, some test traces): space the points as if driven
            # at UNTIMED_GPX_SPEED_MPS, so speed plausibility checks still mean something.
            raw["ts"] = _synthetic_time(last, raw)
            report.synthetic_times += 1
        ping = _accept(raw, n, report)
        if ping is not None:
            last = ping
            yield ping


#: Assumed speed for GPX points without timestamps, m/s (50 km/h).
UNTIMED_GPX_SPEED_MPS = 13.9
_UNTIMED_EPOCH_S = 946_684_800.0  # 2000-01-01T00:00:00Z


def _synthetic_time(last: Ping | None, raw: dict[str, Any]) -> float:
    if last is None:
        return _UNTIMED_EPOCH_S
    try:
        lat, lon = float(raw["lat"]), float(raw["lon"])
    except (TypeError, ValueError):
        return last.ts + 1.0
    dy = (lat - last.lat) * 111_320.0
    dx = (lon - last.lon) * 111_320.0 * math.cos(math.radians(lat))
    return last.ts + max(1.0, math.hypot(dx, dy) / UNTIMED_GPX_SPEED_MPS)


def write_pings(path: str | os.PathLike[str], pings: Iterable[Ping], fmt: str | None = None) -> int:
    """Write pings as CSV or JSONL (gzipped when the name ends with ``.gz``); returns the count."""
    fmt = fmt or detect_format(path)
    n = 0
    with open_text(path, "wt") as fh:
        if fmt == "csv":
            writer = csv.writer(fh)
            writer.writerow(PING_COLUMNS)
            for p in pings:
                writer.writerow(_csv_row(p))
                n += 1
        elif fmt == "jsonl":
            for p in pings:
                fh.write(json.dumps(p.to_dict(), separators=(",", ":")) + "\n")
                n += 1
        else:
            raise ValueError(f"cannot write pings as {fmt!r}; use .csv or .jsonl")
    return n


def write_ping_batches(
    path: str | os.PathLike[str],
    batches: Iterable[tuple[str, Sequence[Ping]]],
    fmt: str | None = None,
) -> int:
    """Write uploads ``(device, pings)`` in order; returns the number of pings written.

    CSV has one row per ping (batches follow each other, so a device's rows of one upload are
    adjacent); JSONL has one ``{"device": ..., "pings": [...]}`` batch per line, the Kafka
    message payload. Both read back with :func:`read_pings`.
    """
    fmt = fmt or detect_format(path)
    n = 0
    with open_text(path, "wt") as fh:
        if fmt == "csv":
            writer = csv.writer(fh)
            writer.writerow(PING_COLUMNS)
            for _, pings in batches:
                writer.writerows(_csv_row(p) for p in pings)
                n += len(pings)
        elif fmt == "jsonl":
            for device, pings in batches:
                fh.write(batch_to_json(device, pings) + "\n")
                n += len(pings)
        else:
            raise ValueError(f"cannot write pings as {fmt!r}; use .csv or .jsonl")
    return n


def batch_to_json(device: str, pings: Sequence[Ping]) -> str:
    """One upload as the JSON wire form ``{"device": ..., "pings": [{"ts":..,"lat":..,...}]}``
    (the device id is given once, not per ping)."""
    items = []
    for p in pings:
        d = p.to_dict()
        del d["device"]
        items.append(d)
    return json.dumps({"device": device, "pings": items}, separators=(",", ":"))


def _csv_row(p: Ping) -> list[str]:
    """One ping as CSV cells in :data:`PING_COLUMNS` order."""
    return [p.device, _num(p.ts), _num(p.lat), _num(p.lon), _num(p.accuracy_m), _num(p.speed_mps), _num(p.heading_deg)]


def _num(v: float | None) -> str:
    if v is None:
        return ""
    return repr(round(v, 7)) if isinstance(v, float) else str(v)


def pings_to_jsonl_bytes(pings: Iterable[Ping]) -> bytes:
    """Pings as JSONL bytes (for tests and in-memory replays)."""
    buf = io.StringIO()
    for p in pings:
        buf.write(json.dumps(p.to_dict(), separators=(",", ":")) + "\n")
    return buf.getvalue().encode()
