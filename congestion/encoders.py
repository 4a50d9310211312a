"""Segment speeds for the outside world: GeoJSON (RFC 7946) and DATEX II v3.

- :func:`to_geojson`: a ``FeatureCollection`` of ``LineString`` features, coordinates
  ``[lon, lat]`` rounded to 7 decimals (~1 cm), geometry from the :class:`~geo.network.RoadNetwork`,
  ``properties`` = exactly the record's :meth:`~congestion.record.SegmentSpeed.to_dict` fields,
  feature ``id`` = the segment id.
- :func:`to_datex2`: an ``ElaboratedDataPublication`` (DATEX II v3, ``d2:payload`` root) with, per
  published (``ok``) record, one ``SinglePhysicalQuantity`` holding ``TrafficSpeed``
  (``averageVehicleSpeed`` in km/h, with ``standardDeviation`` and
  ``supplierCalculatedDataQuality`` = confidence in percent) and one holding ``TravelTimeData``
  (``travelTime`` / ``freeFlowTravelTime`` in seconds, ``freeFlowSpeed`` in km/h). Each carries a
  ``LinearLocation`` with the segment id as external reference and its geometry as a GML line
  string (``lat lon`` pairs, as GML with EPSG:4326 orders them). Records with ``no_data`` /
  ``stale`` are not listed: an elaborated-data snapshot says nothing about what it omits.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Any

import numpy as np

from congestion.record import SegmentSpeed, parse_time, rfc3339
from geo.network import RoadNetwork

#: DATEX II v3 namespaces (prefixes as in the standard's examples).
DATEX2_NS: dict[str, str] = {
    "d2": "http://datex2.eu/schema/3/d2Payload",
    "com": "http://datex2.eu/schema/3/common",
    "roa": "http://datex2.eu/schema/3/roadTrafficData",
    "loc": "http://datex2.eu/schema/3/locationReferencing",
    "xsi": "http://www.w3.org/2001/XMLSchema-instance",
}
#: Decimal places of GeoJSON / GML coordinates (1e-7 degrees ~ 1 cm).
COORD_DECIMALS = 7


def _rows_for(records: list[SegmentSpeed], network: RoadNetwork) -> np.ndarray:
    rows = network.index_of([r.segment_id for r in records]) if records else np.zeros(0, dtype=np.int64)
    unknown = [r.segment_id for r, i in zip(records, rows) if i < 0]
    if unknown:
        raise ValueError(f"{len(unknown)} record(s) refer to segments not in this network (e.g. {unknown[0]}); wrong map?")
    return rows


def _coords(network: RoadNetwork, row: int) -> list[list[float]]:
    g = np.round(network.geometry_lonlat(int(row)), COORD_DECIMALS)
    return g.tolist()


def to_geojson(records: Iterable[SegmentSpeed], network: RoadNetwork) -> dict[str, Any]:
    """Records as an RFC 7946 ``FeatureCollection`` (a JSON-ready dict).

    Raises
    ------
    ValueError
        A record's segment is not in ``network``.
    """
    records = list(records)
    rows = _rows_for(records, network)
    features = []
    for r, row in zip(records, rows):
        features.append({
            "type": "Feature",
            "id": r.segment_id,
            "geometry": {"type": "LineString", "coordinates": _coords(network, row)},
            "properties": r.to_dict(),
        })
    return {"type": "FeatureCollection", "features": features}


def _num(v: float, decimals: int = 1) -> str:
    return f"{round(float(v), decimals):.{decimals}f}"


def to_datex2(
    records: Iterable[SegmentSpeed],
    network: RoadNetwork,
    publication_time: float | str | None = None,
    *,
    country: str = "FI",
    national_identifier: str = "roadpulse",
) -> bytes:
    """Records as a DATEX II v3 ``ElaboratedDataPublication``, UTF-8 XML bytes.

    Parameters
    ----------
    records
        Segment speeds; only ``status == "ok"`` ones are encoded.
    network
        Supplies the segments' geometry.
    publication_time
        Epoch seconds or RFC 3339 text; default the newest ``published_at`` of the records
        (the epoch start if there are none, so output stays deterministic).
    country, national_identifier
        ``publicationCreator`` of the publication.

    Raises
    ------
    ValueError
        A record's segment is not in ``network``, or ``publication_time`` is not a time.
    """
    records = list(records)
    ok = [r for r in records if r.status == "ok"]
    rows = _rows_for(ok, network)
    if publication_time is None:
        pub = max((r.published_at for r in records), default=0.0)
    else:
        pub = parse_time(publication_time)
    ns = DATEX2_NS

    def q(prefix: str, tag: str) -> str:
        return f"{{{ns[prefix]}}}{tag}"

    def sub(parent, prefix: str, tag: str, text: str | None = None, **attrs: str):
        el = ET.SubElement(parent, q(prefix, tag), attrs)
        if text is not None:
            el.text = text
        return el

    xsi_type = q("xsi", "type")
    for prefix, uri in ns.items():
        ET.register_namespace(prefix, uri)
    root = ET.Element(q("d2", "payload"), {"lang": "en", "modelBaseVersion": "3"})
    root.set(xsi_type, "roa:ElaboratedDataPublication")
    sub(root, "com", "publicationTime", rfc3339(pub))
    creator = sub(root, "com", "publicationCreator")
    sub(creator, "com", "country", country)
    sub(creator, "com", "nationalIdentifier", national_identifier)
    header = sub(root, "roa", "headerInformation")
    sub(header, "com", "confidentiality", "noRestriction")
    sub(header, "com", "informationStatus", "real")

    def quantity(r: SegmentSpeed, row: int, kind: str):
        pq = sub(root, "roa", "physicalQuantity", id=f"roadpulse-{r.segment_id}-{int(r.window_end)}-{kind}")
        pq.set(xsi_type, "roa:SinglePhysicalQuantity")
        loc = sub(pq, "roa", "pertinentLocation")
        loc.set(xsi_type, "loc:LinearLocation")
        ext = sub(loc, "loc", "externalReferencing")
        sub(ext, "loc", "externalLocationCode", str(r.segment_id))
        sub(ext, "loc", "externalReferencingSystem", f"roadpulse segment id (OSM way {r.osm_way_id}, nodes {r.osm_start_node_id}-{r.osm_end_node_id})")
        line = sub(loc, "loc", "gmlLineString", srsName="EPSG:4326", srsDimension="2")
        pos = np.round(network.geometry_lonlat(int(row)), COORD_DECIMALS)[:, ::-1]
        sub(line, "loc", "posList", " ".join(f"{v:.{COORD_DECIMALS}f}" for v in pos.reshape(-1)))
        basic = sub(pq, "roa", "basicData")
        when = sub(basic, "roa", "measurementOrCalculationTime")
        period = sub(when, "roa", "period")
        sub(period, "com", "startOfPeriod", rfc3339(r.window_start))
        sub(period, "com", "endOfPeriod", rfc3339(r.window_end))
        return basic

    for r, row in zip(ok, rows):
        basic = quantity(r, row, "speed")
        basic.set(xsi_type, "roa:TrafficSpeed")
        avg = sub(basic, "roa", "averageVehicleSpeed",
                  supplierCalculatedDataQuality=_num(r.confidence * 100.0))
        if r.speed_stddev_kmh is not None:
            avg.set("standardDeviation", _num(r.speed_stddev_kmh))
        sub(avg, "com", "speed", _num(r.speed_kmh))

        basic = quantity(r, row, "traveltime")
        basic.set(xsi_type, "roa:TravelTimeData")
        sub(basic, "roa", "travelTimeType", "reconstituted")
        tt = sub(basic, "roa", "travelTime", supplierCalculatedDataQuality=_num(r.confidence * 100.0))
        sub(tt, "roa", "duration", _num(r.travel_time_s))
        fftt = sub(basic, "roa", "freeFlowTravelTime")
        sub(fftt, "roa", "duration", _num(r.free_flow_travel_time_s))
        ffs = sub(basic, "roa", "freeFlowSpeed")
        sub(ffs, "com", "speed", _num(r.free_flow_speed_kmh))
    ET.indent(root)
    return ET.tostring(root, xml_declaration=True, encoding="UTF-8")
