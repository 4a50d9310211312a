"""The one settings object: defaults < config file < environment ``ROADPULSE_*`` < CLI flags.

Every command builds its configuration with :func:`load_settings`; nothing else reads the
environment or config files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Settings:
    """roadpulse configuration. Field ``x`` is set by ``ROADPULSE_X`` in the environment."""

    #: Map: a bundled name (``helsinki``, ``kotka``) or an OSM file path.
    map: str = "helsinki"
    #: Kafka bootstrap servers, ``host:port[,host:port]``.
    kafka: str = "localhost:9092"
    #: Kafka security: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``.
    kafka_security_protocol: str = "PLAINTEXT"
    #: SASL mechanism when the protocol is ``SASL_*``: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``.
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = ""
    #: CA bundle (PEM file) that signed the brokers' TLS certificates; empty: the system's CAs.
    kafka_ssl_cafile: str = ""
    topic_pings: str = "roadpulse.pings"
    topic_rejected: str = "roadpulse.pings.rejected"
    topic_traversals: str = "roadpulse.traversals"
    topic_segment_speeds: str = "roadpulse.segment-speeds"
    partitions: int = 4
    #: Minimum distinct devices before a segment speed is published.
    k_anonymity: int = 3
    #: Secret for pseudonymising device ids (keyed hash); rotated every ``pseudonym_rotation_s``.
    pseudonym_key: str = "change-me"
    pseudonym_rotation_s: float = 86_400.0
    #: Metres trimmed from the start and end of every trip (privacy).
    trip_trim_m: float = 200.0
    window_step_s: float = 60.0
    window_span_s: float = 300.0
    grace_s: float = 120.0
    max_match_lag_s: float = 30.0
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    #: Bearer token required by the feed when set.
    feed_token: str = ""
    cache_dir: str = ""
    log_level: str = "INFO"
    extra: dict[str, Any] = field(default_factory=dict)


def _coerce(value: str, typ: Any) -> Any:
    if typ in (int, "int"):
        return int(value)
    if typ in (float, "float"):
        return float(value)
    if typ in (bool, "bool"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if typ in (dict, "dict[str, Any]"):
        return json.loads(value)
    return value


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build :class:`Settings` from defaults, a TOML config file, ``ROADPULSE_*`` and overrides.

    Parameters
    ----------
    config_file
        TOML file with top-level keys named like the fields. ``None``: ``$ROADPULSE_CONFIG`` if set.
    overrides
        Values from CLI flags; ``None`` values are ignored (flag not given).
    environ
        Environment to read (default ``os.environ``).

    Raises
    ------
    ValueError
        Unknown keys in the config file, or a value of the wrong type.
    """
    env = os.environ if environ is None else environ
    known = {f.name: f for f in fields(Settings)}
    values: dict[str, Any] = {}
    config_file = config_file or env.get("ROADPULSE_CONFIG")
    if config_file:
        with open(config_file, "rb") as fh:
            data = tomllib.load(fh)
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{config_file}: unknown settings {unknown}")
        values.update(data)
    for name, f in known.items():
        raw = env.get(f"ROADPULSE_{name.upper()}")
        if raw is not None:
            try:
                values[name] = _coerce(raw, f.type)
            except ValueError as exc:
                raise ValueError(f"ROADPULSE_{name.upper()}={raw!r}: {exc}") from None
    for name, value in (overrides or {}).items():
        if value is not None and name in known:
            values[name] = value
    return dataclasses.replace(Settings(), **values)


def cache_dir(settings: Settings) -> Path | bool:
    """Where network caches go: the configured dir, else the library default (``True``)."""
    return Path(settings.cache_dir) if settings.cache_dir else True
