"""Placeholder: the `events` commands are registered here by their issue."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add this module's sub-commands (none yet)."""
    del subparsers


def _unused(args: argparse.Namespace) -> int:
    return 0
