"""Ingest logic without Kafka: decoding + validation, pseudonymisation, trip-end trimming."""

from __future__ import annotations

import json
import math

import pytest

from geo.model import Ping
from streams.ingest import (
    MAX_HELD_PINGS,
    Pseudonymiser,
    TripTrimmer,
    TripTrimState,
    decode_message,
    distance_m,
)

T0 = 1_715_670_000.0  # 2024-05-14 07:00 UTC
LAT, LON = 60.4664, 26.9458  # Kotka


def _ping(dev: str, t: float, north_m: float, **kw) -> Ping:
    return Ping(dev, T0 + t, LAT + north_m / 111_194.9, LON, **kw)


def test_decode_batch_keeps_valid_pings_and_dead_letters_the_rest() -> None:
    value = json.dumps({"device": "phone-1", "pings": [
        {"ts": T0, "lat": LAT, "lon": LON},
        {"ts": T0 + 1, "lat": 95.0, "lon": LON},          # latitude out of range
        {"ts": T0 + 2, "lat": LAT, "lon": "east"},        # bad type
        {"ts": T0 + 3, "lat": LAT, "lon": LON, "speed_mps": 9.5},
    ]}).encode()
    d = decode_message(b"phone-1", value)
    assert [p.ts for p in d.pings] == [T0, T0 + 3] and d.indexes == [0, 3]
    assert {p.device for p in d.pings} == {"phone-1"}
    assert d.n_received == 4
    assert d.dead_letter is not None and d.dead_letter.original == value
    assert [(r.reason, r.index) for r in d.dead_letter.rejections] == [("lat_out_of_range", 1), ("bad_type", 2)]
    headers = dict(d.dead_letter.headers())
    assert headers["reason"] == b"lat_out_of_range" and headers["rejected_pings"] == b"2"
    assert "phone-1" not in headers["rejections"].decode()  # details never carry the device id


@pytest.mark.parametrize("value, reason", [
    (b"\xff\xfe garbage", "malformed_json"),
    (b"[1, 2]", "not_an_object"),
    (b'{"device": "x", "pings": []}', "empty_batch"),
    (b'{"device": "x", "pings": "no"}', "bad_type"),
    (b"x" * 1_000_001, "message_too_large"),
])
def test_decode_rejects_unreadable_messages_whole(value: bytes, reason: str) -> None:
    d = decode_message(b"k", value)
    assert d.pings == [] and d.dead_letter is not None
    assert d.dead_letter.reason == reason and d.dead_letter.original == value
    assert d.dead_letter.rejections[0].index is None


def test_single_ping_message_takes_device_from_key() -> None:
    d = decode_message(b"phone-9", json.dumps({"ts": T0, "lat": LAT, "lon": LON}).encode())
    assert d.dead_letter is None and d.pings[0].device == "phone-9"


def test_pseudonyms_are_keyed_stable_within_an_epoch_and_rotate() -> None:
    day = 86_400.0
    pn = Pseudonymiser("secret-a", day)
    start = math.floor(T0 / day) * day
    a1, a2 = pn.pseudonym("phone-1", start + 10), pn.pseudonym("phone-1", start + day - 1)
    assert a1 == a2 and len(a1) == 16 and "phone" not in a1
    assert pn.pseudonym("phone-1", start + day) != a1  # key rotated at the epoch boundary
    assert pn.pseudonym("phone-2", start + 10) != a1
    assert Pseudonymiser("secret-b", day).pseudonym("phone-1", start + 10) != a1  # keyed
    renamed = pn.apply([Ping("phone-1", start + 10, LAT, LON, 5.0)])
    assert renamed[0].device == a1 and renamed[0].accuracy_m == 5.0


def test_trimmer_drops_trip_start_and_holds_back_the_tail() -> None:
    trim = TripTrimmer(trim_m=200.0, gap_s=120.0)
    st = TripTrimState()
    # a trip driving north at 10 m/s, one ping a second, for 100 s (1 km)
    pings = [_ping("d", t, 10.0 * t) for t in range(101)]
    res = trim.push(st, pings)
    released = res.released
    # start: everything within 200 m of the first ping is dropped
    assert all(distance_m(LAT, LON, p.lat, p.lon) >= 200.0 - 1e-6 for p in released)
    assert res.trimmed == sum(1 for p in pings if distance_m(LAT, LON, p.lat, p.lon) < 200.0)
    # tail: every released ping has a later ping >= 200 m away, the held ones do not
    newest = pings[-1]
    assert all(distance_m(p.lat, p.lon, newest.lat, newest.lon) >= 200.0 for p in released)
    assert all(distance_m(p.lat, p.lon, newest.lat, newest.lon) < 200.0 for p in st.held)
    assert len(released) + len(st.held) + res.trimmed == len(pings)
    assert [p.ts for p in released] == sorted(p.ts for p in released)
    # the trip ends (idle): the held tail is discarded, never released
    assert trim.finish(st) == len([p for p in pings if p not in released]) - res.trimmed
    assert st.held == [] and not st.in_trip


def test_gap_ends_the_trip_and_restarts_trimming() -> None:
    trim = TripTrimmer(trim_m=100.0, gap_s=120.0)
    st = TripTrimState()
    first = [_ping("d", t, 10.0 * t) for t in range(60)]
    second = [_ping("d", 1000 + t, 10.0 * t) for t in range(30)]
    r1 = trim.push(st, first)
    held_before = len(st.held)
    r2 = trim.push(st, second)
    assert r2.trips_ended == 1
    # the first trip's tail was discarded, the second trip's first 100 m trimmed
    assert r2.trimmed == held_before + sum(1 for p in second if distance_m(second[0].lat, second[0].lon, p.lat, p.lon) < 100)
    assert all(p.ts >= T0 + 1000 for p in r2.released) and r1.released


def test_out_of_order_and_duplicate_pings_are_rejected() -> None:
    trim = TripTrimmer(trim_m=0.0, gap_s=120.0)
    st = TripTrimState()
    res = trim.push(st, [_ping("d", 10, 0), _ping("d", 5, 50), _ping("d", 10, 0), _ping("d", 11, 5)])
    assert res.rejected == [(1, "out_of_order"), (2, "duplicate")]
    assert [p.ts - T0 for p in res.released] == [10, 11]  # trim 0: nothing held


def test_held_tail_is_bounded() -> None:
    trim = TripTrimmer(trim_m=200.0, gap_s=1e9)
    st = TripTrimState()
    trim.push(st, [_ping("d", t, 10.0 * t) for t in range(40)])  # leave the start circle
    stuck = [_ping("d", 40 + t, 400.0 + (t % 3)) for t in range(MAX_HELD_PINGS + 50)]  # a long standstill
    res = trim.push(st, stuck)
    assert len(st.held) == MAX_HELD_PINGS and res.trimmed >= 50


def test_trim_state_round_trips() -> None:
    trim = TripTrimmer(trim_m=150.0, gap_s=120.0)
    st = TripTrimState()
    trim.push(st, [_ping("dev", t, 8.0 * t, accuracy_m=4.0 if t % 2 else None, heading_deg=0.0) for t in range(60)])
    back = TripTrimState.from_bytes(st.to_bytes(), "dev")
    assert back == st and back.held
    with pytest.raises(ValueError):
        TripTrimState.from_bytes(b"\x07junk", "dev")
