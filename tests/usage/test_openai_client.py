"""The usage client with the official `openai` package, against a loopback OpenAI-compatible
server (tests/usage/openai_server.py), a real nats-server and the usage service: streamed
chat completions and the Responses API, sync and async, `track()` and `instrument()`, the
library's retries as attempts of one call, and what /usage/stats charges for them."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats as nats_py
import openai
import pytest

from services.usage.client import UsageRecorder
from services.usage.contract import SUBJECT_RECORDED, UsageRecorded, decode_usage_event
from services.usage.instrument import instrument, usage_context
from services.usage.service import build
from services.usage.sync_recorder import SyncUsageRecorder
from shared.clock import ManualClock
from tests.harness import running_service
from tests.usage.helpers import gateway, gateway_settings, usage_settings
from tests.usage.openai_server import (
    BREAKS_MID_STREAM,
    MODEL,
    TEXT,
    OpenAIServer,
    running_openai_server,
)

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
MESSAGES = [{"role": "user", "content": "One line on NVDA"}]
# Per million tokens (the shipped table): gpt-4o-mini input, cached input, output.
PRICE = {"input": 0.15, "cached_input": 0.075, "output": 0.60}
CHAT_COST = (600 * PRICE["input"] + 400 * PRICE["cached_input"] + 200 * PRICE["output"]) / 1e6
RESPONSES_COST = (500 * PRICE["input"] + 100 * PRICE["output"]) / 1e6


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    with running_openai_server() as state:
        yield state


@pytest.fixture
async def recorder(env: dict[str, str], clock: ManualClock) -> AsyncIterator[UsageRecorder]:
    """The usage service running, and a recorder stamping calls with the test's clock."""
    settings = usage_settings(env)
    async with running_service(build(settings), settings, clock=clock):
        recorder = await UsageRecorder.connect(settings, clock=clock)
        try:
            yield recorder
        finally:
            await recorder.close()


async def stored(env: dict[str, str]) -> list[UsageRecorded]:
    """The usage.recorded events in the stream, in the order they were stored."""
    nc = await nats_py.connect(env["STOCKPILOT_NATS_URL"])
    js = nc.jetstream()
    info = await js.stream_info("STOCKPILOT_USAGE")
    events = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg("STOCKPILOT_USAGE", seq=seq)
        if msg.subject == SUBJECT_RECORDED:
            event = decode_usage_event(msg.data)
            assert isinstance(event, UsageRecorded)
            events.append(event)
    await nc.close()
    return events


async def stats_when(env: dict[str, str], clock: ManualClock, requests: int) -> dict[str, Any]:
    """/api/v1/usage/stats of the clock's day, once the service has folded `requests` calls."""
    async with gateway(gateway_settings(env), clock) as client:
        for _ in range(250):
            stats: dict[str, Any] = (await client.get("/api/v1/usage/stats")).json()
            if stats["total_requests"] >= requests:
                break
            await asyncio.sleep(0.02)
    assert stats["total_requests"] == requests
    return stats


