"""The `stockpilot` command: run the stack, one service, the gateway, and the ops tooling.

Each ops module registers its own sub-commands (`register(subparsers)`), so this file only
wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that add sub-commands; each has `register(subparsers) -> None` and sets
# `handler` (a function taking the parsed args and returning an exit status) on its parsers.
COMMAND_MODULES = (
    "ops.stack",
    "ops.events",
    "ops.hooks",
    "ops.demo",
    "ops.nats_info",
)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(
        prog="stockpilot",
        description=(
            "StockPilot Ops: health, LLM usage and batch-job monitoring for StockPilot AI, "
            "event-sourced over NATS JetStream. Settings come from STOCKPILOT_* variables "
            "(see README.md)."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `stockpilot` console script."""
    args = build_parser().parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
