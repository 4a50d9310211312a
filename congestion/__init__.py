"""From traversals to segment speeds: windows, space-mean speed, free flow, jam levels, privacy gate.

Pure Python/numpy: never imports Kafka, Faust or the web server.

- :mod:`congestion.estimator` -- :class:`SpeedEstimator`: event-time sliding windows (60 s step,
  300 s span, 120 s grace by default), space-mean (harmonic) speed, outlier filter with counted
  reasons, dedupe, k-anonymity gate (k = 3), ``ok`` / ``stale`` / ``no_data`` statuses, state
  persisted with :meth:`SpeedEstimator.state_bytes`.
- :mod:`congestion.freeflow` -- free flow learned as the 85th percentile of off-peak speeds,
  the map prior until a segment has enough off-peak samples from >= k devices.
- :mod:`congestion.quality` -- jam levels and confidence. Jam level from ``r = speed / free_flow``:
  0 if r >= 0.80, 1 if >= 0.65, 2 if >= 0.50, 3 if >= 0.35, 4 if >= 0.15, else 5 (standstill; also
  any speed < 5 km/h). Confidence = ``(1 - exp(-devices / 4)) * 1 / (1 + (cv / 0.5)^2) *
  exp(-age_s / 600)`` with ``cv = stddev / speed`` and ``age_s`` = window end minus the newest
  traversal's exit.
- :mod:`congestion.record` -- :class:`SegmentSpeed`, the feed record; times are epoch seconds UTC;
  no data is ``None``, never a sentinel; sample counts only as bands.
- :mod:`congestion.encoders` -- GeoJSON (RFC 7946) and DATEX II v3 ``ElaboratedDataPublication``.
- :mod:`congestion.evaluation` -- MAE / bias / coverage against the simulator's truth, plots.
"""

from congestion.estimator import AddResult, EstimatorConfig, SpeedBatch, SpeedEstimator, device_keys
from congestion.record import SegmentSpeed

__all__ = ["AddResult", "EstimatorConfig", "SpeedBatch", "SpeedEstimator", "SegmentSpeed", "device_keys"]
