"""Validation of incoming pings: one place that decides what a good ping is.

Every reader (Kafka ingest, CSV/JSONL/GPX files, the simulator) funnels raw records through
:func:`parse_ping`, so a bad ping is rejected for the same reason wherever it comes from.
Rejections carry a short machine-readable ``reason`` (a bounded set, safe as a metric label)
and a human-readable ``detail`` that never contains the device id or coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from geo.model import Ping

#: Every reason a ping can be rejected for. Bounded: used as a metric label.
REJECT_REASONS: tuple[str, ...] = (
    "malformed_json",
    "not_an_object",
    "empty_batch",
    "batch_too_large",
    "message_too_large",
    "missing_field",
    "bad_type",
    "bad_device",
    "not_finite",
    "lat_out_of_range",
    "lon_out_of_range",
    "bad_timestamp",
    "ts_too_old",
    "ts_in_future",
    "bad_accuracy",
    "bad_speed",
    "bad_heading",
    "duplicate",
    "out_of_order",
    "teleport",
)

#: Earliest event time accepted when no ``now`` is given: 2000-01-01T00:00:00Z.
MIN_EPOCH_S: float = 946_684_800.0
MAX_DEVICE_ID_CHARS: int = 128
#: Accepted ranges of the optional fields (inclusive): reported accuracy, m; speed, m/s; heading, degrees.
ACCURACY_RANGE_M: tuple[float, float] = (0.0, 10_000.0)
SPEED_RANGE_MPS: tuple[float, float] = (0.0, 150.0)
HEADING_RANGE_DEG: tuple[float, float] = (0.0, 360.0)


class PingRejected(ValueError):
    """A raw record that is not a valid ping.

    Attributes
    ----------
    reason
        One of :data:`REJECT_REASONS`.
    detail
        Human-readable explanation without ids or coordinates.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_timestamp(value: Any) -> float:
    """Event time as epoch seconds from epoch seconds/milliseconds or an RFC 3339 string.

    Numbers above 1e11 are taken as epoch milliseconds (1e11 s is the year 5138).

    Raises
    ------
    PingRejected
        ``bad_timestamp`` or ``not_finite``.
    """
    if isinstance(value, bool):
        raise PingRejected("bad_timestamp", "boolean is not a time")
    if isinstance(value, (int, float)):
        ts = float(value)
    elif isinstance(value, str):
        s = value.strip()
        try:
            ts = float(s)
        except ValueError:
            try:
                dt = datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError:
                raise PingRejected("bad_timestamp", "not epoch seconds or RFC 3339") from None
            if dt.tzinfo is None:
                raise PingRejected("bad_timestamp", "RFC 3339 time needs a UTC offset")
            ts = dt.astimezone(timezone.utc).timestamp()
    else:
        raise PingRejected("bad_timestamp", f"unsupported type {type(value).__name__}")
    if not math.isfinite(ts):
        raise PingRejected("not_finite", "timestamp is NaN or infinite")
    if ts > 1e11:
        ts /= 1000.0
    return ts


