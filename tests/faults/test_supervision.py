"""A background loop that dies takes its process with it: logged with its traceback, exit 70.

Each test makes a loop of a real process fail through something an operator or an attacker
could really do to it (the snapshot bucket deleted, the hooks' durable consumer deleted), then
reads the exit status and the process's own log.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from ops.hook_runner import consumer_name
from shared.endpoints import endpoint_subject
from shared.events import rfc3339, utc_now
from shared.hook_status import hooks_process_state, read_hooks_status
from shared.runtime import Context, Runtime, ServiceDefinition
from shared.settings import CommonSettings, load_settings
from shared.snapshotter import SNAPSHOT_MAX_FAILURES
from shared.streams import STREAMS, provision, snapshot_bucket
from shared.supervise import EXIT_LOOP_FAILED
from tests.faults.stack import service_env, spawn, wait_caught_up
from tests.harness import NatsServer, stop_process


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[NATS]:
    nc = await nats.connect(url)
    await provision(nc.jetstream())
    try:
        yield nc
    finally:
        await nc.close()


async def exit_status(process: subprocess.Popen[bytes], timeout: float) -> int:
    """The process's exit status once it ends by itself (a failure, not our SIGTERM)."""
    deadline = time.monotonic() + timeout
    while (status := process.poll()) is None:
        if time.monotonic() > deadline:
            stop_process(process)
            raise AssertionError(f"still running {timeout}s after its loop was made to fail")
        await asyncio.sleep(0.1)
    return status


async def record_usage(nc: NATS, request_id: str) -> None:
    body = (
        f'{{"type":"usage.recorded","id":"{request_id}","occurred_at":"{rfc3339(utc_now())}",'
        f'"model":"gpt-4o-mini","status_code":200,"prompt_tokens":10}}'
    ).encode()
    await nc.jetstream().publish(
        "stockpilot.usage.recorded", body, headers={"Nats-Msg-Id": request_id}
    )


async def test_usage_service_whose_snapshots_cannot_be_written_exits_non_zero(
    nats: NatsServer, tmp_path: Path
) -> None:
    """The snapshot bucket deleted under a running service: it says why and exits 70.

    Its restart provisions the bucket again; staying up would have meant no snapshot ever
    again while /status said "up" (issue #22).
    """
    env = service_env(nats.url, tmp_path / "data", STOCKPILOT_SNAPSHOT_EVERY_S="0.2")
    log = tmp_path / "usage.log"
    async with connected(nats.url) as nc:
        process = spawn(["service", "usage"], env, log)
        try:
            await record_usage(nc, "req-1")
            await wait_caught_up(nc, "usage", "STOCKPILOT_USAGE")
            await nc.jetstream().delete_object_store(snapshot_bucket("usage"))
            await record_usage(nc, "req-2")
            status = await exit_status(process, timeout=60)
        finally:
            stop_process(process)
    text = log.read_text()
    assert status == EXIT_LOOP_FAILED, text
    assert "background task snapshots failed" in text
    assert "Traceback (most recent call last)" in text
    assert f"failed {SNAPSHOT_MAX_FAILURES} times in a row" in text


async def test_hooks_process_whose_consumer_is_deleted_exits_non_zero_and_is_not_up(
    nats: NatsServer, tmp_path: Path
) -> None:
    """Its durable consumer deleted, the delivery loop fails: traceback, exit 70, not `up`."""
    env = service_env(nats.url, tmp_path / "data", STOCKPILOT_LOG_LEVEL="INFO")
    log = tmp_path / "hooks.log"
    async with connected(nats.url) as nc:
        js = nc.jetstream()
        process = spawn(["hooks"], env, log)
        try:
            deadline = time.monotonic() + 30
            while (status := await read_hooks_status(js)) is None or status.hooks[0].state != "ok":
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            assert hooks_process_state(status, utc_now()) == "up"
            await js.delete_consumer(STREAMS["alerts"].name, consumer_name("log"))
            code = await exit_status(process, timeout=60)
        finally:
            stop_process(process)
        final = await read_hooks_status(js)
    text = log.read_text()
    assert code == EXIT_LOOP_FAILED, text
    assert "background task hook-log failed" in text
    assert "Traceback (most recent call last)" in text
    assert final is not None and final.stopped
    assert final.failure is not None and "hook-log" in final.failure
    assert hooks_process_state(final, utc_now()) == "unavailable"


def failing_on_request(subject: str) -> ServiceDefinition:
    """A service whose one background loop fails on the first message to `subject`."""

    async def listen(ctx: Context) -> None:
        subscription = await ctx.nc.subscribe(subject)
        message = await subscription.next_msg(timeout=None)
        raise ValueError(f"cannot handle {message.data.decode()!r}")

    return ServiceDefinition(name="toyfail", projections=(), background=[listen])


async def test_a_failing_background_loop_stops_the_runtime_and_its_status_is_not_ready(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """In process: the runtime returns 70, and it stopped answering "ready" before it went."""
    subject = "toyfail.poison"
    runtime = Runtime(failing_on_request(subject), load_settings(CommonSettings, env))
    run = asyncio.create_task(runtime.run())
    async with connected(env["STOCKPILOT_NATS_URL"]) as nc:
        statuses: list[bytes] = []
        deadline = time.monotonic() + 20
        while not statuses:
            assert time.monotonic() < deadline and not run.done()
            with contextlib.suppress(nats.errors.Error):
                reply = await nc.request(endpoint_subject("toyfail", "status"), b"{}", timeout=1)
                statuses.append(reply.data)
        assert b'"ready":true' in statuses[0]
        # Until the loop has subscribed (it starts once the projections, none, caught up).
        while not run.done():
            assert time.monotonic() < deadline
            await nc.publish(subject, b"poison")
            await asyncio.wait({run}, timeout=0.2)
        status = run.result()
    assert status == EXIT_LOOP_FAILED
    assert runtime.supervisor.failure is not None
    assert "cannot handle 'poison'" in runtime.supervisor.failure
    assert not runtime.status().ready
    failed = [r for r in caplog.records if "background task listen failed" in r.getMessage()]
    assert failed and failed[0].exc_info is not None
