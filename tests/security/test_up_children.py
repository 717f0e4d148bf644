"""`stockpilot up`'s children: each sees only its own settings and secrets, none outlives a
kill -9 of the supervisor, and a second stack on the same data dir is refused."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import psutil
import pytest
from nats.aio.msg import Msg

from ops import nats_auth
from ops.stack import child_environment
from services.usage.client import RecorderSettings, UsageRecorder
from shared.connection import inbox_prefix
from shared.settings import load_settings
from tests.clocks import REAL, zone_far_from_midnight
from tests.harness import free_port, nats_server_binary, stop_process, wait_for_port
from tests.usage.helpers import recorded as usage_call

ROOT = Path(__file__).parents[2]
SECRETS = {
    "OPENAI_API_KEY": "sk-only-for-health-1f2e",
    "STOCKPILOT_DATABASE_URL": "postgresql://postgres:only-health-77@127.0.0.1:1/postgres",
    "STOCKPILOT_ADMIN_TOKEN": "only-for-the-gateway-5a",
    "STOCKPILOT_ALERT_WEBHOOK_SECRET": "only-for-hooks-9c",
    "STOCKPILOT_ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook",
    "STOCKPILOT_DAILY_BUDGET_USD": "12",
    "QUOTES_TOKEN": "only-for-health-via-env-ref",
    "UNRELATED_SECRET": "nobody-needs-this",
}


def up_env(data: Path, **extra: str) -> dict[str, str]:
    env = os.environ | {
        "STOCKPILOT_DATA_DIR": str(data),
        "STOCKPILOT_HTTP_PORT": str(free_port()),
        "STOCKPILOT_CONFIG": str(ROOT / "tests" / "empty.toml"),
        **extra,
    }
    env.pop("STOCKPILOT_NATS_URL", None)
    return env


def start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ops", "up"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def wait_serving(env: dict[str, str], up: subprocess.Popen[bytes], timeout: float = 60) -> None:
    url = f"http://127.0.0.1:{env['STOCKPILOT_HTTP_PORT']}/api/v1/status"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert up.poll() is None, f"stockpilot up exited with {up.returncode}"
        try:
            services = httpx.get(url, timeout=2).json()["services"]
            if all(s["status"] == "up" for s in services.values()):
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"the stack did not serve within {timeout}s")


def children_by_name(up: subprocess.Popen[bytes]) -> dict[str, psutil.Process]:
    """nats, health, usage, batch, hooks, gateway: the supervisor's direct children."""
    named = {}
    for child in psutil.Process(up.pid).children():
        cmdline = child.cmdline()
        # nats-server --config …, or python -m ops service NAME | hooks | gateway
        name = "nats" if Path(cmdline[0]).name == "nats-server" else cmdline[-1]
        named[name] = child
    return named


APIS = '[{"name":"quotes","url":"http://127.0.0.1:9/","headers":{"X-Key":"env:QUOTES_TOKEN"}}]'


def stop(up: subprocess.Popen[bytes], leftovers: list[psutil.Process]) -> None:
    if up.poll() is None:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=15)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    for process in leftovers:
        if process.is_running():
            process.kill()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], Path]]:
    """One running `stockpilot up` (with secrets of every kind) for the tests that only
    look at it."""
    tmp_path = tmp_path_factory.mktemp("stack")
    env = up_env(tmp_path / "data", STOCKPILOT_EXTERNAL_APIS=APIS, **SECRETS)
    log = tmp_path / "up.log"
    up = start(env, log)
    leftovers: list[psutil.Process] = []
    try:
        wait_serving(env, up)
        leftovers = psutil.Process(up.pid).children(recursive=True)
        yield up, env, log
    finally:
        stop(up, leftovers)


def test_each_child_gets_only_the_settings_it_uses(
    stack: tuple[subprocess.Popen[bytes], dict[str, str], Path],
) -> None:
    up, _, _ = stack
    children = children_by_name(up)
    assert set(children) == {"nats", "health", "usage", "batch", "hooks", "gateway"}
    seen = {name: process.environ() for name, process in children.items()}
    for name, environ in seen.items():
        assert "UNRELATED_SECRET" not in environ, name
    assert not any(key.startswith(("STOCKPILOT_", "OPENAI_")) for key in seen["nats"])
    assert set(seen["health"]) >= {"OPENAI_API_KEY", "STOCKPILOT_DATABASE_URL", "QUOTES_TOKEN"}
    assert "STOCKPILOT_ADMIN_TOKEN" not in seen["health"]
    assert {"OPENAI_API_KEY", "STOCKPILOT_DATABASE_URL", "QUOTES_TOKEN"}.isdisjoint(seen["gateway"])
    assert seen["gateway"]["STOCKPILOT_ADMIN_TOKEN"] == SECRETS["STOCKPILOT_ADMIN_TOKEN"]
    assert seen["hooks"]["STOCKPILOT_ALERT_WEBHOOK_SECRET"] == "only-for-hooks-9c"
    assert seen["usage"]["STOCKPILOT_DAILY_BUDGET_USD"] == "12"
    for name in ("usage", "batch", "hooks", "gateway"):
        assert "OPENAI_API_KEY" not in seen[name], name
        assert "STOCKPILOT_DATABASE_URL" not in seen[name], name
    for name in ("health", "usage", "batch", "gateway"):
        assert "STOCKPILOT_ALERT_WEBHOOK_SECRET" not in seen[name], name
    # Each process connects as its own NATS role.
    for name in ("health", "usage", "batch", "hooks", "gateway"):
        assert seen[name]["STOCKPILOT_NATS_USER"] == name


