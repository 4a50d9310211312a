"""SegmentSpeed wire form, GeoJSON (RFC 7946) and DATEX II v3 encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lxml import etree

from congestion.encoders import DATEX2_NS, to_datex2, to_geojson
from congestion.estimator import SpeedEstimator
from congestion.record import FIELD_NAMES, SegmentSpeed, parse_time, rfc3339, sample_band
from geo.model import Traversal

BASE = 28_594_500 * 60.0


@pytest.fixture(scope="module")
def published(helsinki):
    """Real records from the estimator: ok ones on several segments, then stale / no_data."""
    rng = np.random.default_rng(7)
    rows = np.flatnonzero(helsinki.length_m > 60)[:8]
    trs = []
    for row in rows:
        for i in range(5):
            v = float(rng.uniform(15, 45))
            t = BASE + 100 + 7 * i
            trs.append(Traversal(int(helsinki.segment_ids[row]), f"dev{i}", t - helsinki.length_m[row] / (v / 3.6), t))
    est = SpeedEstimator(helsinki)
    est.add(trs)
    return est.advance(BASE + 7200, now_s=BASE + 7201)


def test_record_round_trip_and_closed_schema(published):
    statuses = {r.status for r in published}
    assert statuses == {"ok", "stale", "no_data"}
    for r in published:
        d = r.to_dict()
        assert tuple(d) == FIELD_NAMES
        assert SegmentSpeed.from_dict(json.loads(json.dumps(d, allow_nan=False))) == r
    d = published[0].to_dict()
    with pytest.raises(ValueError, match="unknown"):
        SegmentSpeed.from_dict({**d, "device": "x"})
    with pytest.raises(ValueError, match="missing"):
        SegmentSpeed.from_dict({k: v for k, v in d.items() if k != "speed_kmh"})
    with pytest.raises(ValueError, match="no speed"):
        SegmentSpeed.from_dict({**d, "status": "no_data"})
    with pytest.raises(ValueError, match="band"):
        SegmentSpeed.from_dict({**d, "sample_count": "7"})
    # Times travel as epoch seconds; RFC 3339 text is accepted on input too.
    r = SegmentSpeed.from_dict({**d, "window_start": rfc3339(d["window_start"])})
    assert r.window_start == d["window_start"]
    assert parse_time("2024-05-14T07:00:00Z") == BASE
    assert [sample_band(n) for n in (1, 3, 4, 5, 19, 100, 5000)] == ["1-2", "3-4", "3-4", "5-9", "10-19", "100+", "100+"]


def test_geojson_is_rfc7946(published, helsinki):
    fc = to_geojson(published, helsinki)
    text = json.dumps(fc, allow_nan=False)
    back = json.loads(text)
    assert set(back) == {"type", "features"} and back["type"] == "FeatureCollection"
    lo = helsinki.node_lonlat.min(axis=0)
    hi = helsinki.node_lonlat.max(axis=0)
    assert len(back["features"]) == len(published)
    for f, r in zip(back["features"], published):
        assert set(f) == {"type", "id", "geometry", "properties"} and f["type"] == "Feature"
        assert f["id"] == r.segment_id
        assert set(f["properties"]) == set(FIELD_NAMES)  # closed schema: the record, nothing else
        g = f["geometry"]
        assert g["type"] == "LineString" and len(g["coordinates"]) >= 2
        for lon, lat in g["coordinates"]:
            # [lon, lat] order: Helsinki is at ~24.9 E, 60.2 N, so swapped pairs would fall outside.
            assert lo[0] - 1e-6 <= lon <= hi[0] + 1e-6 and lo[1] - 1e-6 <= lat <= hi[1] + 1e-6
            assert round(lon, 7) == lon and round(lat, 7) == lat
        row = int(helsinki.index_of(r.segment_id)[0])
        assert g["coordinates"][0] == pytest.approx(helsinki.geometry_lonlat(row)[0].tolist(), abs=1e-7)
    with pytest.raises(ValueError, match="not in this network"):
        to_geojson([SegmentSpeed.from_dict({**published[0].to_dict(), "segment_id": 1})], helsinki)


def test_datex2_is_well_formed_with_expected_elements_and_units(published, helsinki):
    xml = to_datex2(published, helsinki)
    root = etree.fromstring(xml)
    ns = DATEX2_NS
    xsi_type = f"{{{ns['xsi']}}}type"
    assert root.tag == f"{{{ns['d2']}}}payload"
    assert root.get(xsi_type) == "roa:ElaboratedDataPublication"
    assert root.get("modelBaseVersion") == "3"
    assert root.findtext("com:publicationTime", namespaces=ns) == rfc3339(BASE + 7201)
    ok = [r for r in published if r.status == "ok"]
    quantities = root.findall("roa:physicalQuantity", ns)
    assert len(quantities) == 2 * len(ok)
    ids = [q.get("id") for q in quantities]
    assert len(set(ids)) == len(ids)
    speeds = root.findall("roa:physicalQuantity/roa:basicData[@xsi:type='roa:TrafficSpeed']", ns)
    travel = root.findall("roa:physicalQuantity/roa:basicData[@xsi:type='roa:TravelTimeData']", ns)
    assert len(speeds) == len(travel) == len(ok)
    for r, s, t in zip(ok, speeds, travel):
        # km/h in com:speed, seconds in roa:duration, periods in RFC 3339 UTC.
        assert float(s.findtext("roa:averageVehicleSpeed/com:speed", namespaces=ns)) == pytest.approx(r.speed_kmh, abs=0.05)
        assert float(t.findtext("roa:travelTime/roa:duration", namespaces=ns)) == pytest.approx(r.travel_time_s, abs=0.05)
        assert float(t.findtext("roa:freeFlowTravelTime/roa:duration", namespaces=ns)) == pytest.approx(r.free_flow_travel_time_s, abs=0.05)
        assert float(t.findtext("roa:freeFlowSpeed/com:speed", namespaces=ns)) == pytest.approx(r.free_flow_speed_kmh, abs=0.05)
        period = s.find("roa:measurementOrCalculationTime/roa:period", ns)
        assert period.findtext("com:startOfPeriod", namespaces=ns) == rfc3339(r.window_start)
        assert period.findtext("com:endOfPeriod", namespaces=ns) == rfc3339(r.window_end)
        assert 0 <= float(s.find("roa:averageVehicleSpeed", ns).get("supplierCalculatedDataQuality")) <= 100
    loc = quantities[0].find("roa:pertinentLocation", ns)
    assert loc.get(xsi_type) == "loc:LinearLocation"
    assert loc.findtext("loc:externalReferencing/loc:externalLocationCode", namespaces=ns) == str(ok[0].segment_id)
    pos = [float(v) for v in loc.findtext("loc:gmlLineString/loc:posList", namespaces=ns).split()]
    row = int(helsinki.index_of(ok[0].segment_id)[0])
    lat, lon = pos[0], pos[1]  # GML EPSG:4326 order is lat lon
    assert (lon, lat) == pytest.approx(tuple(helsinki.geometry_lonlat(row)[0]), abs=1e-7)
    # No published speeds: still a valid, empty publication.
    empty = etree.fromstring(to_datex2([], helsinki, publication_time=BASE))
    assert empty.findall("roa:physicalQuantity", ns) == []
