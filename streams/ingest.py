"""Ingest: raw Kafka messages -> valid, pseudonymised, trip-trimmed pings. Pure logic, no Kafka.

Three steps, each a plain function or a small class, called in this order by both runners
(:mod:`streams.operators`):

1. :func:`decode_message` -- one Kafka message (``key``, ``value`` bytes) holds one ping object or a
   batch ``{"device": ..., "pings": [{...}, ...]}``; every ping goes through the one validator,
   :func:`geo.pings.parse_ping`. What fails becomes a :class:`DeadLetter` carrying the original bytes
   and the reasons (from :data:`geo.pings.REJECT_REASONS`).
2. :class:`Pseudonymiser` -- the device id becomes ``HMAC-SHA256(key_e, device)`` truncated to 64 bits,
   where ``key_e`` is derived from the configured secret and the rotation epoch
   ``floor(ts / rotation_s)`` of the ping's event time. The raw id never leaves this step; a device's
   pseudonym changes when the key rotates, which also ends its trip (see below).
3. :class:`TripTrimmer` -- privacy trimming of trip ends, per device (pseudonym), with a small state:

   * **start**: pings within ``trim_m`` (straight line) of the trip's first ping are dropped until the
     device first leaves that circle;
   * **end**: every ping is held back until a later ping lies at least ``trim_m`` from it (the device
     has "moved on"); held pings are released in order. When the trip ends -- the next ping comes more
     than ``gap_s`` later, or the device goes idle for that long (:meth:`TripTrimmer.finish`) -- the
     held tail is discarded. So no released ping lies within ``trim_m`` of the trip's end point
     *as seen from the end of the held stretch*, and the trip's first ``trim_m`` are never released.
   * pings older than the device's newest (``out_of_order``) or repeating it (``duplicate``) are
     rejected here, since trimming needs event-time order; so is a ping that jumps more than
     :data:`TELEPORT_MIN_M` at over :data:`TELEPORT_SPEED_MPS` from the device's previous ping within a
     trip (``teleport``).

   The held tail is bounded (:data:`MAX_HELD_PINGS`): a device stuck for minutes within ``trim_m``
   (a jam, or parked with the app on) drops its oldest held pings rather than releasing them, which
   keeps both the state and the privacy promise; dropped pings are counted as trimmed.

A pseudonym rotation starts a new trip under the new pseudonym (its start is trimmed) while the old
pseudonym's trip ends by idling (its tail is discarded), so the two halves are separated by up to
``2 * trim_m`` of road that is never released.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from geo.model import Ping
from geo.pings import PingRejected, parse_ping

#: Largest accepted message value, bytes (larger ones are dead-lettered as ``message_too_large``).
MAX_MESSAGE_BYTES: int = 1_000_000
#: Most pings accepted in one batch message (``batch_too_large`` beyond).
MAX_BATCH_PINGS: int = 10_000
#: Most pings a device's held-back trip tail keeps (see the module docstring).
MAX_HELD_PINGS: int = 256
#: A ping implying a faster move than this from its device's previous ping is a ``teleport``, m/s
#: (360 km/h: no car; GPS outliers of a few hundred metres stay below it through :data:`TELEPORT_MIN_M`).
TELEPORT_SPEED_MPS: float = 100.0
#: Jumps shorter than this are never teleports, metres (multipath outliers reach ~250 m).
TELEPORT_MIN_M: float = 1_000.0
#: Hex characters of a pseudonym (64 bits: collisions are negligible below ~10^8 devices per epoch).
PSEUDONYM_HEX: int = 16

_EARTH_M_PER_DEG = 111_194.9  # metres per degree of latitude (mean Earth radius 6371.0 km)


# --------------------------------------------------------------------------------------------- 1. decode


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why (part of) a message was rejected.

    Parameters
    ----------
    reason
        One of :data:`geo.pings.REJECT_REASONS` (bounded; safe as a metric label).
    detail
        Human-readable, without device ids or coordinates.
    index
        Position of the bad ping in the message's batch; ``None`` when the whole message is bad.
    """

    reason: str
    detail: str = ""
    index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "detail": self.detail, "index": self.index}


