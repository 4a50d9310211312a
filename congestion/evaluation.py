"""How right are the published speeds? Estimated segment speeds against the simulator's truth.

Inputs
------
- speeds: JSONL, one :class:`~congestion.record.SegmentSpeed` dict per line (the wire form).
- truth: the simulator's ``truth_segments.csv(.gz)`` with exactly the columns
  :data:`TRUTH_COLUMNS` (``simulator.truth.TRUTH_SEGMENT_COLUMNS``): per segment and *tumbling*
  window of ``window_s`` seconds starting at ``window_start`` (epoch s), the space-mean speed of
  all vehicles and how many vehicles / probe vehicles were there.

Matching
--------
A truth row matches the ``ok`` record of the same segment whose window is the same
``[window_start, window_start + window_s)``; only truth rows whose ``window_s`` equals the speeds'
window span are used (with the default 60 s step / 300 s span, every fifth sliding window lines
up with a 300 s truth window). When a segment-window was published more than once, the latest
``published_at`` wins.

Metrics (overall and per true-speed band :data:`SPEED_BANDS`)
--------------------------------------------------------------
- ``mae_kmh``, ``bias_kmh`` (estimate minus truth), ``rmse_kmh`` over matched pairs;
- ``coverage``: share of truth segment-windows with >= 1 probe vehicle that got a published speed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from congestion.record import SegmentSpeed

#: Columns of the simulator's ``truth_segments.csv.gz``, in order.
TRUTH_COLUMNS: tuple[str, ...] = (
    "segment_id", "window_start", "window_s", "speed_kmh", "travel_time_s", "vehicles", "probe_vehicles",
)
#: True-speed bands of the report, km/h, ``[lo, hi)``.
SPEED_BANDS: tuple[tuple[float, float], ...] = ((0.0, 30.0), (30.0, 50.0), (50.0, 80.0), (80.0, math.inf))


class EvaluationInputError(ValueError):
    """A speeds or truth file is missing, malformed, or does not fit the other."""


@dataclass(frozen=True)
class Truth:
    """The truth table as arrays (one row per segment and tumbling window)."""

    segment_id: np.ndarray
    window_start: np.ndarray
    window_s: np.ndarray
    speed_kmh: np.ndarray
    travel_time_s: np.ndarray
    vehicles: np.ndarray
    probe_vehicles: np.ndarray

    def __len__(self) -> int:
        return int(len(self.segment_id))


def _open_text(path: Path):
    import gzip

    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_truth(path: str | os.PathLike[str]) -> Truth:
    """Read ``truth_segments.csv(.gz)`` as written by the simulator.

    Raises
    ------
    EvaluationInputError
        Missing file, a header other than :data:`TRUTH_COLUMNS`, or a malformed row (the message
        names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"{path}: no such truth file")
    cols: list[list[str]] = [[] for _ in TRUTH_COLUMNS]
    try:
        with _open_text(path) as fh:
            header = fh.readline().strip()
            got = tuple(h.strip() for h in header.split(","))
            if got != TRUTH_COLUMNS:
                raise EvaluationInputError(
                    f"{path}: not a simulator truth_segments file: header is {','.join(got) or '(empty)'}; "
                    f"expected {','.join(TRUTH_COLUMNS)}"
                )
            for lineno, line in enumerate(fh, start=2):
                if not line.strip():
                    continue
                parts = line.rstrip("\r\n").split(",")
                if len(parts) != len(TRUTH_COLUMNS):
                    raise EvaluationInputError(
                        f"{path}:{lineno}: expected {len(TRUTH_COLUMNS)} values, got {len(parts)}"
                    )
                for c, v in zip(cols, parts):
                    c.append(v)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise EvaluationInputError(f"{path}: unreadable truth file ({exc})") from None
    try:
        ints = {name: np.asarray(c, dtype=np.float64) for name, c in zip(TRUTH_COLUMNS, cols)}
    except ValueError as exc:
        raise EvaluationInputError(f"{path}: a value is not a number ({exc})") from None
    if len(cols[0]) == 0:
        raise EvaluationInputError(f"{path}: the truth file has no rows")
    bad = ~np.isfinite(ints["speed_kmh"]) | (ints["window_s"] <= 0)
    if bad.any():
        raise EvaluationInputError(f"{path}:{int(np.flatnonzero(bad)[0]) + 2}: non-finite speed or window_s <= 0")
    return Truth(
        segment_id=np.asarray(cols[0], dtype=np.int64),
        window_start=ints["window_start"],
        window_s=ints["window_s"],
        speed_kmh=ints["speed_kmh"],
        travel_time_s=ints["travel_time_s"],
        vehicles=ints["vehicles"].astype(np.int64),
        probe_vehicles=ints["probe_vehicles"].astype(np.int64),
    )


