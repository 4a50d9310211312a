"""Road geometry: OSM maps into a road network, spatial queries, and the online map matcher.

Pure Python/numpy: never imports Kafka, Faust or the web server.
"""

from geo.model import Ping, Segment, Traversal
from geo.network import MapLoadError, Nearby, RoadNetwork, load_network, segment_id_for

__all__ = ["Ping", "Segment", "Traversal", "RoadNetwork", "Nearby", "MapLoadError", "load_network", "segment_id_for"]

from geo.bundled import OSM_ATTRIBUTION, bundled_map, resolve_map  # noqa: E402

__all__ += ["OSM_ATTRIBUTION", "bundled_map", "resolve_map"]