@dataclass(frozen=True)
class DeadLetter:
    """A rejected message for the dead-letter topic: the original bytes and every reason.

    On Kafka the value is :attr:`original` unchanged (key likewise); the reasons travel in the headers
    (:meth:`headers`): ``reason`` (the first), ``rejections`` (JSON list of :class:`Rejection`),
    ``rejected_pings`` (count).
    """

    key: bytes | None
    original: bytes
    rejections: tuple[Rejection, ...]
    #: Pings this dead letter stands for (0 when the message had none that could be counted).
    n_pings: int = 1

    @property
    def reason(self) -> str:
        return self.rejections[0].reason

    def headers(self) -> list[tuple[str, bytes]]:
        """Kafka record headers describing the rejection."""
        return [
            ("reason", self.reason.encode()),
            ("rejections", json.dumps([r.to_dict() for r in self.rejections]).encode()),
            ("rejected_pings", str(self.n_pings).encode()),
        ]


@dataclass
class DecodedMessage:
    """The valid pings of one message (raw device ids) and its dead letter, if any part was bad."""

    pings: list[Ping]
    #: Position of each valid ping in the message's batch (to report later rejections by index).
    indexes: list[int]
    dead_letter: DeadLetter | None
    #: Pings the message carried, valid or not (what ``PINGS_RECEIVED`` counts).
    n_received: int


def _whole(key: bytes | None, value: bytes, reason: str, detail: str, n: int = 1) -> DecodedMessage:
    return DecodedMessage([], [], DeadLetter(key, value, (Rejection(reason, detail),), n), n)