def read_speeds(path: str | os.PathLike[str]) -> tuple[list[SegmentSpeed], list[str]]:
    """Read a JSONL file of SegmentSpeed dicts.

    Returns
    -------
    records, problems
        The parsed records and one message per malformed line (``"line 7: ..."``); malformed
        lines are reported, never silently skipped.

    Raises
    ------
    EvaluationInputError
        Missing/unreadable file, or not a single valid record in it.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"{path}: no such speeds file")
    records: list[SegmentSpeed] = []
    problems: list[str] = []
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(SegmentSpeed.from_dict(json.loads(line)))
                except (ValueError, TypeError) as exc:
                    problems.append(f"line {lineno}: {exc}")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise EvaluationInputError(f"{path}: unreadable speeds file ({exc})") from None
    if not records:
        first = f" (first problem: {problems[0]})" if problems else ""
        raise EvaluationInputError(f"{path}: no SegmentSpeed records in this file{first}")
    return records, problems


def _stats(err: np.ndarray) -> dict[str, Any]:
    if len(err) == 0:
        return {"pairs": 0, "mae_kmh": None, "bias_kmh": None, "rmse_kmh": None}
    return {
        "pairs": int(len(err)),
        "mae_kmh": round(float(np.mean(np.abs(err))), 3),
        "bias_kmh": round(float(np.mean(err)), 3),
        "rmse_kmh": round(float(np.sqrt(np.mean(err**2))), 3),
    }


@dataclass(frozen=True)
class Matched:
    """Truth rows of the evaluated span with the matching estimate (NaN where none)."""

    truth: Truth
    estimate_kmh: np.ndarray
    free_flow_kmh: np.ndarray


def match(records: Iterable[SegmentSpeed], truth: Truth) -> Matched:
    """Pair truth rows with ``ok`` records of the same segment and window (see module docstring).

    Raises
    ------
    EvaluationInputError
        No ``ok`` records, or no truth window has the speeds' window span.
    """
    ok = [r for r in records if r.status == "ok"]
    if not ok:
        raise EvaluationInputError("the speeds file has no records with status ok to evaluate")
    span = np.asarray([round(r.window_end - r.window_start, 6) for r in ok])
    spans = sorted(set(span.tolist()))
    usable = [s for s in spans if np.any(np.isclose(truth.window_s, s))]
    if not usable:
        raise EvaluationInputError(
            f"no truth windows of the speeds' span ({', '.join(f'{s:g}' for s in spans)} s); truth has "
            f"window_s {sorted(set(truth.window_s.tolist()))}"
        )
    sel = np.isin(truth.window_s, usable)
    t = Truth(**{k: getattr(truth, k)[sel] for k in Truth.__dataclass_fields__})
    # Latest publication wins per (segment, window start, span).
    best: dict[tuple[int, float, float], SegmentSpeed] = {}
    for r, s in zip(ok, span.tolist()):
        key = (r.segment_id, float(r.window_start), float(s))
        old = best.get(key)
        if old is None or r.published_at >= old.published_at:
            best[key] = r
    est = np.full(len(t), np.nan)
    ff = np.full(len(t), np.nan)
    for i, key in enumerate(zip(t.segment_id.tolist(), t.window_start.tolist(), t.window_s.tolist())):
        r = best.get((int(key[0]), float(key[1]), float(key[2])))
        if r is not None:
            est[i] = r.speed_kmh
            ff[i] = r.free_flow_speed_kmh
    return Matched(t, est, ff)


def evaluate(records: Iterable[SegmentSpeed], truth: Truth) -> dict[str, Any]:
    """MAE, bias, RMSE and coverage, overall and per true-speed band (a JSON-ready dict)."""
    m = match(records, truth)
    t = m.truth
    has = ~np.isnan(m.estimate_kmh)
    err = m.estimate_kmh[has] - t.speed_kmh[has]
    probed = t.probe_vehicles >= 1

    def coverage(mask: np.ndarray) -> float | None:
        denom = int((probed & mask).sum())
        return None if denom == 0 else round(float((probed & mask & has).sum()) / denom, 4)

    report: dict[str, Any] = {
        "window_s": sorted(set(t.window_s.tolist())),
        "truth_windows": int(len(t)),
        "truth_windows_with_probe": int(probed.sum()),
        "published_windows_matched": int(has.sum()),
        "overall": {**_stats(err), "coverage": coverage(np.ones(len(t), dtype=bool))},
        "bands": [],
    }
    for lo, hi in SPEED_BANDS:
        in_band = (t.speed_kmh >= lo) & (t.speed_kmh < hi)
        label = f"{lo:g}-{hi:g}" if math.isfinite(hi) else f"{lo:g}+"
        band_err = m.estimate_kmh[has & in_band] - t.speed_kmh[has & in_band]
        report["bands"].append({"band_kmh": label, **_stats(band_err), "coverage": coverage(in_band)})
    return report


def plot(records: Iterable[SegmentSpeed], truth: Truth, out_dir: str | os.PathLike[str], n_segments: int = 6) -> list[Path]:
    """PNG plots: estimated vs true scatter, and time-speed lines of the most congested segments.

    The most congested segments are those with the lowest mean ratio of true speed to free-flow
    speed over their matched windows (at least 3 matched windows).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = list(records)
    m = match(records, truth)
    t = m.truth
    has = ~np.isnan(m.estimate_kmh)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 6))
    top = float(max(np.nanmax(t.speed_kmh[has], initial=10.0), np.nanmax(m.estimate_kmh[has], initial=10.0))) * 1.05
    ax.scatter(t.speed_kmh[has], m.estimate_kmh[has], s=6, alpha=0.4, color="tab:blue", edgecolors="none")
    ax.plot([0, top], [0, top], color="black", lw=1, label="estimate = truth")
    err = m.estimate_kmh[has] - t.speed_kmh[has]
    mae = float(np.mean(np.abs(err))) if len(err) else float("nan")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="true space-mean speed (km/h)", ylabel="estimated speed (km/h)",
           title=f"{int(has.sum())} segment-windows, MAE {mae:.1f} km/h")
    ax.legend(loc="upper left")
    fig.tight_layout()
    p = out / "speed_scatter.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    seg = t.segment_id[has]
    ratio = t.speed_kmh[has] / m.free_flow_kmh[has]
    uniq, inv = np.unique(seg, return_inverse=True)
    n = np.bincount(inv, minlength=len(uniq))
    mean_ratio = np.bincount(inv, weights=ratio, minlength=len(uniq)) / np.maximum(n, 1)
    cand = np.flatnonzero(n >= 3)
    chosen = uniq[cand[np.argsort(mean_ratio[cand])][:n_segments]]
    if len(chosen):
        cols = 2
        rows = int(math.ceil(len(chosen) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
        for ax, sid in zip(axes.flat, chosen):
            on = t.segment_id == sid
            order = np.argsort(t.window_start[on])
            mid = (t.window_start[on] + t.window_s[on] / 2.0)[order]
            t0 = mid.min()
            ax.plot((mid - t0) / 3600.0, t.speed_kmh[on][order], color="black", lw=1.2, label="truth (all vehicles)")
            # Every published sliding window of the segment, at its midpoint.
            est = sorted(((r.window_start + r.window_end) / 2.0, r.speed_kmh) for r in records
                         if r.segment_id == sid and r.status == "ok")
            if est:
                x, y = zip(*est)
                ax.plot((np.asarray(x) - t0) / 3600.0, y, "o-", ms=2.5, lw=0.6, color="tab:red",
                        label="estimate (probes)")
            ff = np.nanmedian(m.free_flow_kmh[on])
            ax.axhline(ff, color="tab:green", ls="--", lw=0.8, label="free flow")
            ax.set(title=f"segment {sid}", xlabel="hours since first window", ylabel="km/h", ylim=(0, None))
        for ax in list(axes.flat)[len(chosen):]:
            ax.axis("off")
        axes.flat[0].legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        p = out / "congested_segments.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
