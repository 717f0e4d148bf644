"""The ops commands against a real stack (`stockpilot up`), run from folders that are not the
stack's: they find it from the data dir (or STOCKPILOT_NATS_URL) and nothing else, say in one
line when there is none, and tell an outside program how to connect (CONTRACT §2)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import nats
import pytest

from ops.replay import load_definition, replay_definition
from services.usage.settings import UsageSettings
from shared.settings import load_settings, recorded_nats_url
from tests.clocks import NOON
from tests.faults.stack import digest
from tests.harness import NatsServer, free_port

ROOT = Path(__file__).resolve().parents[2]
EMPTY_TOML = str(ROOT / "tests" / "empty.toml")
STREAMS = ("STOCKPILOT_USAGE", "STOCKPILOT_HEALTH", "STOCKPILOT_BATCH", "STOCKPILOT_ALERTS")
# The live stack's fold settings, which the shells below do not have.
LIVE_SETTINGS = {"STOCKPILOT_TZ": "Asia/Seoul", "STOCKPILOT_DAILY_BUDGET_USD": "0.5"}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any StockPilot setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKPILOT_")}
    return env | {"STOCKPILOT_CONFIG": EMPTY_TOML, **extra}


def stockpilot(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`stockpilot ARGS` run in `cwd` with only the given StockPilot settings."""
    return subprocess.run(
        [sys.executable, "-m", "ops", *args],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=90,
    )


class Stack:
    """A running `stockpilot up` and where its data dir is."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data_dir = base / ".data"
        self.elsewhere = base / "elsewhere"
        self.elsewhere.mkdir()

    @property
    def ops_url(self) -> str:
        url = recorded_nats_url(self.data_dir)
        assert url is not None
        return url

    @property
    def port(self) -> int:
        return int((self.data_dir / "nats.port").read_text())

    def passwords(self) -> dict[str, str]:
        found: dict[str, str] = json.loads((self.data_dir / "credentials.json").read_text())
        return found


def _wait_until_up(base_url: str, up: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(600):
        assert up.poll() is None, f"stockpilot up exited: {log.read_text()[-2000:]}"
        try:
            status = httpx.get(f"{base_url}/api/v1/status", timeout=2)
            if status.status_code == 200 and all(
                s["status"] == "up" for s in status.json()["services"].values()
            ):
                return
        except httpx.HTTPError:
            pass
        try:
            up.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
    raise AssertionError(f"the stack did not come up: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One `stockpilot up` for the module, data dir `<base>/.data`, with fold settings (time
    zone, budget) that the commands' shells below do not have."""
    found = Stack(tmp_path_factory.mktemp("stack"))
    http_port = free_port()
    log = found.base / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "ops", "up"],
            cwd=found.base,
            env=clean_env(
                STOCKPILOT_DATA_DIR=str(found.data_dir),
                STOCKPILOT_HTTP_PORT=str(http_port),
                STOCKPILOT_HEALTH_INTERVAL_S="3600",
                **LIVE_SETTINGS,
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_up(f"http://127.0.0.1:{http_port}", up, log)
        yield found
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=15)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command's only stderr line (asserted to be one)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# ----- finding the stack ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ("streams",),
        ("events", "export", "usage"),
        ("events", "tail", "stockpilot.alerts.>"),
        ("replay", "usage"),
        ("nats-info",),
        ("demo", "--api-port=-1"),
        ("up", "--provision-only"),
        ("service", "usage"),
        ("gateway",),
        ("hooks",),
    ],
)
def test_without_a_stack_every_ops_command_says_so_in_one_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """No STOCKPILOT_NATS_URL, no data dir with a stack: no guessing at 127.0.0.1:4222."""
    result = stockpilot(tmp_path, *command)
    assert result.returncode == 2
    line = one_line(result)
    assert "no StockPilot stack found" in line
    assert "STOCKPILOT_DATA_DIR" in line and "STOCKPILOT_NATS_URL" in line
    assert "stockpilot up" in line
    assert result.stdout == ""


def test_a_recorded_stack_that_is_not_running_is_named(tmp_path: Path) -> None:
    """The data dir of a stopped stack (its port and passwords kept): not running, one line."""
    data = tmp_path / "stopped"
    data.mkdir()
    port = free_port()
    (data / "nats.port").write_text(f"{port}\n")
    (data / "credentials.json").write_text(json.dumps({"ops": "o" * 32, "observer": "b" * 32}))
    for command in (("streams",), ("nats-info", "--role", "observer"), ("replay", "usage")):
        result = stockpilot(tmp_path, *command, STOCKPILOT_DATA_DIR=str(data))
        assert result.returncode == 2
        line = one_line(result)
        assert f"127.0.0.1:{port}" in line and "is not running" in line
        assert str(data) in line and "stockpilot up" in line