def decode_message(key: bytes | None, value: bytes | None, *, now: float | None = None) -> DecodedMessage:
    """Parse one raw message: a ping object, or a batch ``{"device": ..., "pings": [...]}``.

    Parameters
    ----------
    key
        Kafka message key (the device id as sent); used as the device of a batch without one.
    value
        Kafka message value: UTF-8 JSON.
    now
        Wall clock, epoch seconds, for the age checks of :func:`geo.pings.parse_ping`;
        ``None`` for replays of old data.

    Returns
    -------
    DecodedMessage
        Valid pings with their *raw* device ids (pseudonymise next) and a dead letter listing every
        rejected ping, or the whole message when it cannot be read at all. Never raises.
    """
    value = value if value is not None else b""
    if len(value) > MAX_MESSAGE_BYTES:
        return _whole(key, value, "message_too_large", f"{len(value)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        # orjson is strict JSON; the json module also reads NaN/Infinity and integers beyond 64 bits,
        # which then get their specific reasons (not_finite, out of range) from the validator
        try:
            doc = json.loads(value)
        except (UnicodeDecodeError, ValueError):
            return _whole(key, value, "malformed_json", "value is not UTF-8 JSON")
    if not isinstance(doc, dict):
        return _whole(key, value, "not_an_object", f"expected an object, got {type(doc).__name__}")
    if "pings" not in doc:
        raws: list[Any] = [doc]
        default_device = _key_device(key)
    else:
        raws = doc["pings"]
        if not isinstance(raws, list):
            return _whole(key, value, "bad_type", "'pings' must be a list")
        if not raws:
            # counted as one rejected record, so that received = rejected + matched + unmatched holds
            # and the metric shows it (a message that carries no ping still stands for one upload)
            return _whole(key, value, "empty_batch", "'pings' is empty", 1)
        if len(raws) > MAX_BATCH_PINGS:
            return _whole(key, value, "batch_too_large", f"{len(raws)} pings > {MAX_BATCH_PINGS}", len(raws))
        dev = doc.get("device")
        default_device = dev if isinstance(dev, str) and dev else _key_device(key)
    pings: list[Ping] = []
    indexes: list[int] = []
    rejections: list[Rejection] = []
    for i, raw in enumerate(raws):
        try:
            pings.append(parse_ping(raw, now=now, device=default_device))
            indexes.append(i)
        except PingRejected as exc:
            rejections.append(Rejection(exc.reason, exc.detail, i if "pings" in doc else None))
    dead = DeadLetter(key, value, tuple(rejections), len(rejections)) if rejections else None
    return DecodedMessage(pings, indexes, dead, len(raws))


def _key_device(key: bytes | None) -> str | None:
    if not key:
        return None
    try:
        return key.decode()
    except UnicodeDecodeError:
        return None


# ------------------------------------------------------------------------------------- 2. pseudonymise


class Pseudonymiser:
    """Keyed, rotating pseudonyms: ``HMAC-SHA256(K_e, device)[:64 bits]`` as hex.

    ``K_e = HMAC-SHA256(secret, "roadpulse-pseudonym-epoch:" + e)`` with rotation epoch
    ``e = floor(ts / rotation_s)``: without the secret a pseudonym cannot be linked to a device id,
    and pseudonyms of different epochs cannot be linked to each other.

    Parameters
    ----------
    secret
        The configured ``pseudonym_key``.
    rotation_s
        Key lifetime, seconds of event time.
    """

    def __init__(self, secret: str | bytes, rotation_s: float) -> None:
        if not rotation_s > 0:
            raise ValueError(f"pseudonym_rotation_s must be > 0, got {rotation_s}")
        self._secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        self.rotation_s = float(rotation_s)
        self._epoch_keys: dict[int, bytes] = {}
        self._cache: dict[tuple[str, int], str] = {}

    def epoch(self, ts: float) -> int:
        """Rotation epoch of an event time (epoch seconds)."""
        return math.floor(ts / self.rotation_s)

    def epoch_key(self, epoch: int) -> bytes:
        key = self._epoch_keys.get(epoch)
        if key is None:
            if len(self._epoch_keys) > 64:
                self._epoch_keys.clear()
            key = hmac.new(self._secret, f"roadpulse-pseudonym-epoch:{epoch}".encode(), hashlib.sha256).digest()
            self._epoch_keys[epoch] = key
        return key

    def pseudonym(self, device: str, ts: float) -> str:
        """The pseudonym of ``device`` at event time ``ts``."""
        e = self.epoch(ts)
        cached = self._cache.get((device, e))
        if cached is None:
            if len(self._cache) > 200_000:  # bound memory; recomputing costs ~2 us
                self._cache.clear()
            digest = hmac.new(self.epoch_key(e), device.encode(), hashlib.sha256).hexdigest()
            cached = self._cache[(device, e)] = digest[:PSEUDONYM_HEX]
        return cached

    def apply(self, pings: Sequence[Ping]) -> list[Ping]:
        """The same pings with pseudonyms for device ids."""
        pn = self.pseudonym
        return [Ping(pn(p.device, p.ts), p.ts, p.lat, p.lon, p.accuracy_m, p.speed_mps, p.heading_deg) for p in pings]


# --------------------------------------------------------------------------------------------- 3. trim


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Straight-line distance, metres (equirectangular; exact to < 0.1 % below 10 km)."""
    dy = (lat2 - lat1) * _EARTH_M_PER_DEG
    dx = (lon2 - lon1) * _EARTH_M_PER_DEG * math.cos(math.radians(0.5 * (lat1 + lat2)))
    return math.hypot(dx, dy)


@dataclass
class TripTrimState:
    """One device's trimming state: a few floats and the held-back tail (at most :data:`MAX_HELD_PINGS`)."""

    last_ts: float = -math.inf
    last_lat: float = math.nan
    last_lon: float = math.nan
    start_lat: float = math.nan
    start_lon: float = math.nan
    #: The trip has left the ``trim_m`` circle around its first ping.
    left_start: bool = False
    held: list[Ping] = field(default_factory=list)

    @property
    def in_trip(self) -> bool:
        return self.last_ts > -math.inf

    _HEAD = struct.Struct("<BBxxIddddd")
    _PING = struct.Struct("<ddddddB")  # ts, lat, lon, accuracy, speed, heading (NaN = None), presence bits

    def to_bytes(self) -> bytes:
        """Compact binary form (device ids are not stored: the state lives under its pseudonym)."""
        parts = [self._HEAD.pack(1, int(self.left_start), len(self.held), self.last_ts, self.last_lat,
                                 self.last_lon, self.start_lat, self.start_lon)]
        nan = math.nan
        for p in self.held:
            bits = (p.accuracy_m is not None) | (p.speed_mps is not None) << 1 | (p.heading_deg is not None) << 2
            parts.append(self._PING.pack(p.ts, p.lat, p.lon, nan if p.accuracy_m is None else p.accuracy_m,
                                         nan if p.speed_mps is None else p.speed_mps,
                                         nan if p.heading_deg is None else p.heading_deg, bits))
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes, device: str) -> "TripTrimState":
        """Inverse of :meth:`to_bytes`; held pings get ``device`` back.

        Raises
        ------
        ValueError
            Not a trim state of this version.
        """
        h, pp = cls._HEAD, cls._PING
        if len(data) < h.size or data[0] != 1:
            raise ValueError("not a trip-trim state (wrong version or truncated)")
        _, left, n, last_ts, last_lat, last_lon, start_lat, start_lon = h.unpack_from(data, 0)
        if len(data) != h.size + n * pp.size:
            raise ValueError("not a trip-trim state (wrong length)")
        held = []
        for k in range(n):
            ts, lat, lon, acc, spd, hdg, bits = pp.unpack_from(data, h.size + k * pp.size)
            held.append(Ping(device, ts, lat, lon, acc if bits & 1 else None, spd if bits & 2 else None,
                             hdg if bits & 4 else None))
        return cls(last_ts, last_lat, last_lon, start_lat, start_lon, bool(left), held)


