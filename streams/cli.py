"""``roadpulse`` command line: one sub-command per module in :mod:`streams.commands`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from geo.network import RoadNetwork
    from streams.settings import Settings

from streams.commands import demo_cmd, evaluate_cmd, map_cmd, match_cmd, replay_cmd, serve_cmd, simulate_cmd, worker_cmd

#: Sub-command modules, in the order ``--help`` lists them.
COMMANDS = [demo_cmd, map_cmd, match_cmd, simulate_cmd, replay_cmd, evaluate_cmd, serve_cmd, worker_cmd]


class CommandError(Exception):
    """A failure the user can fix: printed as one line, exit code 2, no traceback."""


def load_configured_map(settings: "Settings") -> "RoadNetwork":
    """The road network of ``settings.map`` (bundled name or file), through the network cache.

    Raises
    ------
    CommandError
        The map is missing, not OSM, or has no roads (one line for the user, exit code 2).
    """
    from geo.bundled import resolve_map
    from geo.network import MapLoadError, load_network
    from streams.settings import cache_dir

    try:
        return load_network(resolve_map(settings.map), cache=cache_dir(settings))
    except MapLoadError as exc:
        raise CommandError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roadpulse",
        description="Crowdsourced traffic sensing: pings -> map matching -> live segment speeds.",
    )
    parser.add_argument("--config", help="TOML settings file (also $ROADPULSE_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("roadpulse: interrupted", file=sys.stderr)
        return 130
    except (CommandError, OSError, ValueError) as exc:
        print(f"roadpulse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the user gets one line; --verbose shows the traceback
        if args.verbose:
            raise
        name = type(exc).__name__
        print(f"roadpulse {args.command}: error: {name}: {exc} (run with -v for details)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
