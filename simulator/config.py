"""What a simulated day is made of: demand, traffic model, phones, incidents.

Every knob of :func:`simulator.simulate_day` lives in one frozen :class:`SimulationConfig`
(with a nested :class:`PhoneModel` for the probes and a tuple of :class:`Incident` s), so a
configuration plus a map plus a seed determines the output byte for byte.

Times of day are seconds after local midnight of ``date``; ``utc_offset_h`` places that midnight
on the UTC epoch axis (default 0: local time = UTC).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

#: Share of a weekday's car trips departing in each hour 0..23 (weights, any scale):
#: a night lull, an AM peak at 07-09 and a broader PM peak at 15-18, as in typical European
#: urban traffic counts.
WEEKDAY_PROFILE: tuple[float, ...] = (
    0.8, 0.5, 0.4, 0.4, 0.6, 1.5, 4.0, 7.5, 8.0, 5.5, 4.8, 5.0,
    5.3, 5.2, 5.5, 6.5, 8.0, 8.5, 6.5, 4.5, 3.2, 2.5, 1.8, 1.2,
)

#: Car trips per day per km of directed road when ``trips_per_day`` is not given (about 140k on
#: Liechtenstein's 690 km: a country of ~40k people with heavy commuter traffic).
DEFAULT_TRIPS_PER_KM: float = 200.0

#: Vehicles per hour a segment carries at BPR "practical capacity", per road class (all lanes of
#: one direction). Roughly HCM/Finnish planning values for roads with junctions.
CAPACITY_VPH: dict[str, float] = {
    "motorway": 3800.0, "motorway_link": 1500.0,
    "trunk": 2800.0, "trunk_link": 1300.0,
    "primary": 1700.0, "primary_link": 1100.0,
    "secondary": 1300.0, "secondary_link": 900.0,
    "tertiary": 900.0, "tertiary_link": 700.0,
    "unclassified": 600.0, "residential": 500.0, "road": 500.0,
    "living_street": 250.0, "service": 250.0,
}


@dataclass(frozen=True, slots=True)
class Incident:
    """A lane closure or slowdown on some segments for a time span.

    Parameters
    ----------
    segment_ids
        Stable ids of the affected segments.
    start_s, end_s
        Seconds after local midnight of the simulated date during which the incident is active.
    factor
        Multiplies both the free-flow speed and the capacity of the segments while active, in
        (0, 1]: 0.5 is "one of two lanes closed, traffic crawls past".
    """

    segment_ids: tuple[int, ...]
    start_s: float
    end_s: float
    factor: float

    def __post_init__(self) -> None:
        if not self.segment_ids:
            raise ValueError("an incident needs at least one segment id")
        if not self.end_s > self.start_s:
            raise ValueError("an incident must end after it starts")
        if not 0.0 < self.factor <= 1.0:
            raise ValueError("incident factor must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class PhoneModel:
    """How probe phones sample, err and upload.

    Parameters
    ----------
    sigma_m
        Standard deviation of the Gaussian position error per axis (east, north), metres.
    outlier_rate
        Share of fixes that are outliers (multipath jumps), 0..1.
    outlier_m
        Range of outlier error magnitudes, metres (uniform, random direction).
    canyon_bias_m
        Largest urban-canyon bias, metres: a spatially smooth error field (250 m cells,
        bilinear) that shifts every fix in a street the same way.
    canyon_share
        Share of the map's cells that have a canyon bias, 0..1.
    interval_s
        Nominal sampling interval, seconds (1..60).
    jitter_s
        Standard deviation of the interval around ``interval_s``, seconds.
    dropout_rate
        Share of single fixes lost, 0..1.
    gaps_per_hour
        Rate of longer signal gaps (tunnels, app in background) per hour of driving.
    gap_s
        Range of gap durations, seconds.
    upload_interval_s
        A phone uploads its buffered fixes every this many seconds (one batch per upload).
    clock_skew_sd_s
        Standard deviation of each device's constant clock offset, seconds.
    accuracy_report
        Whether fixes carry ``accuracy_m``, ``speed_mps`` and ``heading_deg`` like a phone's
        location API.
    """

    sigma_m: float = 8.0
    outlier_rate: float = 0.01
    outlier_m: tuple[float, float] = (40.0, 250.0)
    canyon_bias_m: float = 6.0
    canyon_share: float = 0.3
    interval_s: float = 5.0
    jitter_s: float = 0.5
    dropout_rate: float = 0.02
    gaps_per_hour: float = 1.0
    gap_s: tuple[float, float] = (20.0, 120.0)
    upload_interval_s: float = 30.0
    clock_skew_sd_s: float = 0.3
    accuracy_report: bool = True

    def __post_init__(self) -> None:
        if not 1.0 <= self.interval_s <= 60.0:
            raise ValueError("interval_s must be within 1..60 s")
        for name in ("outlier_rate", "dropout_rate", "canyon_share"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")
        if self.sigma_m < 0 or self.canyon_bias_m < 0 or self.jitter_s < 0 or self.clock_skew_sd_s < 0:
            raise ValueError("sigma_m, canyon_bias_m, jitter_s and clock_skew_sd_s must be >= 0")
        if self.upload_interval_s <= 0:
            raise ValueError("upload_interval_s must be > 0")


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """A simulated traffic day.

    Parameters
    ----------
    hours
        Length of the simulated span, hours. Trips departing in it are driven to the end.
    start_s
        Start of the span, seconds after local midnight.
    date
        Calendar date (ISO) of the day; fixed by default so outputs are reproducible.
    utc_offset_h
        Local time minus UTC, hours (the demand profile is in local time).
    seed
        Seed of every random draw.
    trips_per_day
        Car trips over a whole day; ``None``: :data:`DEFAULT_TRIPS_PER_KM` times the network's
        directed km.
    probe_share
        Share of vehicles that carry a probe phone (penetration), 0..1.
    demand_profile
        24 hourly weights of departures (local time); normalised internally.
    incidents
        Scripted lane closures / slowdowns.
    step_s
        Time step of the traffic model, seconds: travel times are updated every step.
    reroute_s
        Routes are computed on current travel times for the departures of each such period.
    warmup_s
        Traffic simulated before ``start_s`` so the span does not begin on empty roads. Warm-up
        vehicles count in the segment truth but are never probes and have no truth path.
    bpr_alpha, bpr_beta
        BPR volume-delay: ``t = t0 * (1 + alpha * (q / c) ** beta)``. The default alpha is the
        urban-road value (0.5; 0.15 is the original motorway one): junctions make town roads slow
        down well before capacity.
    flow_tau_s
        Time constant of the exponential smoothing of segment inflow, seconds.
    free_flow_share
        Drivers' free-flow speed as a share of the segment's limit.
    driver_sd
        Spread of drivers' speed preference (multiplicative, standard deviation).
    traversal_sd
        Spread of each single segment passage (signals, turning), lognormal sigma.
    min_speed_kmh
        Floor of congested speeds, km/h.
    min_trip_m
        Shortest straight-line trip, metres.
    trip_scale_m
        Gravity-model distance decay of destinations, metres.
    max_zones
        Origins/destinations are drawn among at most this many nodes (routing cost scales with it).
    through_share
        Share of trip ends at gateways, where bigger roads leave the map (traffic from and to the
        world outside the extract), 0..1.
    windows_s
        Window sizes of the segment ground truth, seconds.
    phones
        The probe phone model.
    """

    hours: float = 24.0
    start_s: float = 0.0
    date: str = "2024-05-14"
    utc_offset_h: float = 0.0
    seed: int = 0
    trips_per_day: int | None = None
    probe_share: float = 0.05
    demand_profile: tuple[float, ...] = WEEKDAY_PROFILE
    incidents: tuple[Incident, ...] = ()
    step_s: float = 10.0
    reroute_s: float = 900.0
    warmup_s: float = 900.0
    bpr_alpha: float = 0.5
    bpr_beta: float = 4.0
    flow_tau_s: float = 300.0
    free_flow_share: float = 0.95
    driver_sd: float = 0.07
    traversal_sd: float = 0.10
    min_speed_kmh: float = 3.0
    min_trip_m: float = 600.0
    trip_scale_m: float = 4000.0
    max_zones: int = 400
    through_share: float = 0.25
    windows_s: tuple[int, ...] = (60, 300)
    phones: PhoneModel = field(default_factory=PhoneModel)

    def __post_init__(self) -> None:
        if not 0.0 < self.hours <= 24.0 * 7:
            raise ValueError("hours must be in (0, 168]")
        if not 0.0 <= self.probe_share <= 1.0:
            raise ValueError("probe_share must be in [0, 1]")
        if len(self.demand_profile) != 24 or min(self.demand_profile) < 0 or sum(self.demand_profile) <= 0:
            raise ValueError("demand_profile needs 24 non-negative hourly weights, not all zero")
        if self.trips_per_day is not None and self.trips_per_day < 0:
            raise ValueError("trips_per_day must be >= 0")
        if not 0.5 <= self.step_s <= 60.0:
            raise ValueError("step_s must be within 0.5..60 s")
        if not self.windows_s or any(int(w) <= 0 for w in self.windows_s):
            raise ValueError("windows_s must be positive window sizes")
        if not 0.0 <= self.through_share < 1.0:
            raise ValueError("through_share must be in [0, 1)")
        if self.reroute_s <= 0 or self.warmup_s < 0:
            raise ValueError("reroute_s must be > 0 and warmup_s >= 0")
        day_epoch(self.date, self.utc_offset_h)  # validates the date

    @property
    def day_start_epoch_s(self) -> float:
        """Epoch seconds of local midnight of ``date``."""
        return day_epoch(self.date, self.utc_offset_h)

    @property
    def start_epoch_s(self) -> float:
        """Epoch seconds of the start of the simulated span."""
        return self.day_start_epoch_s + self.start_s

    @property
    def end_epoch_s(self) -> float:
        """Epoch seconds of the end of the simulated span (last departures)."""
        return self.start_epoch_s + self.hours * 3600.0


def day_epoch(date: str, utc_offset_h: float = 0.0) -> float:
    """Epoch seconds of local midnight of an ISO date (``YYYY-MM-DD``)."""
    try:
        d = datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"date {date!r} is not YYYY-MM-DD") from None
    return d.timestamp() - utc_offset_h * 3600.0


_CLOCK = re.compile(r"^(\d{1,3}):(\d{2})(?::(\d{2}))?$")


def parse_clock(text: str) -> float:
    """``HH:MM`` or ``HH:MM:SS`` (hours may exceed 23 for the next day) to seconds after midnight."""
    m = _CLOCK.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a time of day HH:MM[:SS]")
    h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if mi >= 60 or s >= 60:
        raise ValueError(f"{text!r} is not a time of day HH:MM[:SS]")
    return h * 3600.0 + mi * 60.0 + s


def parse_incident(text: str) -> Incident:
    """An incident from ``SEGMENT_ID[+SEGMENT_ID...]:HH:MM:HH:MM:FACTOR`` (the CLI form).

    Examples: ``123456789:07:30:08:15:0.3`` (one segment, 07:30-08:15, speed and capacity x0.3),
    ``11+12:17:00:17:45:0.5``.
    """
    parts = text.strip().split(":")
    if len(parts) != 6:
        raise ValueError(
            f"incident {text!r}: expected SEGMENT_ID[+SEGMENT_ID...]:HH:MM:HH:MM:FACTOR, e.g. 1234:07:30:08:15:0.3"
        )
    try:
        ids = tuple(int(s) for s in parts[0].split("+") if s)
        factor = float(parts[5])
    except ValueError:
        raise ValueError(f"incident {text!r}: segment ids must be integers and FACTOR a number") from None
    start = parse_clock(f"{parts[1]}:{parts[2]}")
    end = parse_clock(f"{parts[3]}:{parts[4]}")
    return Incident(ids, start, end, factor)