def test_the_allow_list_is_built_from_each_childs_settings() -> None:
    parent = {"PATH": "/bin", "OPENAI_API_KEY": "k", "STOCKPILOT_READ_TOKEN": "r", "X": "y"}
    assert child_environment("nats", parent) == {"PATH": "/bin"}
    assert child_environment("health", parent) == {"PATH": "/bin", "OPENAI_API_KEY": "k"}
    assert child_environment("gateway", parent) == {"PATH": "/bin", "STOCKPILOT_READ_TOKEN": "r"}


def test_a_kill_9_of_up_leaves_no_process_behind(tmp_path: Path) -> None:
    env = up_env(tmp_path / "data")
    up = start(env, tmp_path / "up.log")
    try:
        wait_serving(env, up)
    except AssertionError:
        stop(up, psutil.Process(up.pid).children(recursive=True))
        raise
    children = psutil.Process(up.pid).children(recursive=True)
    assert len(children) >= 6
    up.kill()
    up.wait()
    _, alive = psutil.wait_procs(children, timeout=20)
    left = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for process in left:  # an orphan must not outlive the test either
        process.kill()
    assert [p.cmdline() for p in left] == []
    # The ports and the store are free again: a new stack starts on the same data dir.
    again = start(env, Path(env["STOCKPILOT_DATA_DIR"]).parent / "again.log")
    try:
        wait_serving(env, again)
    finally:
        again.send_signal(signal.SIGINT)
        assert again.wait(timeout=15) == 0


