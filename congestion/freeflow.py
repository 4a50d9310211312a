"""Free-flow speed per segment, learned online from off-peak traversals.

"Free flow" is the speed drivers choose on an empty road. It is learned as a high percentile
(default the 85th, the traffic engineer's "V85") of the speeds of traversals made in low-demand
hours (default 21:00-06:00 local time). Until a segment has ``min_samples`` such traversals from at
least ``min_devices`` distinct devices, the map prior (``maxspeed`` or the road-class default) is
used, so a few night drives of one person never become that road's free flow.

State per segment that has seen off-peak data: a speed histogram (``bin_kmh`` bins up to
``max_kmh``) and the ``min_devices`` smallest device keys seen (a tiny distinct-count sketch). It is
exported as plain arrays (:meth:`FreeFlowLearner.state`) and persisted with the estimator.
"""

from __future__ import annotations

import numpy as np

from congestion._arrays import unique_counts, unique_sorted

#: Histogram resolution, km/h per bin, and the top of the histogram (faster speeds land in the last bin).
BIN_KMH = 2.0
MAX_KMH = 200.0


def solar_utc_offset_h(network_lon_deg: float) -> float:
    """Mean solar time offset of a longitude, hours (``lon / 15``): a timezone-free "local time"."""
    return float(network_lon_deg) / 15.0


def is_off_peak(t_s: np.ndarray, off_peak_hours: tuple[int, int], utc_offset_h: float) -> np.ndarray:
    """Whether each event time falls in the off-peak hours ``[start, end)`` of local time.

    Parameters
    ----------
    t_s
        Event times, epoch seconds UTC.
    off_peak_hours
        ``(start_hour, end_hour)`` local; wraps midnight when ``start > end`` (e.g. ``(21, 6)``).
    utc_offset_h
        Local time minus UTC, hours.
    """
    hour = np.floor(((np.asarray(t_s, dtype=float) + utc_offset_h * 3600.0) % 86400.0) / 3600.0)
    start, end = off_peak_hours
    if start <= end:
        return (hour >= start) & (hour < end)
    return (hour >= start) | (hour < end)


