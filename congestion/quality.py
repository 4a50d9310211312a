"""Jam levels and confidence: how congested a segment is and how sure the estimate is.

Jam level (0..5) from the ratio ``r = speed / free_flow_speed``:

======  ==================  =====================================
level   ratio ``r``          meaning
======  ==================  =====================================
0       r >= 0.80            free flow
1       0.65 <= r < 0.80     light slowdown
2       0.50 <= r < 0.65     moderate congestion
3       0.35 <= r < 0.50     heavy congestion
4       0.15 <= r < 0.35     queuing, stop-and-go
5       r < 0.15             standstill (also any speed < 5 km/h)
======  ==================  =====================================

Confidence (0..1) is the product of three factors, each in (0, 1]:

- sample size: ``1 - exp(-n_devices / 4)`` (3 devices 0.53, 5: 0.71, 10: 0.92, 20: 0.99);
- spread: ``1 / (1 + (cv / 0.5) ** 2)`` with ``cv = speed_stddev / speed`` (0.2: 0.86, 0.5: 0.5);
- age: ``exp(-age_s / 600)`` with ``age_s`` = window end minus the newest traversal's exit time
  (30 s: 0.95, 4 min: 0.67).

Pure functions on numpy arrays (scalars work too).
"""

from __future__ import annotations

import numpy as np

#: Lower ratio bound of jam levels 0..4 (level 5 is everything below the last bound).
JAM_THRESHOLDS: tuple[float, ...] = (0.80, 0.65, 0.50, 0.35, 0.15)
#: Any speed below this is standstill (level 5) whatever the free-flow speed, km/h.
STANDSTILL_KMH = 5.0
#: Devices at which the sample-size factor reaches 1 - 1/e.
CONFIDENCE_DEVICES = 4.0
#: Coefficient of variation at which the spread factor is 0.5.
CONFIDENCE_CV = 0.5
#: Age (seconds) at which the age factor is 1/e.
CONFIDENCE_AGE_S = 600.0


def jam_level(speed_kmh: np.ndarray | float, free_flow_kmh: np.ndarray | float) -> np.ndarray:
    """Jam level 0 (free flow) ... 5 (standstill) per element, int8.

    Parameters
    ----------
    speed_kmh
        Space-mean speed, km/h (finite).
    free_flow_kmh
        Free-flow speed, km/h (> 0).
    """
    speed = np.asarray(speed_kmh, dtype=float)
    ratio = speed / np.asarray(free_flow_kmh, dtype=float)
    # Count how many thresholds the ratio falls below: 0 for free flow ... 5 below all of them.
    level = np.zeros(np.broadcast(speed, ratio).shape, dtype=np.int8)
    for bound in JAM_THRESHOLDS:
        level += ratio < bound
    return np.where(speed < STANDSTILL_KMH, np.int8(5), level).astype(np.int8)


def confidence(
    n_devices: np.ndarray | float,
    speed_kmh: np.ndarray | float,
    speed_stddev_kmh: np.ndarray | float,
    age_s: np.ndarray | float,
) -> np.ndarray:
    """Confidence 0..1 of a segment-window estimate (see the module docstring), rounded to 3 decimals.

    Parameters
    ----------
    n_devices
        Distinct devices that contributed.
    speed_kmh, speed_stddev_kmh
        The estimate and the spread of traversal speeds, km/h.
    age_s
        Window end minus the newest contributing traversal's exit time, seconds (>= 0).
    """
    n = np.asarray(n_devices, dtype=float)
    speed = np.asarray(speed_kmh, dtype=float)
    cv = np.asarray(speed_stddev_kmh, dtype=float) / np.maximum(speed, 1e-9)
    age = np.maximum(np.asarray(age_s, dtype=float), 0.0)
    c = (1.0 - np.exp(-n / CONFIDENCE_DEVICES)) / (1.0 + (cv / CONFIDENCE_CV) ** 2) * np.exp(-age / CONFIDENCE_AGE_S)
    return np.round(np.clip(c, 0.0, 1.0), 3)