@dataclass
class TrimResult:
    """What :meth:`TripTrimmer.push` did with one device's pings.

    Attributes
    ----------
    released
        Pings safe to match, in event-time order.
    rejected
        ``(position in the input, reason)`` for ``out_of_order`` / ``duplicate`` / ``teleport`` pings.
    trimmed
        Pings dropped for privacy (trip starts, discarded tails, overflow of the held tail).
    trips_ended
        Trips that ended inside this push (a gap above ``gap_s``).
    """

    released: list[Ping] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    trimmed: int = 0
    trips_ended: int = 0


class TripTrimmer:
    """Trims the first and last ``trim_m`` of every trip (see the module docstring).

    Parameters
    ----------
    trim_m
        Metres trimmed at each trip end (``settings.trip_trim_m``); 0 disables trimming.
    gap_s
        A gap between a device's pings longer than this ends its trip (the matcher's ``max_gap_s``,
        so that trimming and matching agree on what a trip is).
    """

    def __init__(self, trim_m: float, gap_s: float) -> None:
        if trim_m < 0 or not gap_s > 0:
            raise ValueError(f"need trim_m >= 0 and gap_s > 0, got {trim_m}, {gap_s}")
        self.trim_m = float(trim_m)
        self.gap_s = float(gap_s)

    def push(self, state: TripTrimState, pings: Sequence[Ping]) -> TrimResult:
        """Feed one device's new pings (event-time order expected); updates ``state`` in place."""
        res = TrimResult()
        trim = self.trim_m
        held = state.held
        for i, p in enumerate(pings):
            if p.ts < state.last_ts:
                res.rejected.append((i, "out_of_order"))
                continue
            if p.ts == state.last_ts and p.lat == state.last_lat and p.lon == state.last_lon:
                res.rejected.append((i, "duplicate"))
                continue
            if state.in_trip and p.ts - state.last_ts <= self.gap_s:
                # An impossible jump within a trip (spoofed or broken fix). The state keeps the last good
                # ping, so the allowed jump grows with time and a device that really moved is accepted
                # again after at most jump / TELEPORT_SPEED_MPS seconds (or after gap_s, a new trip).
                jump = distance_m(state.last_lat, state.last_lon, p.lat, p.lon)
                if jump > TELEPORT_MIN_M and jump > TELEPORT_SPEED_MPS * (p.ts - state.last_ts):
                    res.rejected.append((i, "teleport"))
                    continue
            if state.in_trip and p.ts - state.last_ts > self.gap_s:
                res.trimmed += self._end_trip(state)
                res.trips_ended += 1
            if not state.in_trip:
                state.start_lat, state.start_lon, state.left_start = p.lat, p.lon, trim <= 0
            state.last_ts, state.last_lat, state.last_lon = p.ts, p.lat, p.lon
            if not state.left_start:
                if distance_m(state.start_lat, state.start_lon, p.lat, p.lon) < trim:
                    res.trimmed += 1
                    continue
                state.left_start = True
            if trim <= 0:
                res.released.append(p)
                continue
            # release, oldest first, the held pings the device has now moved trim_m away from
            k = 0
            while k < len(held) and distance_m(held[k].lat, held[k].lon, p.lat, p.lon) >= trim:
                k += 1
            if k:
                res.released.extend(held[:k])
                del held[:k]
            held.append(p)
            if len(held) > MAX_HELD_PINGS:
                del held[0]
                res.trimmed += 1
        return res

    def finish(self, state: TripTrimState) -> int:
        """End the device's trip (idle for ``gap_s``): discard the held tail; returns pings discarded."""
        return self._end_trip(state)

    @staticmethod
    def _end_trip(state: TripTrimState) -> int:
        n = len(state.held)
        state.held.clear()
        state.last_ts = -math.inf
        state.last_lat = state.last_lon = state.start_lat = state.start_lon = math.nan
        state.left_start = False
        return n