class FreeFlowLearner:
    """Online free-flow speeds for the segments of one network.

    Parameters
    ----------
    prior_kmh
        Map prior per segment row, km/h (``RoadNetwork.free_flow_prior_kmh``).
    percentile
        Percentile of off-peak speeds taken as free flow, 0..100.
    min_samples
        Off-peak traversals needed before the learned value replaces the prior.
    min_devices
        Distinct devices needed among them (privacy: one person's habits are never published).
    """

    def __init__(self, prior_kmh: np.ndarray, percentile: float = 85.0, min_samples: int = 30, min_devices: int = 3) -> None:
        if not 0.0 < percentile < 100.0:
            raise ValueError("free-flow percentile must be in (0, 100)")
        self.prior_kmh = np.asarray(prior_kmh, dtype=float)
        self.percentile = float(percentile)
        self.min_samples = int(min_samples)
        self.min_devices = max(1, int(min_devices))
        self.n_bins = int(np.ceil(MAX_KMH / BIN_KMH))
        n = len(self.prior_kmh)
        self._slot = np.full(n, -1, dtype=np.int64)  # row -> histogram slot
        self._rows = np.zeros(0, dtype=np.int64)  # slot -> row
        self._hist = np.zeros((0, self.n_bins), dtype=np.uint32)
        self._devices = np.zeros((0, self.min_devices), dtype=np.int64)  # -1 = empty
        self._speed = self.prior_kmh.copy()
        self._learned = np.zeros(n, dtype=bool)
        self._dirty = np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ learning
    def observe(self, rows: np.ndarray, speed_kmh: np.ndarray, device_keys: np.ndarray) -> None:
        """Add off-peak traversal speeds (the caller selects off-peak samples).

        Parameters
        ----------
        rows
            Segment rows, int.
        speed_kmh
            Traversal speeds, km/h.
        device_keys
            Non-negative int64 device keys (see :func:`congestion.estimator.device_keys`).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        slots = self._ensure_slots(rows)
        bins = np.clip((np.asarray(speed_kmh, dtype=float) / BIN_KMH).astype(np.int64), 0, self.n_bins - 1)
        cell, count = unique_counts(slots * self.n_bins + bins)
        flat = self._hist.reshape(-1)
        flat[cell] += count.astype(np.uint32)
        self._add_devices(slots, np.asarray(device_keys, dtype=np.int64))
        self._dirty = unique_sorted(np.concatenate([self._dirty, slots]))

    def _ensure_slots(self, rows: np.ndarray) -> np.ndarray:
        new = unique_sorted(rows[self._slot[rows] < 0])
        if len(new):
            start = len(self._rows)
            self._slot[new] = np.arange(start, start + len(new))
            self._rows = np.concatenate([self._rows, new])
            self._hist = np.concatenate([self._hist, np.zeros((len(new), self.n_bins), dtype=np.uint32)])
            self._devices = np.concatenate([self._devices, np.full((len(new), self.min_devices), -1, dtype=np.int64)])
        return self._slot[rows]

    def _add_devices(self, slots: np.ndarray, dev: np.ndarray) -> None:
        # Only slots whose sketch is not yet full need work; a full sketch already proves >= k devices.
        need = self._devices[slots, -1] < 0
        if not need.any():
            return
        s_new, d_new = slots[need], dev[need]
        touched = unique_sorted(s_new)
        old = self._devices[touched]
        s_old = np.repeat(touched, self.min_devices)
        d_old = old.reshape(-1)
        keep = d_old >= 0
        s_all = np.concatenate([s_old[keep], s_new])
        d_all = np.concatenate([d_old[keep], d_new])
        order = np.lexsort((d_all, s_all))
        s_all, d_all = s_all[order], d_all[order]
        first = np.ones(len(s_all), dtype=bool)
        first[1:] = (s_all[1:] != s_all[:-1]) | (d_all[1:] != d_all[:-1])
        s_all, d_all = s_all[first], d_all[first]
        start = np.ones(len(s_all), dtype=bool)
        start[1:] = s_all[1:] != s_all[:-1]
        idx = np.arange(len(s_all))
        rank = idx - np.maximum.accumulate(np.where(start, idx, 0))
        ok = rank < self.min_devices
        self._devices[touched] = -1
        self._devices[s_all[ok], rank[ok]] = d_all[ok]

    # ------------------------------------------------------------------ reading
    def _refresh(self) -> None:
        if len(self._dirty) == 0:
            return
        slots = self._dirty
        self._dirty = np.zeros(0, dtype=np.int64)
        hist = self._hist[slots].astype(np.int64)
        total = hist.sum(axis=1)
        enough = (total >= self.min_samples) & (self._devices[slots, -1] >= 0)
        rows = self._rows[slots]
        self._learned[rows] = enough
        if not enough.any():
            return
        hist, total, rows = hist[enough], total[enough], rows[enough]
        cum = np.cumsum(hist, axis=1)
        target = total * (self.percentile / 100.0)
        idx = np.argmax(cum >= target[:, None], axis=1)
        below = np.where(idx > 0, cum[np.arange(len(idx)), idx - 1], 0)
        inside = hist[np.arange(len(idx)), idx]
        frac = (target - below) / np.maximum(inside, 1)
        self._speed[rows] = np.round((idx + frac) * BIN_KMH, 1)

    def speeds(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Free-flow speed, km/h, for segment rows (all rows when ``None``)."""
        self._refresh()
        return self._speed.copy() if rows is None else self._speed[np.asarray(rows, dtype=np.int64)]

    def learned(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Whether each row's free flow is learned (``False``: the map prior is used)."""
        self._refresh()
        return self._learned.copy() if rows is None else self._learned[np.asarray(rows, dtype=np.int64)]

    def sample_counts(self, rows: np.ndarray) -> np.ndarray:
        """Off-peak traversals seen per row."""
        slot = self._slot[np.asarray(rows, dtype=np.int64)]
        out = np.zeros(len(slot), dtype=np.int64)
        has = slot >= 0
        out[has] = self._hist[slot[has]].sum(axis=1)
        return out

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, np.ndarray]:
        """Plain arrays that :meth:`load_state` restores (for the estimator's state file)."""
        return {"ff_rows": self._rows, "ff_hist": self._hist, "ff_devices": self._devices}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore arrays written by :meth:`state` (same network and ``min_devices``)."""
        rows = np.asarray(state["ff_rows"], dtype=np.int64)
        hist = np.asarray(state["ff_hist"], dtype=np.uint32)
        devices = np.asarray(state["ff_devices"], dtype=np.int64)
        if hist.shape != (len(rows), self.n_bins):
            raise ValueError("free-flow state does not match this histogram layout")
        if len(rows) and rows.max() >= len(self.prior_kmh):
            raise ValueError("free-flow state refers to segments this network does not have")
        if devices.shape[1] != self.min_devices:
            # A changed k: keep what fits; a smaller sketch is still a valid lower bound.
            fixed = np.full((len(rows), self.min_devices), -1, dtype=np.int64)
            w = min(devices.shape[1], self.min_devices)
            fixed[:, :w] = np.sort(np.where(devices < 0, np.iinfo(np.int64).max, devices), axis=1)[:, :w]
            fixed[fixed == np.iinfo(np.int64).max] = -1
            devices = fixed
        self._slot[:] = -1
        self._slot[rows] = np.arange(len(rows))
        self._rows, self._hist, self._devices = rows, hist.copy(), devices.copy()
        self._speed = self.prior_kmh.copy()
        self._learned[:] = False
        self._dirty = np.arange(len(rows), dtype=np.int64)