def _number(raw: Mapping[str, Any], key: str, required: bool) -> float | None:
    value = raw.get(key)
    if value is None or (value == "" and not required):
        if required:
            raise PingRejected("missing_field", f"'{key}' is required")
        return None
    if isinstance(value, bool):
        raise PingRejected("bad_type", f"'{key}' must be a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise PingRejected("bad_type", f"'{key}' must be a number") from None
    if not isinstance(value, (int, float)):
        raise PingRejected("bad_type", f"'{key}' must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise PingRejected("not_finite", f"'{key}' is NaN or infinite")
    return value


_NUMBER_TYPES = (float, int)  # exact types: bool is an int subclass and is not a number here


def _optional_plain(raw: dict[str, Any], key: str, bounds: tuple[float, float]) -> tuple[bool, float | None]:
    low, high = bounds
    value = raw.get(key)
    if value is None:
        return True, None
    if type(value) in _NUMBER_TYPES and low <= value <= high:  # NaN fails the comparison
        return True, float(value)
    return False, None


def _plain_ping(raw: dict[str, Any], device: str | None) -> Ping | None:
    """The common case of :func:`parse_ping` in a few comparisons: a JSON object whose fields are plain
    numbers within range and a printable device id. Returns ``None`` for anything else, which then takes
    the full path (and gets its reason there); never accepts what the full path would reject."""
    dev = raw.get("device", device)
    if type(dev) is not str or not 0 < len(dev) <= MAX_DEVICE_ID_CHARS or not dev.isprintable():
        return None
    ts, lat, lon = raw.get("ts"), raw.get("lat"), raw.get("lon")
    if type(ts) not in _NUMBER_TYPES or type(lat) not in _NUMBER_TYPES or type(lon) not in _NUMBER_TYPES:
        return None
    ts = float(ts)
    if ts > 1e11:
        ts /= 1000.0
    if not (MIN_EPOCH_S <= ts < math.inf and -90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        return None
    ok_a, acc = _optional_plain(raw, "accuracy_m", ACCURACY_RANGE_M)
    ok_s, spd = _optional_plain(raw, "speed_mps", SPEED_RANGE_MPS)
    ok_h, hdg = _optional_plain(raw, "heading_deg", HEADING_RANGE_DEG)
    if not (ok_a and ok_s and ok_h):
        return None
    return Ping(dev, ts, float(lat), float(lon), acc, spd, hdg)


def parse_ping(
    raw: Mapping[str, Any],
    *,
    now: float | None = None,
    max_age_s: float = 7 * 24 * 3600.0,
    max_future_s: float = 300.0,
    device: str | None = None,
) -> Ping:
    """Validate one raw ping record and return a :class:`~geo.model.Ping`.

    Parameters
    ----------
    raw
        Mapping with ``device``, ``ts``, ``lat``, ``lon`` and optionally ``accuracy_m``,
        ``speed_mps``, ``heading_deg`` (strings from CSV are accepted for numbers).
    now
        Wall-clock time, epoch seconds, against which event times are checked. ``None`` (replays,
        files) only rejects times before 2000-01-01.
    max_age_s
        Oldest accepted event time relative to ``now``, seconds.
    max_future_s
        Furthest accepted event time ahead of ``now``, seconds (clock skew allowance).
    device
        Device id to use when the record itself has none (a batch keyed by device).

    Raises
    ------
    PingRejected
        With a reason from :data:`REJECT_REASONS`.
    """
    if type(raw) is dict:
        ping = _plain_ping(raw, device)
        if ping is not None and (now is None or now - max_age_s <= ping.ts <= now + max_future_s):
            return ping
    if not isinstance(raw, Mapping):
        raise PingRejected("not_an_object", f"expected an object, got {type(raw).__name__}")
    dev = raw.get("device", device)
    if dev is None or dev == "":
        raise PingRejected("missing_field", "'device' is required")
    if isinstance(dev, (int,)) and not isinstance(dev, bool):
        dev = str(dev)
    if not isinstance(dev, str):
        raise PingRejected("bad_device", "device id must be a string")
    if len(dev) > MAX_DEVICE_ID_CHARS or not dev.isprintable():
        raise PingRejected("bad_device", "device id too long or has control characters")
    if raw.get("ts") is None or raw.get("ts") == "":
        raise PingRejected("missing_field", "'ts' is required")
    ts = parse_timestamp(raw["ts"])
    lat = _number(raw, "lat", True)
    lon = _number(raw, "lon", True)
    assert lat is not None and lon is not None
    if not -90.0 <= lat <= 90.0:
        raise PingRejected("lat_out_of_range", "latitude outside [-90, 90]")
    if not -180.0 <= lon <= 180.0:
        raise PingRejected("lon_out_of_range", "longitude outside [-180, 180]")
    if ts < MIN_EPOCH_S:
        raise PingRejected("ts_too_old", "event time before 2000-01-01")
    if now is not None:
        if ts < now - max_age_s:
            raise PingRejected("ts_too_old", f"event time more than {max_age_s:.0f} s old")
        if ts > now + max_future_s:
            raise PingRejected("ts_in_future", f"event time more than {max_future_s:.0f} s ahead")
    acc = _number(raw, "accuracy_m", False)
    if acc is not None and not ACCURACY_RANGE_M[0] <= acc <= ACCURACY_RANGE_M[1]:
        raise PingRejected("bad_accuracy", "accuracy_m outside [%g, %g]" % ACCURACY_RANGE_M)
    spd = _number(raw, "speed_mps", False)
    if spd is not None and not SPEED_RANGE_MPS[0] <= spd <= SPEED_RANGE_MPS[1]:
        raise PingRejected("bad_speed", "speed_mps outside [%g, %g]" % SPEED_RANGE_MPS)
    hdg = _number(raw, "heading_deg", False)
    if hdg is not None and not HEADING_RANGE_DEG[0] <= hdg <= HEADING_RANGE_DEG[1]:
        raise PingRejected("bad_heading", "heading_deg outside [%g, %g]" % HEADING_RANGE_DEG)
    return Ping(dev, ts, lat, lon, acc, spd, hdg)