def test_streams_reports_the_live_stack_from_another_folder(stack: Stack) -> None:
    result = stockpilot(stack.elsewhere, "streams", STOCKPILOT_DATA_DIR=str(stack.data_dir))
    assert result.returncode == 0, result.stderr
    assert f"127.0.0.1:{stack.port}" in result.stdout.splitlines()[0]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert set(STREAMS) <= set(rows)
    for service in ("health", "usage", "batch"):
        assert rows[service][1] == "up"
    assert "usage/usage" in rows
    assert "not running" not in result.stdout


def test_streams_json_prints_one_tagged_line_per_row(stack: Stack) -> None:
    result = stockpilot(
        stack.elsewhere, "streams", "--json", STOCKPILOT_DATA_DIR=str(stack.data_dir)
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(text) for text in result.stdout.splitlines()]
    assert {line["stream"] for line in lines if line["kind"] == "stream"} >= set(STREAMS)
    services = {line["service"]: line["status"] for line in lines if line["kind"] == "service"}
    assert services == {"health": "up", "usage": "up", "batch": "up"}


def test_a_subfolder_of_the_stack_finds_its_data_dir_without_settings(stack: Stack) -> None:
    """The default data dir `./.data` is looked for in the parent folders too."""
    deeper = stack.base / "docs" / "notes"
    deeper.mkdir(parents=True, exist_ok=True)
    result = stockpilot(deeper, "streams", "--json")
    assert result.returncode == 0, result.stderr
    assert any(
        json.loads(line).get("stream") == "STOCKPILOT_USAGE" for line in result.stdout.splitlines()
    )


async def test_a_nats_that_is_not_stockpilots_gets_no_streams_and_no_events(
    tmp_path: Path,
) -> None:
    """STOCKPILOT_NATS_URL at a NATS without the StockPilot streams: streams and demo stop
    with one line; nothing is created there and nothing is published to it."""
    decoy = NatsServer(tmp_path / "decoy").start()
    try:
        nc = await nats.connect(decoy.url)
        heard: list[str] = []

        async def keep(msg: nats.aio.msg.Msg) -> None:
            heard.append(msg.subject)

        await nc.subscribe("stockpilot.>", cb=keep)
        await nc.flush()
        for command in (("streams",), ("demo", "--api-port=-1", "--duration=2")):
            result = await asyncio.to_thread(
                stockpilot, tmp_path, *command, STOCKPILOT_NATS_URL=decoy.url
            )
            assert result.returncode == 2
            line = one_line(result)
            assert "none of the StockPilot streams" in line
            assert f"127.0.0.1:{decoy.port}" in line
        await nc.flush()
        assert heard == []
        assert await nc.jetstream().streams_info() == []
        await nc.close()
    finally:
        decoy.stop()


# ----- events export --------------------------------------------------------------------------


def test_export_of_a_stream_that_does_not_exist_names_the_valid_ones(stack: Stack) -> None:
    result = stockpilot(
        stack.elsewhere, "events", "export", "NOPE", STOCKPILOT_DATA_DIR=str(stack.data_dir)
    )
    assert result.returncode == 2
    line = one_line(result)
    assert "'NOPE'" in line
    for name in STREAMS:
        assert name in line
    assert "404" not in line and "err_code" not in line
    assert result.stdout == ""


# ----- nats-info ------------------------------------------------------------------------------


def test_nats_info_says_how_to_connect_and_prints_no_password(stack: Stack) -> None:
    result = stockpilot(stack.elsewhere, "nats-info", STOCKPILOT_DATA_DIR=str(stack.data_dir))
    assert result.returncode == 0, result.stderr
    assert f"nats://127.0.0.1:{stack.port}" in result.stdout
    for role in ("observer", "producer", "ops"):
        assert f"  {role} " in result.stdout
    assert str(stack.data_dir / "credentials.json") in result.stdout
    for password in stack.passwords().values():
        assert password not in result.stdout
    as_json = stockpilot(
        stack.elsewhere, "nats-info", "--json", STOCKPILOT_DATA_DIR=str(stack.data_dir)
    )
    info = json.loads(as_json.stdout)
    assert info["url"] == f"nats://127.0.0.1:{stack.port}"
    roles = {r["role"]: r for r in info["roles"]}
    assert set(roles) == {"observer", "producer", "ops"}
    assert "stockpilot.alerts.>" in roles["observer"]["subscribe"]
    assert roles["producer"]["publish"][0] == "stockpilot.usage.recorded"
    assert all(r.get("password") is None for r in info["roles"])


def client_files(
    env_file: Path, context_file: Path
) -> tuple[list[int], dict[str, str], dict[str, str]]:
    """The files' modes, the env file's variables and the nats CLI context."""
    modes = [stat.S_IMODE(path.stat().st_mode) for path in (env_file, context_file)]
    lines = env_file.read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if not line.startswith("#"))
    return modes, values, json.loads(context_file.read_text())


