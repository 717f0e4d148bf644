"""The usage client against real NATS: what it records, restarts of NATS, a full buffer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import msgspec
import nats as nats_py
import pytest

from services.usage.client import UsageRecorder
from services.usage.contract import StatsParams, UsageStats
from services.usage.service import build
from shared.clock import ManualClock
from shared.events import utc_now
from shared.settings import CommonSettings, load_settings
from shared.streams import provision
from tests.harness import NatsServer, running_service
from tests.usage.helpers import recorded, usage_settings


class RateLimitError(Exception):
    """Shaped like openai.RateLimitError: status_code, code, request_id."""

    status_code = 429
    code = "rate_limit_exceeded"
    request_id = "req_limited"


async def chat_completion() -> Any:
    await asyncio.sleep(0.01)
    return SimpleNamespace(
        id="chatcmpl-1",
        _request_id="req_ok",
        model="gpt-4o-mini-2024-07-18",
        usage=SimpleNamespace(
            prompt_tokens=1000,
            completion_tokens=200,
            prompt_tokens_details=SimpleNamespace(cached_tokens=400),
        ),
    )


async def rate_limited() -> Any:
    raise RateLimitError("slow down")


async def stream_count(env: dict[str, str]) -> int:
    nc = await nats_py.connect(env["STOCKPILOT_NATS_URL"])
    info = await nc.jetstream().stream_info("STOCKPILOT_USAGE")
    await nc.close()
    return int(info.state.messages)


async def test_tracked_calls_are_recorded_with_tokens_status_and_latency(
    env: dict[str, str],
) -> None:
    settings = usage_settings(env)
    # The recorder stamps its calls with the machine's clock (it takes no other): ask for the
    # days they can fall on, so a run across midnight finds them too.
    first_day = utc_now().astimezone(settings.zone).date()
    async with running_service(build(settings), settings):
        recorder = await UsageRecorder.connect(settings)
        response = await recorder.track(
            chat_completion(), endpoint="/api/v1/analysis", user_id="u-7"
        )
        assert response.id == "chatcmpl-1"
        with pytest.raises(RateLimitError):
            await recorder.track(rate_limited(), model="gpt-4o", endpoint="/api/v1/chat")
        await recorder.close()
        assert (recorder.published, recorder.dropped) == (2, 0)
        days = StatsParams(
            start=first_day.isoformat(),
            end=utc_now().astimezone(settings.zone).date().isoformat(),
        )
        nc = await nats_py.connect(env["STOCKPILOT_NATS_URL"])
        for _ in range(100):
            msg = await nc.request(
                "stockpilot.svc.usage.stats", msgspec.json.encode(days), timeout=2
            )
            stats = msgspec.json.decode(msg.data, type=UsageStats)
            if stats.total_requests == 2:
                break
            await asyncio.sleep(0.02)
        await nc.close()
    assert stats.total_requests == 2 and stats.failed_requests == 1
    ok = stats.by_model["gpt-4o-mini-2024-07-18"]
    assert (ok.prompt_tokens, ok.completion_tokens, ok.cached_tokens) == (1000, 200, 400)
    # gpt-4o-mini: 600 input at 0.15, 400 cached at 0.075, 200 output at 0.60 per million.
    assert ok.cost_usd == pytest.approx((600 * 0.15 + 400 * 0.075 + 200 * 0.60) / 1e6)
    assert ok.avg_response_time_ms >= 10
    assert stats.by_error_code == {"rate_limit_exceeded": 1}
    assert stats.by_status_code == {"200": 1, "429": 1}
    assert stats.top_users[0].user_id == "u-7"


@pytest.mark.parametrize("bare", [True, False], ids=["bare-connection", "nats-py"])
async def test_a_nats_restart_loses_nothing(
    nats: NatsServer, env: dict[str, str], bare: bool, clock: ManualClock
) -> None:
    settings = load_settings(CommonSettings, env)
    nc = await nats_py.connect(settings.nats_servers)
    await provision(nc.jetstream())
    await nc.close()
    recorder = await UsageRecorder.connect(settings, publish_timeout=0.5, bare=bare)
    now = clock.now()
    for i in range(20):
        recorder.record(recorded(i, now))
    await recorder.flush()
    nats.stop()
    # Two seconds of calls while NATS is down (the design holds for far longer outages:
    # the buffer only has to hold what arrives meanwhile).
    for i in range(20, 60):
        recorder.record(recorded(i, now))
        await asyncio.sleep(0.05)
    assert recorder.pending > 0
    nats.start()
    await asyncio.wait_for(recorder.flush(), timeout=30)
    await recorder.close()
    assert recorder.dropped == 0
    assert recorder.published + recorder.duplicates == 60
    assert await stream_count(env) == 60


@pytest.mark.slow
async def test_a_30_second_nats_outage_loses_nothing(
    nats: NatsServer, env: dict[str, str], clock: ManualClock
) -> None:
    # The bound: calls go on for the whole outage, and all of them are stored once.
    settings = load_settings(CommonSettings, env)
    nc = await nats_py.connect(settings.nats_servers)
    await provision(nc.jetstream())
    await nc.close()
    recorder = await UsageRecorder.connect(settings, publish_timeout=0.5)
    now = clock.now()
    recorder.record(recorded(0, now))
    await recorder.flush()
    nats.stop()
    loop = asyncio.get_running_loop()
    outage_ends = loop.time() + 30.0
    count = 1
    while loop.time() < outage_ends:
        recorder.record(recorded(count, now))
        count += 1
        await asyncio.sleep(0.1)
    assert recorder.pending == count - 1
    nats.start()
    await asyncio.wait_for(recorder.flush(), timeout=60)
    await recorder.close()
    assert recorder.dropped == 0
    assert recorder.published + recorder.duplicates == count
    assert await stream_count(env) == count


async def test_without_a_spool_a_full_buffer_drops_and_counts(
    env: dict[str, str], clock: ManualClock
) -> None:
    settings = load_settings(CommonSettings, env)
    nc = await nats_py.connect(settings.nats_servers)
    await provision(nc.jetstream())
    recorder = UsageRecorder(nc, buffer_size=5)
    now = clock.now()
    kept = [recorder.record(recorded(i, now)) for i in range(8)]
    assert kept == [True] * 5 + [False] * 3
    assert (recorder.pending, recorder.dropped) == (5, 3)
    recorder.start()
    await recorder.close()
    assert recorder.published == 5
    assert await stream_count(env) == 5
    await nc.close()


@pytest.mark.parametrize("bare", [True, False], ids=["bare-connection", "nats-py"])
async def test_many_calls_are_stored_once_each_in_order_and_repeats_count_as_duplicates(
    env: dict[str, str], bare: bool, clock: ManualClock
) -> None:
    settings = load_settings(CommonSettings, env)
    nc = await nats_py.connect(settings.nats_servers)
    js = nc.jetstream()
    await provision(js)
    recorder = UsageRecorder(nc, buffer_size=20_000, bare=bare)
    recorder.start()
    now = clock.now()
    # More than MAX_IN_FLIGHT, so windows are acknowledged while later ones go out.
    for i in range(10_000):
        assert recorder.record(recorded(i, now))
    await asyncio.wait_for(recorder.flush(), timeout=60)
    for i in range(0, 10_000, 1000):  # the same calls again: JetStream keeps the first
        recorder.record(recorded(i, now))
    await recorder.close()
    assert recorder.connection == ("bare" if bare else "nats-py")
    assert (recorder.published, recorder.duplicates, recorder.dropped) == (10_000, 10, 0)
    assert await stream_count(env) == 10_000
    first = await js.get_msg("STOCKPILOT_USAGE", 1)
    last = await js.get_msg("STOCKPILOT_USAGE", 10_000)
    assert first.data is not None and last.data is not None
    assert msgspec.json.decode(first.data)["id"] == "req-0"
    assert msgspec.json.decode(last.data)["id"] == "req-9999"
    await nc.close()


async def test_an_event_too_large_for_a_message_is_dropped_and_the_rest_go_on(
    env: dict[str, str], caplog: pytest.LogCaptureFixture, clock: ManualClock
) -> None:
    settings = load_settings(CommonSettings, env)
    nc = await nats_py.connect(settings.nats_servers)
    await provision(nc.jetstream())
    recorder = UsageRecorder(nc)
    recorder.start()
    now = clock.now()
    # Constructing an event does not check field lengths; a message over the limit would be
    # refused by nats-server and, retried forever, hold up everything behind it.
    huge = recorded(1, now, endpoint="/" + "x" * 1_100_000)
    kept = [recorder.record(event) for event in (recorded(0, now), huge, recorded(2, now))]
    assert kept == [True, False, True]
    await recorder.close()
    assert (recorder.published, recorder.dropped) == (2, 1)
    assert await stream_count(env) == 2
    assert "usage event req-1 dropped" in caplog.text
    await nc.close()
