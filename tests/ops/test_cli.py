"""The command line: help, clear errors for bad settings."""

from __future__ import annotations

import os
import subprocess
import sys

from ops.cli import build_parser


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=os.environ | (env or {}),
    )


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("up", "service", "gateway"):
        assert command in result.stdout


def test_bad_setting_stops_with_one_line_naming_the_variable() -> None:
    result = run("gateway", env={"STOCKPILOT_HTTP_PORT": "eighty"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "STOCKPILOT_HTTP_PORT" in lines[0]


def test_secret_values_are_not_echoed_in_setting_errors() -> None:
    result = run(
        "gateway", env={"STOCKPILOT_SERVICE_TIMEOUT_S": "x", "STOCKPILOT_ADMIN_TOKEN": "s3cr3t"}
    )
    assert result.returncode == 2
    assert "s3cr3t" not in result.stderr


def test_parser_knows_service_names() -> None:
    args = build_parser().parse_args(["service", "usage"])
    assert args.name == "usage"
