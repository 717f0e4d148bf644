"""compose.yaml and the Dockerfile agree with the CLI and the settings (Docker is not needed).

Every `stockpilot …` command compose runs must parse with the real CLI, and every variable it
sets for a StockPilot process must be a field of that process's settings: a typo such as
STOCKPILOT_DAILY_BUDGET would otherwise be silently ignored in production.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import io
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from ops import nats_auth
from ops.cli import build_parser
from shared.connection import inbox_prefix
from shared.settings import CommonSettings, env_name
from shared.streams import provision
from tests.harness import free_port, nats_server_binary, stop_process, wait_for_port

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read compose.yaml")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE = "stockpilot-ops"
NATS_NODES = ("nats-1", "nats-2", "nats-3")


def _load() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load()


def stockpilot_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run our image (its entrypoint is `stockpilot`)."""
    return {
        name: spec
        for name, spec in compose["services"].items()
        if str(spec.get("image", "")).split(":")[0] == IMAGE
    }


def settings_env_names(*classes: type[msgspec.Struct]) -> set[str]:
    """The environment variables the settings structs read."""
    return {env_name(cls, f.name) for cls in classes for f in msgspec.structs.fields(cls)}


def process_settings(command: list[str]) -> list[type[msgspec.Struct]]:
    """The settings structs the process started by `stockpilot <command>` loads."""
    classes: list[type[msgspec.Struct]] = [CommonSettings]
    if command[:1] == ["gateway"]:
        classes.append(importlib.import_module("gateway.settings").GatewaySettings)
    elif command[:1] == ["service"] and len(command) > 1:
        classes.append(importlib.import_module(f"services.{command[1]}.settings").Settings)
    elif command[:1] == ["hooks"]:
        classes.append(importlib.import_module("ops.hooks").HookSettings)
    return classes


