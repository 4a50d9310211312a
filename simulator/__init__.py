"""Synthetic traffic days on real maps with ground truth, GPS error model, ping file formats.

Pure Python/numpy: never imports Kafka, Faust or the web server.

>>> from simulator import SimulationConfig, simulate_day
"""

from simulator.config import Incident, PhoneModel, SimulationConfig, parse_clock, parse_incident
from simulator.day import SimulationResult, simulate_day

__all__ = ["Incident", "PhoneModel", "SimulationConfig", "SimulationResult", "parse_clock", "parse_incident",
           "simulate_day"]
