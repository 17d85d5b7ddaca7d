"""``edgegw provision ...``: the provisioning commands with the gateway's configuration rules."""

from __future__ import annotations

import argparse
import sys

from gateway import __version__
from gateway.release_check import RULES
from provisioning import cli


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``provision`` and its subcommands (make, verify and apply judge
    configurations by :data:`gateway.release_check.RULES`)."""
    cli.register(subparsers, rules=RULES, software_version=__version__)


def main(argv: list[str] | None = None) -> int:
    """``provision ...`` alone, as ``edgegw`` runs it."""
    parser = argparse.ArgumentParser(prog="edgegw")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
