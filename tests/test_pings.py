"""Ping validation: every bad record is rejected with a specific, bounded reason; good ones pass."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geo.pings import REJECT_REASONS, PingRejected, parse_ping, parse_timestamp
from simulator.formats import ReadReport, read_pings, write_pings

NOW = 1_790_000_000.0  # 2026-09-21
GOOD = {"device": "dev-1", "ts": NOW - 10, "lat": 60.17, "lon": 24.94}


def test_good_ping_roundtrip() -> None:
    p = parse_ping({**GOOD, "accuracy_m": "12.5", "speed_mps": 8, "heading_deg": 90}, now=NOW)
    assert (p.device, p.ts, p.lat, p.lon, p.accuracy_m, p.speed_mps, p.heading_deg) == (
        "dev-1", NOW - 10, 60.17, 24.94, 12.5, 8.0, 90.0)


@pytest.mark.parametrize(
    "patch,reason",
    [
        ({"lat": float("nan")}, "not_finite"),
        ({"lon": float("inf")}, "not_finite"),
        ({"lat": 91.0}, "lat_out_of_range"),
        ({"lon": -180.5}, "lon_out_of_range"),
        ({"lat": "north"}, "bad_type"),
        ({"lat": True}, "bad_type"),
        ({"lat": None}, "missing_field"),
        ({"ts": None}, "missing_field"),
        ({"ts": 0}, "ts_too_old"),  # 1970
        ({"ts": NOW + 365 * 86400}, "ts_in_future"),  # next year
        ({"ts": NOW - 30 * 86400}, "ts_too_old"),
        ({"ts": "yesterday"}, "bad_timestamp"),
        ({"ts": "2026-09-21T10:00:00"}, "bad_timestamp"),  # no UTC offset
        ({"device": ""}, "missing_field"),
        ({"device": "x" * 500}, "bad_device"),
        ({"device": "a\x00b"}, "bad_device"),
        ({"device": ["list"]}, "bad_device"),
        ({"accuracy_m": -1}, "bad_accuracy"),
        ({"speed_mps": 500}, "bad_speed"),
        ({"heading_deg": 400}, "bad_heading"),
    ],
)
def test_bad_fields_are_rejected_with_reason(patch: dict, reason: str) -> None:
    with pytest.raises(PingRejected) as info:
        parse_ping({**GOOD, **patch}, now=NOW)
    assert info.value.reason == reason
    # details never echo the device id or coordinates
    assert "dev-1" not in str(info.value) and "60.17" not in str(info.value)


def test_not_an_object() -> None:
    with pytest.raises(PingRejected) as info:
        parse_ping([1, 2, 3], now=NOW)  # type: ignore[arg-type]
    assert info.value.reason == "not_an_object"


def test_timestamps_rfc3339_and_millis() -> None:
    assert parse_timestamp("2026-09-21T10:00:00Z") == parse_timestamp("2026-09-21T12:00:00+02:00")
    assert parse_timestamp(1_790_000_000_123) == pytest.approx(1_790_000_000.123)
    assert parse_timestamp("1790000000.5") == 1_790_000_000.5


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["device", "ts", "lat", "lon", "accuracy_m", "speed_mps", "heading_deg", "junk"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30),
                                 st.lists(st.integers(), max_size=3))))
def test_arbitrary_records_never_crash(raw: dict) -> None:
    try:
        p = parse_ping(raw, now=NOW)
    except PingRejected as exc:
        assert exc.reason in REJECT_REASONS
    else:
        assert math.isfinite(p.lat) and -90 <= p.lat <= 90 and -180 <= p.lon <= 180
        assert NOW - 7 * 86400 <= p.ts <= NOW + 300


_junk = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**45), st.floats(allow_nan=True, allow_infinity=True),
                 st.sampled_from(["", "12", "nan", "x"]))


def _around(low: float, high: float) -> st.SearchStrategy:
    """Numbers in and just outside [low, high] (both types, the bounds themselves), sometimes junk."""
    span = high - low
    return st.one_of(st.floats(low - 0.1 * span, high + 0.1 * span), st.integers(int(low) - 5, int(high) + 5),
                     st.sampled_from([low, high, low - 1e-9, high + 1e-9]), _junk)


_FIELDS = {
    "device": st.one_of(st.none(), st.integers(0, 99), st.text(max_size=140), _junk),
    "ts": st.one_of(st.floats(NOW - 9 * 24 * 3600, NOW + 900), st.floats(NOW * 1000 - 1e6, NOW * 1000 + 1e6),
                    st.integers(int(NOW) - 9 * 24 * 3600, int(NOW) + 900), _junk),
    "lat": _around(-90.0, 90.0), "lon": _around(-180.0, 180.0), "accuracy_m": _around(0.0, 10_000.0),
    "speed_mps": _around(0.0, 150.0), "heading_deg": _around(0.0, 360.0),
}


_one_field = st.sampled_from(sorted(_FIELDS)).flatmap(lambda k: _FIELDS[k].map(lambda v: {k: v}))


@given(st.lists(_one_field, max_size=2).map(lambda ds: {k: v for d in ds for k, v in d.items()}), st.integers(0, 10),
       st.sampled_from([None, NOW]), st.sampled_from([None, "key-device"]))
@settings(max_examples=1000, deadline=None)
def test_fast_path_decides_like_the_full_validator(patch: dict, keep: int, now: float | None,
                                                   device: str | None) -> None:
    """A plain dict takes a shortcut for the common case; a read-only mapping of the same fields takes the
    full path. Both must accept the same records with the same values, and reject the same ones.
    Records are a good ping with a few fields replaced (in or near their range, or junk) or left out."""
    from types import MappingProxyType

    good = {**GOOD, "accuracy_m": 10.0, "speed_mps": 12.0, "heading_deg": 90.0}
    raw = {k: v for i, (k, v) in enumerate(good.items()) if i != keep} | patch

    def outcome(record):
        try:
            return parse_ping(record, now=now, device=device)
        except PingRejected as exc:
            return exc.reason

    assert outcome(dict(raw)) == outcome(MappingProxyType(dict(raw)))


def test_files_count_every_bad_row(tmp_path: Path) -> None:
    lines = [
        json.dumps(GOOD),
        "{not json",
        json.dumps({**GOOD, "lat": 123}),
        json.dumps({"device": "dev-2", "pings": [{"ts": NOW, "lat": 60.1, "lon": 24.9}, {"ts": NOW, "lat": "x", "lon": 24.9}]}),
        json.dumps({"device": "dev-3", "pings": []}),
        json.dumps([1, 2]),
        "",
    ]
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines))
    report = ReadReport()
    pings = list(read_pings(path, report))
    assert [p.device for p in pings] == ["dev-1", "dev-2"]
    assert report.accepted == 2
    assert report.rejected == {"malformed_json": 1, "lat_out_of_range": 1, "bad_type": 1, "empty_batch": 1, "not_an_object": 1}
    assert report.rows == report.accepted + report.n_rejected


def test_csv_roundtrip_and_bad_rows(tmp_path: Path) -> None:
    good = [parse_ping({**GOOD, "ts": NOW + i, "accuracy_m": 5.0}) for i in range(3)]
    path = tmp_path / "p.csv"
    assert write_pings(path, good) == 3
    with open(path, "a") as fh:
        fh.write("dev-9,not-a-time,60.1,24.9,,,\n")
        fh.write("dev-9,1790000000,60.1,24.9,,,,extra\n")
    report = ReadReport()
    assert list(read_pings(path, report)) == good
    assert report.rejected == {"bad_timestamp": 1, "bad_type": 1}


def test_empty_and_headerless_files(tmp_path: Path) -> None:
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert list(read_pings(empty)) == []
    bad_csv = tmp_path / "b.csv"
    bad_csv.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="header lacks"):
        list(read_pings(bad_csv))
    with pytest.raises(ValueError, match="unknown ping file format"):
        list(read_pings(tmp_path / "x.parquet"))
