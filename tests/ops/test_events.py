"""`stockpilot events`, `replay` and `streams` against real nats-servers (the toy service stands
in for the real services, which replay reaches through the same ServiceDefinition)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ops import stream_io
from ops.events import tail
from ops.hook_delivery import LogHook
from ops.hook_runner import HookRunner
from ops.replay import ReplayError, replay_definition, stream_name
from ops.streams_report import HookLine, ProjectionLine, ServiceLine, StreamLine, streams_report
from shared.dead_letters import dead_letter
from shared.publish import encode_event
from shared.settings import CommonSettings, load_settings
from shared.streams import provision
from tests.clocks import NOON
from tests.harness import NatsServer, running_service
from tests.shared.toy import Counted, build

# Any past instant does, nothing here depends on the day: three hours before the run's noon
# (tests.clocks.NOON), never a literal date.
T0 = NOON - timedelta(hours=3)
USAGE = "STOCKPILOT_USAGE"
ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[NATS]:
    nc = await nats.connect(url)
    try:
        await provision(nc.jetstream())
        yield nc
    finally:
        await nc.close()


async def publish_counted(js: JetStreamContext, n: int, start: int = 0) -> None:
    """Many events fast: pipelined publishes with Nats-Msg-Id, as a service stores them."""
    for i in range(start, start + n):
        event = Counted(id=f"e{i}", occurred_at=T0, model=f"m{i % 7}", status_code=200)
        await js.publish_async(
            "stockpilot.usage.recorded", encode_event(event), headers={"Nats-Msg-Id": event.id}
        )
    await js.publish_async_completed()


async def stored(js: JetStreamContext, stream: str) -> list[tuple[str, bytes, dict[str, str]]]:
    """Every stored message as (subject, data, headers)."""
    found: list[tuple[str, bytes, dict[str, str]]] = []

    def keep(msg: Msg) -> None:
        found.append((msg.subject, msg.data, dict(msg.headers or {})))

    await stream_io.read_stream(js, stream, keep)
    return found


async def run_shell(command: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_shell(
        command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout=60)
    assert process.returncode is not None
    return process.returncode, out, err


def cli(env: dict[str, str], *args: str) -> str:
    """A shell command running `stockpilot ARGS` with these settings."""
    assignments = " ".join(f"{k}={v}" for k, v in env.items())
    return f"env {assignments} {sys.executable} -m ops {' '.join(args)}"


async def test_export_then_import_into_a_fresh_server_round_trips_byte_for_byte(
    env: dict[str, str], tmp_path: Path
) -> None:
    fresh = NatsServer(tmp_path / "fresh").start()
    try:
        async with connected(env["STOCKPILOT_NATS_URL"]) as nc:
            js = nc.jetstream()
            await publish_counted(js, 3000)
            odd_payloads = [
                b"\x00\xffnot json at all",
                b'{\n  "type": "usage.recorded",\n  "id": "pretty"\n}',
                b"",
                b' {"padded": true} ',
                b'{"unicode":"d\xc3\xa9j\xc3\xa0 vu","float":1.10}',
            ]
            for i, payload in enumerate(odd_payloads):
                await js.publish(
                    f"stockpilot.usage.odd.{i}",
                    payload,
                    headers={"Nats-Msg-Id": f"odd-{i}", "X-Trace": f"t{i}"},
                )
            original = await stored(js, USAGE)
        source = {**env}
        target = {**env, "STOCKPILOT_NATS_URL": fresh.url}
        # Import never creates streams (CONTRACT §2): into a bare server it stops, saying how
        # to ready one, and the server is left without any stream.
        code, out, err = await run_shell(
            cli(source, "events", "export", "usage") + " | " + cli(target, "events", "import")
        )
        assert code == 2, err.decode()
        assert b"stockpilot up --provision-only" in err
        bare = await nats.connect(fresh.url)
        try:
            assert await bare.jetstream().streams_info() == []
        finally:
            await bare.close()
        code, _, err = await run_shell(cli(target, "up", "--provision-only"))
        assert code == 0, err.decode()
        code, out, err = await run_shell(
            cli(source, "events", "export", "usage") + " | " + cli(target, "events", "import")
        )
        assert code == 0, err.decode()
        report = json.loads(out.decode().strip().splitlines()[-1])
        assert report["published"] == len(original) == 3005
        assert report["duplicates"] == 0
        assert b"export STOCKPILOT_USAGE: 3005 messages" in err
        async with connected(fresh.url) as nc:
            copied = await stored(nc.jetstream(), USAGE)
        assert copied == original
        # Importing again stores nothing twice: Nats-Msg-Id was kept.
        code, out, err = await run_shell(
            cli(source, "events", "export", USAGE) + " | " + cli(target, "events", "import")
        )
        assert code == 0, err.decode()
        assert json.loads(out.decode().strip())["duplicates"] == 3005
    finally:
        fresh.stop()


async def test_export_ranges_by_sequence_and_time(env: dict[str, str]) -> None:
    async with connected(env["STOCKPILOT_NATS_URL"]) as nc:
        js = nc.jetstream()
        await publish_counted(js, 10)
        await asyncio.sleep(0.05)
        middle = datetime.now(UTC)  # the real clock: the stream stamps messages with it
        await asyncio.sleep(0.05)
        await publish_counted(js, 5, start=10)

        async def export(**kwargs: object) -> list[stream_io.StoredMessage]:
            out = io.BytesIO()
            await stream_io.export_stream(js, USAGE, out, **kwargs)  # type: ignore[arg-type]
            return [stream_io.decode_line(line) for line in out.getvalue().splitlines()]

        assert [m.seq for m in await export(from_seq=13)] == [13, 14, 15]
        assert [m.seq for m in await export(since=middle)] == [11, 12, 13, 14, 15]
        assert [m.seq for m in await export(until=middle)] == list(range(1, 11))
        assert await export(from_seq=16) == []
        everything = await export()
        first = everything[0]
        assert (first.stream, first.subject) == (USAGE, "stockpilot.usage.recorded")
        assert first.headers == {"Nats-Msg-Id": "e0"}
        assert msgspec.json.decode(first.payload())["id"] == "e0"
        assert first.time is not None and abs(first.time - middle) < timedelta(seconds=30)


async def test_tail_prints_new_messages_as_json_lines(env: dict[str, str]) -> None:
    async with connected(env["STOCKPILOT_NATS_URL"]) as nc:
        js = nc.jetstream()
        await publish_counted(js, 3)  # already stored: not shown
        process = await asyncio.create_subprocess_shell(
            cli(env, "events", "tail", "'stockpilot.usage.>'", "--count", "2"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        assert process.stderr is not None
        line = await asyncio.wait_for(process.stderr.readline(), timeout=20)
        assert b"following stockpilot.usage.>" in line
        await publish_counted(js, 2, start=3)
        out, _ = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 0
    lines = [json.loads(text) for text in out.decode().splitlines()]
    assert [(m["seq"], m["subject"], m["data"]["id"]) for m in lines] == [
        (4, "stockpilot.usage.recorded", "e3"),
        (5, "stockpilot.usage.recorded", "e4"),
    ]
    assert all(m["time"] and m["stream"] == USAGE for m in lines)


async def test_tail_follows_core_subjects_without_a_stream(env: dict[str, str]) -> None:
    async with connected(env["STOCKPILOT_NATS_URL"]) as nc:
        seen: list[stream_io.StoredMessage] = []
        stop = asyncio.Event()
        task = asyncio.create_task(
            tail(nc, "stockpilot.deadletter.>", seen.append, stop=stop, count=1)
        )
        await asyncio.sleep(0.2)
        await dead_letter(nc, "usage", "stockpilot.usage.recorded", b"{bad", "not JSON")
        assert await asyncio.wait_for(task, timeout=5) == 1
    assert seen[0].seq is None
    assert seen[0].subject == "stockpilot.deadletter.usage"
    assert msgspec.json.decode(seen[0].payload())["reason"] == "not JSON"


async def test_replay_equals_the_live_view_and_detects_tampering(env: dict[str, str]) -> None:
    settings = load_settings(CommonSettings, env)
    definition, live = build()
    async with connected(env["STOCKPILOT_NATS_URL"]) as nc:
        js = nc.jetstream()
        await publish_counted(js, 20_000)
        await js.publish("stockpilot.usage.recorded", b"{not json")  # dead-lettered live too
        async with running_service(definition, settings):
            started = time.monotonic()
            fresh, _ = build()
            results = await replay_definition(nc, fresh, USAGE)
            assert time.monotonic() - started < 20
            assert [(r.projection, r.equal, r.events, r.refused, r.last_seq) for r in results] == [
                ("toy", True, 20_000, 1, 20_001)
            ]
            assert results[0].live_digest == results[0].replayed_digest
            # The alert ledger over STOCKPILOT_ALERTS replays equal too.
            for _ in range(100):
                if (
                    live.view.count == 20_000
                    and (await js.stream_info("STOCKPILOT_ALERTS")).state.messages
                ):
                    break
                await asyncio.sleep(0.05)
            alerts = await replay_definition(nc, build()[0], "STOCKPILOT_ALERTS")
            assert [(r.projection, r.equal) for r in alerts] == [("usage-alert-ledger", True)]

            live.view.by_model["m1"] += 1  # the live view no longer matches its events
            tampered = await replay_definition(nc, build()[0], USAGE)
            assert [(r.projection, r.equal) for r in tampered] == [("toy", False)]
            assert tampered[0].live_digest != tampered[0].replayed_digest


async def test_replay_without_the_live_service_is_an_error(env: dict[str, str]) -> None:
    async with connected(env["STOCKPILOT_NATS_URL"]) as nc:
        with pytest.raises(ReplayError, match="usage service is not running"):
            await replay_definition(nc, build()[0], USAGE, timeout=1)


def test_stream_names_are_accepted_in_either_form() -> None:
    assert stream_name("usage") == USAGE
    assert stream_name("stockpilot_alerts") == "STOCKPILOT_ALERTS"
    with pytest.raises(ReplayError, match="unknown stream"):
        stream_name("orders")


async def test_streams_reports_sizes_and_projection_lag(env: dict[str, str]) -> None:
    settings = load_settings(CommonSettings, env)
    definition, _ = build()
    async with connected(env["STOCKPILOT_NATS_URL"]) as nc:
        await publish_counted(nc.jetstream(), 50)
        runner = HookRunner(nc.jetstream(), [LogHook()])
        hooks_task = asyncio.create_task(runner.run())
        await asyncio.sleep(0.2)
        runner.stop.set()
        await asyncio.wait_for(hooks_task, timeout=10)
        async with running_service(definition, settings):
            lines = await streams_report(nc, timeout=0.5)
            code, out, err = await run_shell(cli(env, "streams", "--json", "--timeout", "0.5"))
    streams = {line.stream: line for line in lines if isinstance(line, StreamLine)}
    assert set(streams) >= {USAGE, "STOCKPILOT_HEALTH", "STOCKPILOT_BATCH", "STOCKPILOT_ALERTS"}
    assert streams[USAGE].messages == 50 and streams[USAGE].last_seq == 50
    assert streams[USAGE].bytes > 0
    services = {line.service: line for line in lines if isinstance(line, ServiceLine)}
    assert services["usage"].status == "up"
    assert services["health"].status == "unavailable"
    toy = next(
        line for line in lines if isinstance(line, ProjectionLine) and line.projection == "toy"
    )
    # (lag is the runtime's own figure; see the report about its start-up race)
    assert (toy.last_seq, toy.caught_up, toy.stream) == (50, True, USAGE)
    hooks = [line for line in lines if isinstance(line, HookLine)]
    assert [(h.hook, h.state) for h in hooks] == [("log", "stopped")]
    # Two services do not answer: said on stderr, and the exit status says it too.
    assert code == 1, err.decode()
    assert b"not answering: health, batch" in err
    kinds = [json.loads(text)["kind"] for text in out.decode().splitlines()]
    assert kinds.count("stream") >= 4 and "projection" in kinds and "service" in kinds
    assert kinds[-1] == "hook"


async def test_commands_fail_clearly_without_nats(tmp_path: Path) -> None:
    env = {
        "STOCKPILOT_NATS_URL": "nats://127.0.0.1:1",
        "STOCKPILOT_CONFIG": str(ROOT / "tests" / "empty.toml"),
    }
    code, out, err = await run_shell(cli(env, "streams"))
    assert code == 2
    assert err.decode().strip() == (
        "stockpilot: no NATS answers at 127.0.0.1:1 (STOCKPILOT_NATS_URL): start it, or set "
        "STOCKPILOT_NATS_URL to the running stack's NATS"
    )
    assert out == b""


@pytest.mark.slow
async def test_replay_of_100k_events(env: dict[str, str]) -> None:
    settings = load_settings(CommonSettings, env)
    definition, _ = build()
    async with connected(env["STOCKPILOT_NATS_URL"]) as nc:
        await publish_counted(nc.jetstream(), 100_000)
        async with running_service(definition, settings, ready_timeout=120):
            started = time.monotonic()
            results = await replay_definition(nc, build()[0], USAGE)
            elapsed = time.monotonic() - started
    assert [(r.equal, r.events) for r in results] == [(True, 100_000)]
    print(f"replayed 100k events in {elapsed:.2f}s", file=sys.stderr)


def test_import_drops_publish_preconditions_unless_asked() -> None:
    headers = {"Nats-Msg-Id": "lock-1", "Nats-Expected-Last-Subject-Sequence": "41", "X-A": "b"}
    assert stream_io.publish_headers(headers, keep_preconditions=False) == {
        "Nats-Msg-Id": "lock-1",
        "X-A": "b",
    }
    assert stream_io.publish_headers(headers, keep_preconditions=True) == headers
    assert stream_io.publish_headers(None, keep_preconditions=False) == {}


async def test_import_names_the_line_that_is_not_an_exported_message(env: dict[str, str]) -> None:
    good = stream_io.encode_line(
        stream_io.stored_message(
            "stockpilot.usage.recorded", b"{}", stream=USAGE, seq=1, moment=T0, headers=None
        )
    )
    async with connected(env["STOCKPILOT_NATS_URL"]):
        pass  # the stack's streams exist (import never creates them)
    code, _, err = await run_shell(cli(env, "events", "import"), stdin=good + b'{"seq": 2}\n')
    assert code == 2
    assert b"line 2 is not an exported message" in err