async def test_nats_info_role_gives_credentials_that_work(stack: Stack) -> None:
    """--role observer: the password, and the files it writes connect as the observer."""
    result = await asyncio.to_thread(
        stockpilot,
        stack.elsewhere,
        "nats-info",
        "--role",
        "observer",
        "--json",
        STOCKPILOT_DATA_DIR=str(stack.data_dir),
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    [role] = info["roles"]
    assert role["password"] == stack.passwords()["observer"]
    modes, values, context = await asyncio.to_thread(
        client_files, Path(info["env_file"]), Path(info["context_file"])
    )
    assert modes == [0o600, 0o600]
    assert context["url"] == values["NATS_URL"] == f"nats://127.0.0.1:{stack.port}"
    assert context["password"] == values["NATS_PASSWORD"] == role["password"]
    observer = await nats.connect(
        values["NATS_URL"],
        user=values["NATS_USER"],
        password=values["NATS_PASSWORD"],
        inbox_prefix=values["NATS_INBOX_PREFIX"],
        allow_reconnect=False,
    )
    try:
        info_alerts = await observer.jetstream().stream_info("STOCKPILOT_ALERTS")
        assert info_alerts.config.name == "STOCKPILOT_ALERTS"
    finally:
        await observer.close()


# ----- replay ---------------------------------------------------------------------------------


async def test_replay_folds_with_the_live_services_settings(stack: Stack) -> None:
    """The stack counts days in Seoul against a budget; this shell has neither setting. The
    replay uses the live ones, says so, and equals the live view."""
    nc = await nats.connect(stack.ops_url, inbox_prefix="_INBOX.ops")
    try:
        js = nc.jetstream()
        for i in range(40):
            # Around Seoul's midnight: the day an event counts in depends on the time zone.
            at = NOON - timedelta(hours=3, minutes=5 * i)
            event = {
                "type": "usage.recorded",
                "id": f"replay-{i}",
                "occurred_at": at.isoformat().replace("+00:00", "Z"),
                "request_id": f"replay-{i}",
                "model": "gpt-4o",
                "endpoint": "/api/v1/analysis",
                "prompt_tokens": 20_000,
                "completion_tokens": 2_000,
                "status_code": 200 if i % 4 else 500,
                "response_time_ms": 900.0,
            }
            await js.publish(
                "stockpilot.usage.recorded",
                json.dumps(event).encode(),
                headers={"Nats-Msg-Id": event["id"]},
            )
        last = (await js.stream_info("STOCKPILOT_USAGE")).state.last_seq
        for _ in range(300):
            answer = await digest(nc, "usage")
            if answer is not None and all(
                p.last_seq >= last for p in answer.projections if p.stream == "STOCKPILOT_USAGE"
            ):
                break
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    result = await asyncio.to_thread(
        stockpilot, stack.elsewhere, "replay", "usage", STOCKPILOT_DATA_DIR=str(stack.data_dir)
    )
    assert result.returncode == 0, result.stderr
    [line] = [json.loads(text) for text in result.stdout.splitlines()]
    assert line["equal"] is True and line["events"] >= 40
    assert "differs" not in result.stderr
    assert 'folding with the live service\'s STOCKPILOT_TZ="Asia/Seoul"' in result.stderr
    assert "STOCKPILOT_DAILY_BUDGET_USD=0.5" in result.stderr
    # Folded with this shell's settings instead, the same events do differ: what the
    # command used to report.
    shell = load_settings(UsageSettings, {"STOCKPILOT_CONFIG": EMPTY_TOML})
    nc = await nats.connect(stack.ops_url, inbox_prefix="_INBOX.ops")
    try:
        [naive] = await replay_definition(nc, load_definition("usage", shell), "STOCKPILOT_USAGE")
    finally:
        await nc.close()
    assert naive.equal is False


def test_nats_info_on_a_nats_of_ones_own_names_the_password_variables(tmp_path: Path) -> None:
    """STOCKPILOT_NATS_URL (compose, a cluster): the passwords are the operator's variables."""
    own = NatsServer(tmp_path / "own").start()
    try:
        overview = stockpilot(tmp_path, "nats-info", STOCKPILOT_NATS_URL=own.url)
        assert overview.returncode == 0, overview.stderr
        assert f"nats://127.0.0.1:{own.port}" in overview.stdout
        assert "STOCKPILOT_NATS_OBSERVER_PASSWORD" in overview.stdout
        unknown = stockpilot(
            tmp_path, "nats-info", "--role", "producer", STOCKPILOT_NATS_URL=own.url
        )
        assert unknown.returncode == 2
        assert "set STOCKPILOT_NATS_PRODUCER_PASSWORD" in one_line(unknown)
    finally:
        own.stop()