def closed_port_url() -> str:
    """A loopback URL nothing listens on (a port just bound and released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def timed_stream(event: UsageRecorded) -> None:
    """A streamed call: flagged, with a time to first token within its whole time."""
    assert event.stream is True
    assert event.ttft_ms is not None and event.response_time_ms is not None
    assert 0 <= event.ttft_ms <= event.response_time_ms


async def test_an_instrumented_async_client_records_every_call_with_its_attempts(
    server: OpenAIServer, recorder: UsageRecorder, env: dict[str, str], clock: ManualClock
) -> None:
    client = instrument(
        openai.AsyncOpenAI(api_key="sk-test", base_url=server.base_url, max_retries=3),
        recorder,
        endpoint="/api/v1/analysis",
    )
    async with client:
        with usage_context(user_id="u-1", tags=("feature:screener",)):
            # 1. A chat completion the library retries once after a 429.
            server.fail_next(CHAT, 429)
            answer = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert answer.choices[0].message.content == "".join(TEXT)
        # 2. A streamed chat completion with its usage in the final chunk.
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        text = [c.choices[0].delta.content async for c in stream if c.choices]
        assert "".join(t or "" for t in text) == "".join(TEXT)
        # 3. The Responses API after a 500 and a 429 (three attempts), with a task type.
        server.fail_next(RESPONSES, 500, 429)
        with usage_context(task_type="summary", endpoint="/api/v1/news/summary"):
            response = await client.responses.create(model="gpt-4o-mini", input="Summarise")
        assert response.output_text == "".join(TEXT)
        # 4. The Responses API streamed.
        events = await client.responses.create(model="gpt-4o-mini", input="Hi", stream=True)
        kinds = [event.type async for event in events]
        assert kinds[-1] == "response.completed"
        # 5. Rate limited on every attempt: the library gives up after 1 + 3.
        server.fail_next(CHAT, 429, 429, 429, 429)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        # 6. A stream that breaks after its first words.
        broken = await client.chat.completions.create(
            model=BREAKS_MID_STREAM, messages=MESSAGES, stream=True
        )
        with pytest.raises(openai.APIError):
            async for _ in broken:
                pass
        await recorder.flush()

    retry_counts = [s.retry_count for s in server.seen]
    assert retry_counts == ["0", "1", "0", "0", "1", "2", "0", "0", "1", "2", "3", "0"]
    chat, streamed, summary, streamed_summary, limited, broke = await stored(env)

    assert (chat.prompt_tokens, chat.completion_tokens, chat.cached_tokens) == (1000, 200, 400)
    assert (chat.status_code, chat.error_code, chat.model) == (200, None, MODEL)
    assert (chat.user_id, chat.endpoint) == ("u-1", "/api/v1/analysis")
    assert chat.tags == ("feature:screener", "attempts:2")
    assert (chat.stream, chat.ttft_ms) == (False, None)
    assert chat.request_id == "req_2"  # the answering attempt's request id

    assert (streamed.prompt_tokens, streamed.completion_tokens) == (1000, 200)
    assert streamed.cached_tokens == 400 and streamed.status_code == 200
    assert streamed.tags == () and streamed.user_id is None
    timed_stream(streamed)

    assert (summary.prompt_tokens, summary.completion_tokens) == (500, 100)
    assert summary.tags == ("attempts:3",) and summary.task_type == "summary"
    assert summary.endpoint == "/api/v1/news/summary" and not summary.stream

    assert (streamed_summary.prompt_tokens, streamed_summary.completion_tokens) == (500, 100)
    assert streamed_summary.error_code is None
    timed_stream(streamed_summary)

    assert (limited.status_code, limited.error_code) == (429, "rate_limit_error")
    assert limited.error_message == "Rate limit reached for gpt-4o-mini"
    assert limited.tags == ("attempts:4",) and limited.model == "gpt-4o-mini"
    assert limited.prompt_tokens == 0

    assert (broke.status_code, broke.error_code) == (200, "overloaded")
    assert broke.error_message == "The model is overloaded"
    timed_stream(broke)

    stats = await stats_when(env, clock, 6)
    assert (stats["successful_requests"], stats["failed_requests"]) == (4, 2)
    assert stats["by_error_code"] == {"rate_limit_error": 1, "overloaded": 1}
    by_model = stats["by_model"]
    assert by_model[MODEL]["requests"] == 5  # dated name, priced as gpt-4o-mini
    assert by_model[MODEL]["cost_usd"] == pytest.approx(2 * CHAT_COST + 2 * RESPONSES_COST)
    assert by_model["gpt-4o-mini"]["cost_usd"] == 0
    assert stats["total_cost_usd"] == pytest.approx(2 * CHAT_COST + 2 * RESPONSES_COST)


async def test_a_sync_client_in_a_worker_thread_is_recorded_through_the_recorders_loop(
    server: OpenAIServer, recorder: UsageRecorder, env: dict[str, str], clock: ManualClock
) -> None:
    client = instrument(
        openai.OpenAI(api_key="sk-test", base_url=server.base_url, max_retries=2),
        recorder,
        tags=("team:quant",),
    )
    plain = openai.OpenAI(api_key="sk-test", base_url=server.base_url, max_retries=0)

    def calls() -> list[str]:
        """What a synchronous part of StockPilot AI does, off the event loop."""
        with client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            user="u-9",
        ) as stream:
            words = [c.choices[0].delta.content or "" for c in stream if c.choices]
        server.fail_next(RESPONSES, 429)
        response = client.responses.create(model="gpt-4o-mini", input="Summarise")
        # The library's helpers: stream() goes through create, parse() posts by itself.
        with client.chat.completions.stream(
            model="gpt-4o-mini", messages=MESSAGES, stream_options={"include_usage": True}
        ) as helper:
            final = helper.get_final_completion()
        parsed = client.responses.parse(model="gpt-4o-mini", input="Summarise")
        # track_sync over a client that is not instrumented: a streamed Responses call.
        events = recorder.track_sync(
            lambda: plain.responses.create(model="gpt-4o-mini", input="Hi", stream=True),
            endpoint="/api/v1/chat",
            tags=("feature:chat",),
        )
        kinds = [event.type for event in events]
        client.close()
        plain.close()
        return [
            "".join(words),
            response.output_text,
            final.choices[0].message.content or "",
            parsed.output_text,
            kinds[-1],
        ]

    assert await asyncio.to_thread(calls) == [*["".join(TEXT)] * 4, "response.completed"]
    await recorder.flush()
    streamed, retried, helped, parsed, tracked = await stored(env)
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (1000, 200)
    assert streamed.user_id == "u-9" and streamed.tags == ("team:quant",)
    timed_stream(streamed)
    assert (retried.prompt_tokens, retried.completion_tokens) == (500, 100)
    assert retried.tags == ("team:quant", "attempts:2") and not retried.stream
    assert (helped.prompt_tokens, helped.completion_tokens) == (1000, 200)
    assert helped.tags == ("team:quant",)
    timed_stream(helped)
    assert (parsed.prompt_tokens, parsed.completion_tokens) == (500, 100) and not parsed.stream
    assert (tracked.prompt_tokens, tracked.completion_tokens) == (500, 100)
    assert tracked.endpoint == "/api/v1/chat" and tracked.tags == ("feature:chat",)
    timed_stream(tracked)

    stats = await stats_when(env, clock, 5)
    assert stats["total_cost_usd"] == pytest.approx(2 * CHAT_COST + 3 * RESPONSES_COST)


async def test_track_records_a_streamed_chat_and_a_call_through_an_instrumented_client_once(
    server: OpenAIServer, recorder: UsageRecorder, env: dict[str, str], clock: ManualClock
) -> None:
    plain = openai.AsyncOpenAI(api_key="sk-test", base_url=server.base_url)
    stream = await recorder.track(
        plain.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        ),
        endpoint="/api/v1/chat",
        user_id="u-3",
    )
    async with stream:
        first = await stream.__anext__()
        assert first.choices[0].delta.role == "assistant"
        rest = [chunk async for chunk in stream]
    assert rest[-1].usage is not None and rest[-1].usage.prompt_tokens == 1000

    instrumented = instrument(
        openai.AsyncOpenAI(api_key="sk-test", base_url=server.base_url, max_retries=1), recorder
    )
    assert instrument(instrumented, recorder) is instrumented  # twice changes nothing
    server.fail_next(CHAT, 500)
    await recorder.track(
        instrumented.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES),
        endpoint="/api/v1/analysis",
        tags=("feature:report",),
    )
    # Nothing listens: no HTTP answer at all, after the library's one retry.
    unreachable = instrument(
        openai.AsyncOpenAI(api_key="sk-test", base_url=closed_port_url(), max_retries=1),
        recorder,
    )
    with pytest.raises(openai.APIConnectionError):
        await unreachable.responses.create(model="gpt-4o", input="Hi")
    await plain.close()
    await instrumented.close()
    await unreachable.close()
    await recorder.flush()

    streamed, retried, refused = await stored(env)
    assert (refused.status_code, refused.error_code) == (0, "api_connection_error")
    assert refused.tags == ("attempts:2",) and refused.model == "gpt-4o"
    assert (streamed.prompt_tokens, streamed.completion_tokens, streamed.cached_tokens) == (
        1000,
        200,
        400,
    )
    assert streamed.user_id == "u-3" and streamed.model == MODEL
    timed_stream(streamed)
    # Recorded by track (its labels) once, with the attempts the instrumented client counted.
    assert retried.endpoint == "/api/v1/analysis"
    assert retried.tags == ("feature:report", "attempts:2")
    stats = await stats_when(env, clock, 3)
    assert stats["failed_requests"] == 1
    assert stats["total_cost_usd"] == pytest.approx(2 * CHAT_COST)


async def test_a_synchronous_program_records_through_a_recorder_on_its_own_thread(
    server: OpenAIServer, env: dict[str, str], clock: ManualClock
) -> None:
    settings = usage_settings(env)

    def program() -> str:
        """A script without an event loop (a cron job), as StockPilot AI's batch jobs are."""
        with SyncUsageRecorder.connect(settings, clock=clock) as recorder:
            client = instrument(
                openai.OpenAI(api_key="sk-test", base_url=server.base_url),
                recorder,
                endpoint="/jobs/daily-report",
            )
            server.fail_next(CHAT, 500)
            answer = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            client.close()
            recorder.flush()
            assert (recorder.recorder.published, recorder.recorder.dropped) == (1, 0)
        return answer.choices[0].message.content or ""

    async with running_service(build(settings), settings, clock=clock):
        assert await asyncio.to_thread(program) == "".join(TEXT)
        (event,) = await stored(env)
        assert event.endpoint == "/jobs/daily-report" and event.tags == ("attempts:2",)
        assert (event.prompt_tokens, event.status_code) == (1000, 200)
        stats = await stats_when(env, clock, 1)
    assert stats["total_cost_usd"] == pytest.approx(CHAT_COST)