def _subcommand_choices(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def test_compose_runs_only_commands_the_cli_has(compose: dict[str, Any]) -> None:
    parser = build_parser()
    known = _subcommand_choices(parser)
    services = stockpilot_services(compose)
    assert services, "no service runs the stockpilot-ops image"
    missing, unparsable = [], []
    for name, spec in services.items():
        command = [str(part) for part in spec["command"]]
        if command[0] not in known:
            missing.append(f"{name}: stockpilot {command[0]} (CLI has {sorted(known)})")
            continue
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                parser.parse_args(command)
        except SystemExit:
            unparsable.append(f"{name}: stockpilot {' '.join(command)}: {errors.getvalue()}")
    assert not missing, f"compose runs commands the CLI lacks: {missing}"
    assert not unparsable, f"compose commands the CLI refuses: {unparsable}"


def test_compose_sets_only_real_settings(compose: dict[str, Any]) -> None:
    unknown = {}
    for name, spec in stockpilot_services(compose).items():
        command = [str(part) for part in spec["command"]]
        allowed = settings_env_names(*process_settings(command))
        extra = set(spec.get("environment", {})) - allowed
        if extra:
            unknown[name] = sorted(extra)
    assert not unknown, f"variables no settings struct reads (typos?): {unknown}"


def test_compose_runs_each_process_of_the_system(compose: dict[str, Any]) -> None:
    services = stockpilot_services(compose)
    commands = {tuple(spec["command"]): spec for spec in services.values()}
    for svc in ("health", "usage", "batch"):
        spec = commands[("service", svc)]
        assert spec["deploy"]["replicas"] == 2, f"{svc} should run two replicas"
    assert ("hooks",) in commands
    gateway = commands[("gateway",)]
    assert gateway["environment"]["STOCKPILOT_HTTP_HOST"] == "0.0.0.0"
    assert str(gateway["environment"]["STOCKPILOT_HTTP_PORT"]) == "8000"
    assert "8000:8000" in gateway["ports"]
    assert "/api/v1/health/ready" in " ".join(gateway["healthcheck"]["test"])


def test_every_process_talks_to_all_three_nats_nodes_with_replicated_streams(
    compose: dict[str, Any],
) -> None:
    for name, spec in stockpilot_services(compose).items():
        env = spec["environment"]
        urls = env["STOCKPILOT_NATS_URL"].split(",")
        assert urls == [f"nats://{node}:4222" for node in NATS_NODES], name
        assert str(env["STOCKPILOT_STREAM_REPLICAS"]) == "3", name
        assert {f"{node}" for node in NATS_NODES} <= set(spec["depends_on"]), name


def test_nats_is_a_three_node_jetstream_cluster_with_own_volumes(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    volumes = []
    for node in NATS_NODES:
        spec = services[node]
        assert spec["image"].startswith("nats:")
        args = " ".join([*spec.get("entrypoint", []), *spec["command"]])
        assert "--js" in args.split()
        assert f"--server_name={node}" in args
        assert "--cluster_name=stockpilot" in args
        routes = re.search(r"--routes=(\S+)", args)
        assert routes is not None
        assert routes.group(1).split(",") == [f"nats://{n}:6222" for n in NATS_NODES]
        assert "/healthz" in " ".join(spec["healthcheck"]["test"])
        volumes += [v.split(":")[0] for v in spec["volumes"] if not v.startswith("./")]
    assert len(set(volumes)) == 3, "each node keeps its own store"
    assert set(volumes) <= set(compose["volumes"])


def test_compose_passes_the_contract_settings_to_their_process(
    compose: dict[str, Any],
) -> None:
    env_of = {
        " ".join(spec["command"]): set(spec["environment"])
        for spec in stockpilot_services(compose).values()
    }
    expected = {
        "gateway": {
            "STOCKPILOT_ADMIN_TOKEN",
            "STOCKPILOT_INGEST_TOKEN",
            "STOCKPILOT_READ_TOKEN",
        },
        "service health": {
            "STOCKPILOT_DATABASE_URL",
            "STOCKPILOT_REDIS_URL",
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
            "STOCKPILOT_EXTERNAL_APIS",
            "STOCKPILOT_HEALTH_INTERVAL_S",
        },
        "service usage": {
            "STOCKPILOT_DAILY_BUDGET_USD",
            "STOCKPILOT_MONTHLY_BUDGET_USD",
            "STOCKPILOT_COST_ALERT_PCT",
            "STOCKPILOT_ERROR_RATE_ALERT_PCT",
            "STOCKPILOT_ERROR_RATE_MIN_CALLS",
        },
        "service batch": {"STOCKPILOT_LOCK_TTL_S", "STOCKPILOT_HISTORY_LIMIT"},
    }
    for command, names in expected.items():
        assert names <= env_of[command], f"{command} lacks {sorted(names - env_of[command])}"
    for names in env_of.values():
        assert "STOCKPILOT_TZ" in names


def test_dockerfile_builds_a_non_root_stockpilot_image_without_dev_extras() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    assert 'ENTRYPOINT ["stockpilot"]' in instructions
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert "requirements.lock" in text
    assert "[dev]" not in text and "--extra dev" not in text


# ----- NATS users (ops.nats_auth) -----------------------------------------------------------


def test_the_shipped_nats_config_is_what_nats_auth_generates() -> None:
    """deploy/nats.conf is generated: `python -m ops.nats_auth > deploy/nats.conf`."""
    assert nats_auth.COMPOSE_CONFIG.read_text(encoding="utf-8") == nats_auth.compose_config()


def test_every_nats_node_runs_with_the_users(compose: dict[str, Any]) -> None:
    for node in NATS_NODES:
        spec = compose["services"][node]
        args = [*spec.get("entrypoint", []), *spec["command"]]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in spec["volumes"]}
        config = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
        assert mounts[config] == "./deploy/nats.conf", node
        env = spec["environment"]
        for role in nats_auth.ROLES:
            variable = nats_auth.password_variable(role)
            assert env[variable].startswith(f"${{{variable}:?"), (node, role)


def test_every_process_connects_as_its_own_role(compose: dict[str, Any]) -> None:
    role_of = {
        ("service", "health"): "health",
        ("service", "usage"): "usage",
        ("service", "batch"): "batch",
        ("hooks",): "hooks",
        ("gateway",): "gateway",
        ("up", "--provision-only"): "ops",
        ("streams",): "ops",
    }
    for name, spec in stockpilot_services(compose).items():
        role = role_of[tuple(spec["command"])]
        env = spec["environment"]
        assert env["STOCKPILOT_NATS_USER"] == role, name
        variable = nats_auth.password_variable(role)
        assert env["STOCKPILOT_NATS_PASSWORD"].startswith(f"${{{variable}:?"), name
        if role != "ops":
            # Their users may not create streams: provisioning (as ops) runs first.
            assert spec["depends_on"]["provision"] == {
                "condition": "service_completed_successfully"
            }, name


def anonymous_connect(port: int) -> str:
    """What the server answers a client that gives no credentials (plain protocol)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.recv(4096)  # INFO
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        return sock.recv(4096).decode(errors="replace")


async def test_a_nats_server_with_the_shipped_config_enforces_the_roles(tmp_path: Path) -> None:
    """The shipped file, on a real nats-server: no anonymous client; the producer publishes
    usage and gets its ack, and may not change a stream."""
    passwords = {role: f"pw-{role}-{i}" for i, role in enumerate(nats_auth.ROLES)}
    env = os.environ | {nats_auth.password_variable(r): p for r, p in passwords.items()}
    port = free_port()
    server = subprocess.Popen(
        [
            nats_server_binary(),
            "--config",
            str(nats_auth.COMPOSE_CONFIG),
            "-js",
            "-sd",
            str(tmp_path),
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"nats://127.0.0.1:{port}"
    try:
        wait_for_port("127.0.0.1", port)
        assert "Authorization Violation" in anonymous_connect(port)
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        async def connect(role: str) -> nats.NATS:
            return await nats.connect(
                url,
                user=role,
                password=passwords[role],
                inbox_prefix=inbox_prefix(role),
                error_cb=on_error,
                allow_reconnect=False,
            )

        ops = await connect("ops")
        await provision(ops.jetstream())
        producer = await connect("producer")
        ack = await producer.jetstream().publish("stockpilot.usage.recorded", b"{}")
        assert ack.stream == "STOCKPILOT_USAGE"
        with pytest.raises(nats.errors.TimeoutError):
            await producer.request("$JS.API.STREAM.DELETE.STOCKPILOT_USAGE", b"", timeout=0.5)
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.02)
        assert errors and "permissions violation" in errors[0].lower()
        assert (await ops.jetstream().stream_info("STOCKPILOT_USAGE")).state.messages == 1
        await producer.close()
        await ops.close()
    finally:
        stop_process(server)