def test_a_second_stack_on_the_same_data_dir_is_refused(
    stack: tuple[subprocess.Popen[bytes], dict[str, str], Path],
) -> None:
    up, env, _ = stack
    second = subprocess.run(
        [sys.executable, "-m", "ops", "up"],
        env=env | {"STOCKPILOT_HTTP_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert second.returncode != 0
    lines = second.stdout.strip().splitlines()
    assert len(lines) == 1, lines
    assert "already running" in lines[0]
    assert str(up.pid) in lines[0]
    wait_serving(env, up, timeout=5)  # the first one is untouched


def test_a_leftover_nats_server_of_an_earlier_stack_is_refused(tmp_path: Path) -> None:
    """An orphan of an older stack (one that did not die with its supervisor) still holds
    the store: the new stack says so instead of half-starting beside it."""
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    config, _ = nats_auth.generate(data, port)
    orphan = subprocess.Popen(
        [nats_server_binary(), "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port)
        result = subprocess.run(
            [sys.executable, "-m", "ops", "up"],
            env=up_env(data),
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
        assert result.returncode != 0
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 1, lines
        assert "earlier StockPilot stack" in lines[0]
        assert str(orphan.pid) in lines[0]
        assert orphan.poll() is None
    finally:
        stop_process(orphan)


# gpt-4o-mini priced so that each test call (800 prompt tokens) costs exactly $0.001, and a
# daily budget of 90 calls: the warning (80 %) is crossed by the 72nd call, the budget by the
# 90th, i.e. one in each of the second and third runs of the stack below.
PRICES = json.dumps({"gpt-4o-mini": {"input": 1.25, "cached_input": 1.25, "output": 0}})
BUDGET = "0.09"
CALLS_PER_RUN = 40


async def test_two_restarts_keep_port_and_credentials_and_lose_or_repeat_nothing(
    tmp_path: Path,
) -> None:
    """CONTRACT §2 and issue #19's proof: the stack restarted twice under an outside observer
    (configured once, nats-py) and the project's usage client (configured once, recording all
    along, also while the stack is down): every call is stored once, and each budget alert,
    raised by the services in a later run, reaches the observer once."""
    data = tmp_path / "data"
    env = up_env(
        data,
        STOCKPILOT_PRICES=PRICES,
        STOCKPILOT_DAILY_BUDGET_USD=BUDGET,
        STOCKPILOT_TZ=zone_far_from_midnight(),
    )
    received: list[tuple[str, str]] = []
    heard = {kind: asyncio.Event() for kind in ("usage.cost_warning", "usage.cost_exceeded")}
    first = start(env, tmp_path / "run-1.log")
    try:
        wait_serving(env, first)
        passwords = json.loads((data / "credentials.json").read_text())
        port = int((data / "nats.port").read_text())
        for name in ("credentials.json", "nats.port", "nats.url", "nats-server.conf"):
            assert (data / name).stat().st_mode & 0o077 == 0, name

        async def on_alert(msg: Msg) -> None:
            received.append((msg.subject, json.loads(msg.data)["id"]))
            kind = msg.subject.removeprefix("stockpilot.alerts.")
            if kind in heard:
                heard[kind].set()

        # Configured once, reconnecting forever: an outside observer.
        observer = await nats.connect(
            f"nats://127.0.0.1:{port}",
            user="observer",
            password=passwords["observer"],
            inbox_prefix=inbox_prefix("observer"),
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
        )
        await observer.subscribe("stockpilot.alerts.>", cb=on_alert)
        await observer.flush()
        # The project's own usage client, configured once as `producer` like an application.
        recorder = await UsageRecorder.connect(
            load_settings(
                RecorderSettings,
                {
                    "STOCKPILOT_CONFIG": "tests/empty.toml",
                    "STOCKPILOT_NATS_URL": f"nats://127.0.0.1:{port}",
                    "STOCKPILOT_NATS_USER": "producer",
                    "STOCKPILOT_NATS_PASSWORD": passwords["producer"],
                    "STOCKPILOT_DATA_DIR": str(tmp_path / "app"),
                },
            )
        )
        for i in range(CALLS_PER_RUN):
            recorder.record(usage_call(i, REAL.now()))
        await asyncio.wait_for(recorder.flush(), timeout=20)
        assert recorder.pending == 0
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=15)
    for run, kind in ((2, "usage.cost_warning"), (3, "usage.cost_exceeded")):
        calls = range((run - 1) * CALLS_PER_RUN, run * CALLS_PER_RUN)
        for i in calls:  # the stack is down: these wait in the client's spool
            recorder.record(usage_call(i, REAL.now()))
        again = start(env, tmp_path / f"run-{run}.log")
        try:
            wait_serving(env, again)
            assert json.loads((data / "credentials.json").read_text()) == passwords
            assert int((data / "nats.port").read_text()) == port
            await asyncio.wait_for(recorder.flush(), timeout=30)
            # Raised by this run, heard by the observer.
            await asyncio.wait_for(heard[kind].wait(), timeout=30)
            if run == 3:
                await asyncio.wait_for(recorder.close(timeout=30), timeout=40)
                assert recorder.pending == 0 and recorder.dropped == 0
                ops = await nats.connect(
                    f"nats://127.0.0.1:{port}",
                    user="ops",
                    password=passwords["ops"],
                    inbox_prefix=inbox_prefix("ops"),
                )
                subject = "stockpilot.usage.recorded"
                js = ops.jetstream()
                info = await js.stream_info("STOCKPILOT_USAGE", subjects_filter=subject)
                await ops.close()
                # Each call once, none lost.
                assert (info.state.subjects or {}).get(subject) == 3 * CALLS_PER_RUN
                await observer.flush()
        finally:
            again.send_signal(signal.SIGINT)
            assert again.wait(timeout=15) == 0
        # Restoring from the snapshots the run before took works under the services' roles.
        log = (tmp_path / f"run-{run}.log").read_text(errors="replace")
        assert "restored" in log
        assert "Violation" not in log, [line for line in log.splitlines() if "Violation" in line]
    await observer.close()
    # Every alert once (none raised again by a restart's replay), the two budget alerts among them.
    assert len({alert_id for _, alert_id in received}) == len(received), received
    budget = sorted(subject for subject, _ in received if ".usage.cost_" in subject)
    assert budget == [
        "stockpilot.alerts.usage.cost_exceeded",
        "stockpilot.alerts.usage.cost_warning",
    ]


def test_up_on_an_external_nats_with_users_runs_each_child_as_its_role(tmp_path: Path) -> None:
    """The compose users on a server of one's own (STOCKPILOT_NATS_URL): given the roles'
    passwords as compose is, `up` creates the streams as ops and each child connects as its
    role; the server reports no violation."""
    passwords = {role: f"pw-{role}-{i}-x" for i, role in enumerate(nats_auth.ROLES)}
    variables = {nats_auth.password_variable(r): p for r, p in passwords.items()}
    port = free_port()
    server_log = tmp_path / "nats.log"
    with open(server_log, "wb") as out:
        server = subprocess.Popen(
            [nats_server_binary(), "--config", str(nats_auth.COMPOSE_CONFIG), "-js"]
            + ["-sd", str(tmp_path / "store"), "-a", "127.0.0.1", "-p", str(port)],
            env=os.environ | variables,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port("127.0.0.1", port)
        env = up_env(tmp_path / "data", **variables)
        env["STOCKPILOT_NATS_URL"] = f"nats://127.0.0.1:{port}"
        up = start(env, tmp_path / "up.log")
        try:
            wait_serving(env, up)
            children = children_by_name(up)
            assert set(children) == {"health", "usage", "batch", "hooks", "gateway"}
            for name, process in children.items():
                environ = process.environ()
                assert environ["STOCKPILOT_NATS_USER"] == name
                assert environ["STOCKPILOT_NATS_PASSWORD"] == passwords[name]
                assert not any(v in environ for v in variables), name
        finally:
            up.send_signal(signal.SIGINT)
            assert up.wait(timeout=15) == 0
    finally:
        stop_process(server)
    log = server_log.read_text(errors="replace")
    assert "Violation" not in log, [line for line in log.splitlines() if "Violation" in line]
