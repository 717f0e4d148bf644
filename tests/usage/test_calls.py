"""A call from its start to its one event, without servers: streams of chunks as dicts,
labels clamped to the event's bounds, the attempts tag, a stream dropped half-read."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

from services.usage.calls import Call, Labels
from services.usage.contract import SUBJECT_RECORDED, UsageRecorded
from shared.clock import ManualClock


class Sink:
    """Keeps what is recorded."""

    def __init__(self) -> None:
        self.events: list[UsageRecorded] = []

    def record(self, event: UsageRecorded) -> bool:
        self.events.append(event)
        return True


class Chunks:
    """A stream of chunks, as an OpenAI Stream iterates them."""

    def __init__(self, items: list[Any]) -> None:
        self._items: Iterator[Any] = iter(items)
        self.closed = False

    def __next__(self) -> Any:
        return next(self._items)

    def __iter__(self) -> Chunks:
        return self

    def close(self) -> None:
        self.closed = True


def chunk(content: str | None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    return {
        "id": "chatcmpl-1",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": choices,
        "usage": usage,
    }


def begin(sink: Sink, clock: ManualClock, **labels: Any) -> Call:
    return Call.begin(sink, Labels(**labels), clock)


def test_a_chat_stream_is_recorded_at_its_end_with_its_final_usage(clock: ManualClock) -> None:
    sink = Sink()
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    stream = begin(sink, clock).answered(
        Chunks([chunk(""), chunk("Hi"), chunk("!"), chunk(None, usage)])
    )
    assert [c["choices"] for c in stream][1][0]["delta"]["content"] == "Hi"
    (event,) = sink.events
    assert (event.prompt_tokens, event.completion_tokens, event.cached_tokens) == (10, 3, 4)
    assert event.stream and event.ttft_ms is not None and event.model == "gpt-4o-mini-2024-07-18"
    assert event.occurred_at == clock.now()


def test_a_stream_without_content_has_no_time_to_first_token(clock: ManualClock) -> None:
    sink = Sink()
    list(begin(sink, clock).answered(Chunks([chunk(""), chunk(None)])))
    assert sink.events[0].ttft_ms is None and sink.events[0].prompt_tokens == 0


def test_a_responses_stream_that_fails_is_a_failed_call(clock: ManualClock) -> None:
    sink = Sink()
    failed = {
        "type": "response.failed",
        "response": {
            "model": "gpt-4o",
            "usage": {"input_tokens": 7, "output_tokens": 0},
            "error": {"code": "server_error", "message": "The model crashed"},
        },
    }
    events = [{"type": "response.created", "response": {"model": "gpt-4o"}}, failed]
    list(begin(sink, clock, endpoint="/api/v1/chat").answered(Chunks(events)))
    (event,) = sink.events
    assert (event.status_code, event.error_code) == (200, "server_error")
    assert event.error_message == "The model crashed" and event.failed
    assert event.model == "gpt-4o" and event.endpoint == "/api/v1/chat"
    assert (event.prompt_tokens, event.completion_tokens) == (7, 0)  # what it used


def test_a_stream_closed_early_or_dropped_is_recorded_once(clock: ManualClock) -> None:
    sink = Sink()
    chunks = Chunks([chunk("a"), chunk("b")])
    stream = begin(sink, clock).answered(chunks)
    next(stream)
    stream.close()
    stream.close()
    assert chunks.closed and len(sink.events) == 1
    dropped = begin(sink, clock).answered(Chunks([chunk("a"), chunk("b")]))
    next(dropped)
    del dropped
    gc.collect()
    assert len(sink.events) == 2 and sink.events[1].stream


def test_labels_are_clamped_to_the_events_bounds_and_the_attempts_tag_is_kept(
    clock: ManualClock,
) -> None:
    sink = Sink()
    tags = tuple(f"t{i}" for i in range(20)) + ("x" * 100, "bad\ttag", "")
    call = begin(sink, clock, tags=tags, task_type="y" * 300, model="gpt-4o")
    call.attempts = 3
    call.failed(RuntimeError("e" * 5000))
    (event,) = sink.events
    assert len(event.tags) == 16 and event.tags[-1] == "attempts:3"
    assert event.tags[:15] == tuple(f"t{i}" for i in range(15))
    assert len(event.task_type or "") == 128 and len(event.error_message or "") == 1000
    assert event.error_code == "runtime_error" and event.status_code == 0
    assert event.stored_problem(SUBJECT_RECORDED) is None


def test_one_attempt_adds_no_tag_and_an_answer_is_recorded_at_once(clock: ManualClock) -> None:
    sink = Sink()
    call = begin(sink, clock, tags=("feature:x",))
    call.attempts = 1
    answer = {"model": "gpt-4o", "usage": {"input_tokens": 5, "output_tokens": 2}, "id": "resp_1"}
    assert call.answered(answer) is answer
    assert sink.events[0].tags == ("feature:x",) and sink.events[0].id == "resp_1"
    assert (sink.events[0].prompt_tokens, sink.events[0].completion_tokens) == (5, 2)


def test_the_latency_of_a_retried_call_counts_from_its_last_attempt(clock: ManualClock) -> None:
    """Failed attempts and back-off go to the attempts tag, not into response_time_ms."""
    sink = Sink()
    call = begin(sink, clock)
    call.attempted()
    call.start -= 100.0  # the first attempt and its back-off took 100 s
    call.attempted()
    call.answered({"model": "gpt-4o", "usage": {"input_tokens": 1}})
    (event,) = sink.events
    assert event.tags == ("attempts:2",)
    assert event.response_time_ms is not None and event.response_time_ms < 100_000
    assert event.occurred_at == clock.now()  # the logical call's start
