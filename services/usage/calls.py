"""One LLM call from its start to its one usage event: answered, failed or streamed.

Why one module of over 300 lines: it is the life of one call, from `Call.begin` to its one
event, and the stream wrappers, the duck-typed readers of response shapes (`_get`) and the
event builders all serve that one path; split, the rules for what ends a call and what it
records would sit in several files that only make sense together.

The usage client (`UsageRecorder.track`) and `instrument(client)` both time a call with a
`Call`. A call that answers at once is recorded when it returns or raises; a streamed one
(an OpenAI `Stream`/`AsyncStream` of chat completion chunks or Responses API events) comes
back wrapped, and is recorded when the stream ends, fails or is closed: tokens from its
final usage (chat completions send it only with `stream_options={"include_usage": True}`,
the Responses API always in `response.completed`), `ttft_ms` from its first content.

Shapes are read by attribute or key (`_get`), never by importing `openai`: the official
client, a compatible one, or dicts all work, and the application picks the library version.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from services.usage.contract import UsageRecorded
from shared.clock import Clock

log = logging.getLogger("stockpilot.usage.client")

T = TypeVar("T")

# The bounds of the event (services.usage.contract): what a caller hands in is clamped to
# them here, since a struct built in Python is not validated and an event outside them
# would be dead-lettered, losing the whole call.
MAX_TAGS = 16
MAX_TAG = 64
MAX_TASK_TYPE = 128
MAX_ERROR_CODE = 128
MAX_ERROR_MESSAGE = 1000
MAX_MILLIS = 1e8 - 1


# The call being timed in this thread or task: an instrumented client counts its attempts
# there, and does not record a call that `track` records already.
current_call: ContextVar[Call | None] = ContextVar("stockpilot_usage_call", default=None)


class Sink(Protocol):
    """Where a finished call goes (the UsageRecorder)."""

    def record(self, event: UsageRecorded) -> bool:
        """Keep one event for sending."""
        ...


@dataclass(frozen=True)
class Labels:
    """What the application says about a call (none of it comes from the provider)."""

    model: str | None = None
    endpoint: str | None = None
    user_id: str | None = None
    request_id: str | None = None
    tags: tuple[str, ...] = ()
    task_type: str | None = None

    def over(self, base: Labels) -> Labels:
        """These labels where set, `base`'s elsewhere; tags of both."""
        return Labels(
            model=self.model or base.model,
            endpoint=self.endpoint or base.endpoint,
            user_id=self.user_id or base.user_id,
            request_id=self.request_id or base.request_id,
            tags=tuple(dict.fromkeys((*base.tags, *self.tags))),
            task_type=self.task_type or base.task_type,
        )


@dataclass
class Call:
    """A call being timed; `answered`/`failed`/the stream's end record it exactly once."""

    sink: Sink
    labels: Labels
    started_at: datetime
    start: float = field(default_factory=time.perf_counter)
    # HTTP requests the client library sent for this call (instrumented clients count
    # them); 0: not known.
    attempts: int = 0
    # The model the request asked for: named when the provider's answer does not say.
    requested_model: str | None = None
    streamed: bool = False
    ttft_ms: float | None = None
    # What the stream said so far: the object carrying its usage, its model, its status.
    summary: Any = None
    model: str | None = None
    status_code: int = 200
    stream_error: tuple[str, str | None] | None = None
    done: bool = False

    @classmethod
    def begin(cls, sink: Sink, labels: Labels, clock: Clock) -> Call:
        """A call starting now."""
        return cls(sink=sink, labels=labels, started_at=clock.now())

    def attempted(self) -> None:
        """The client library is sending (again): latency counts from this attempt on."""
        self.attempts += 1
        self.start = time.perf_counter()

    def elapsed_ms(self) -> float:
        """Milliseconds since the call's last attempt started (its start, when the attempts
        are not known): failed attempts and the back-off before a retry are counted in the
        attempts tag, not hidden in the latency."""
        return min(round((time.perf_counter() - self.start) * 1000, 3), MAX_MILLIS)

    def answered(self, result: T) -> T:
        """The call returned: record it now, or wrap a stream to record when it ends."""
        if _is_async_stream(result):
            return _as(AsyncRecordedStream(result, self), result)
        if _is_stream(result):
            return _as(RecordedStream(result, self), result)
        fields = self._fields(_str(_get(result, "model")))
        self._finish(success_event(result, self.started_at, self.elapsed_ms(), **fields))
        return result

    def failed(self, exc: BaseException) -> None:
        """The call (or its stream) raised."""
        event = failure_event(exc, self.started_at, self.elapsed_ms(), **self._fields(self.model))
        if self.streamed and event.status_code == 0:
            # The error came inside a stream the server had answered (an `error` event):
            # there was an HTTP answer, and the error code says what went wrong.
            event = replace_event(event, status_code=self.status_code)
        self._finish(event)

    def observe(self, item: Any) -> None:
        """One chunk (chat completions) or event (Responses API) of a stream."""
        if self.ttft_ms is None and _has_content(item):
            self.ttft_ms = self.elapsed_ms()
        kind = _get(item, "type")
        if isinstance(kind, str):
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                response = _get(item, "response")
                self.summary = response
                error = _get(response, "error")
                if kind == "response.failed" or error is not None:
                    self.stream_error = (
                        str(_get(error, "code") or "response_failed"),
                        _text(_get(error, "message")),
                    )
            elif kind == "error":
                self.stream_error = (
                    str(_get(item, "code") or "error"),
                    _text(_get(item, "message")),
                )
            elif kind == "response.created":
                self.model = self.model or _str(_get(item, "response", "model"))
            return
        self.model = self.model or _str(_get(item, "model"))
        if _get(item, "usage") is not None:
            self.summary = item

    def stream_ended(self) -> None:
        """The stream ran out or was closed: record what it said."""
        if self.done:
            return
        if self.stream_error is not None:
            code, message = self.stream_error
            error = _StreamError(code, message)
            fields = self._fields(self.model)
            event = failure_event(error, self.started_at, self.elapsed_ms(), **fields)
            # A failed response may still have used (and billed) tokens: keep what it says.
            prompt, completion, cached = _tokens(self.summary)
            self._finish(
                replace_event(
                    event,
                    status_code=self.status_code,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    cached_tokens=cached,
                )
            )
            return
        summary = self.summary if self.summary is not None else {}
        reported = _str(_get(summary, "model")) or self.model
        fields = self._fields(reported)
        self._finish(success_event(summary, self.started_at, self.elapsed_ms(), **fields))

    def _fields(self, reported_model: str | None) -> dict[str, Any]:
        """The event's fields the call knows; the model named by the application first, then
        the one the provider answered with, then the one asked for."""
        tags = self.labels.tags
        if self.attempts > 1:
            # The contract has no `attempts` field: the retries of one logical call are a tag
            # (filterable like any other), the last one kept whatever else was given.
            tags = (*tags[: MAX_TAGS - 1], f"attempts:{self.attempts}")
        return {
            "model": self.labels.model or reported_model or self.requested_model,
            "endpoint": self.labels.endpoint,
            "user_id": self.labels.user_id,
            "request_id": self.labels.request_id,
            "tags": tags,
            "task_type": self.labels.task_type,
            "stream": self.streamed,
            "ttft_ms": self.ttft_ms,
        }

    def _finish(self, event: UsageRecorded) -> None:
        if not self.done:
            self.done = True
            self.sink.record(event)


class _StreamError(Exception):
    """An error a stream reported as an event rather than raised."""

    def __init__(self, code: str, message: str | None) -> None:
        super().__init__(message or code)
        self.code = code
        self.message = message or code


class RecordedStream(Generic[T]):
    """A synchronous stream that records its call when it ends; otherwise the stream itself
    (attributes such as `response` pass through)."""

    def __init__(self, stream: Any, call: Call) -> None:
        self._stream = stream
        self._call = call
        call.streamed = True
        call.status_code = _status_of(stream)
        rid = _request_id_of(stream)
        if rid and not call.labels.request_id:
            call.labels = replace(call.labels, request_id=rid)

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        try:
            item: T = next(self._stream)
        except StopIteration:
            self._call.stream_ended()
            raise
        except Exception as exc:
            self._call.failed(exc)
            raise
        self._call.observe(item)
        return item

    def close(self) -> None:
        """Close the stream; a call closed before its end is recorded with what it said."""
        try:
            self._stream.close()
        finally:
            self._call.stream_ended()

    def __enter__(self) -> RecordedStream[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __del__(self) -> None:
        # A stream dropped half-read and never closed: still one call, recorded.
        _end_abandoned(self.__dict__.get("_call"))


class AsyncRecordedStream(Generic[T]):
    """An asynchronous stream that records its call when it ends (see RecordedStream)."""

    def __init__(self, stream: Any, call: Call) -> None:
        self._stream = stream
        self._call = call
        call.streamed = True
        call.status_code = _status_of(stream)
        rid = _request_id_of(stream)
        if rid and not call.labels.request_id:
            call.labels = replace(call.labels, request_id=rid)

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            item: T = await self._stream.__anext__()
        except StopAsyncIteration:
            self._call.stream_ended()
            raise
        except Exception as exc:
            self._call.failed(exc)
            raise
        self._call.observe(item)
        return item

    async def close(self) -> None:
        """Close the stream; a call closed before its end is recorded with what it said."""
        try:
            closing = getattr(self._stream, "close", None) or getattr(self._stream, "aclose", None)
            if closing is not None:
                await closing()
        finally:
            self._call.stream_ended()

    async def aclose(self) -> None:
        """The same as close (async generators' name for it)."""
        await self.close()

    async def __aenter__(self) -> AsyncRecordedStream[T]:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __del__(self) -> None:
        _end_abandoned(self.__dict__.get("_call"))


def _end_abandoned(call: Call | None) -> None:
    if call is None or call.done:
        return
    try:
        call.stream_ended()
    except Exception:  # a finalizer must not raise; the call is lost, and said so
        log.exception("usage of an abandoned stream could not be recorded")


def _as(wrapper: Any, original: T) -> T:
    """The wrapper stands in for the stream it wraps (same iteration, same attributes)."""
    return wrapper  # type: ignore[no-any-return]


def _is_stream(result: Any) -> bool:
    # An iterator of chunks; a response model is iterable (pydantic) but no iterator.
    return hasattr(result, "__next__") and _get(result, "usage") is None


def _is_async_stream(result: Any) -> bool:
    return hasattr(result, "__anext__") and _get(result, "usage") is None


def _status_of(stream: Any) -> int:
    status = _get(stream, "response", "status_code")
    return status if isinstance(status, int) and 0 <= status <= 999 else 200


def _request_id_of(stream: Any) -> str | None:
    headers = _get(stream, "response", "headers")
    if headers is None:
        return None
    try:
        rid = headers.get("x-request-id")
    except Exception:
        return None
    return rid if isinstance(rid, str) and rid else None


def _has_content(item: Any) -> bool:
    """Whether a chunk or event carries the first generated text (or tool call)."""
    kind = _get(item, "type")
    if isinstance(kind, str):
        return kind.endswith(".delta")
    choices = _get(item, "choices")
    if not choices:
        return False
    for choice in choices:
        delta = _get(choice, "delta")
        if _get(delta, "content") or _get(delta, "tool_calls") or _get(delta, "refusal"):
            return True
    return False


def _get(obj: Any, *names: str) -> Any:
    """obj.a.b or obj["a"]["b"]; None when any step is missing."""
    for name in names:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


def _int(value: Any) -> int:
    return value if isinstance(value, int) and 0 <= value < 10**9 else 0


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _text(value: Any) -> str | None:
    return value[:MAX_ERROR_MESSAGE] if isinstance(value, str) and value else None


def _clean_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    """Tags within the event's bounds: printable, 1-64 characters, 16 at most."""
    kept = [t[:MAX_TAG] for t in tags if isinstance(t, str) and t and t[:MAX_TAG].isprintable()]
    return tuple(dict.fromkeys(kept))[:MAX_TAGS]


def _short(value: str | None, limit: int) -> str | None:
    return value[:limit] if value else None


def replace_event(event: UsageRecorded, **changes: Any) -> UsageRecorded:
    """The event with some fields changed."""
    return msgspec.structs.replace(event, **changes)


def _tokens(response: Any) -> tuple[int, int, int]:
    """Prompt, completion and cached tokens of an answer's usage (chat completions or
    Responses API names); 0 for what it does not say."""
    usage = _get(response, "usage")
    prompt = _get(usage, "prompt_tokens")
    if prompt is None:
        prompt = _get(usage, "input_tokens")
    completion = _get(usage, "completion_tokens")
    if completion is None:
        completion = _get(usage, "output_tokens")
    cached = _get(usage, "prompt_tokens_details", "cached_tokens")
    if cached is None:
        cached = _get(usage, "input_tokens_details", "cached_tokens")
    return _int(prompt), _int(completion), _int(cached)


def success_event(
    response: Any,
    started_at: datetime,
    elapsed_ms: float,
    *,
    model: str | None,
    endpoint: str | None,
    user_id: str | None,
    request_id: str | None,
    tags: tuple[str, ...] = (),
    task_type: str | None = None,
    stream: bool = False,
    ttft_ms: float | None = None,
) -> UsageRecorded:
    """The event of a call that answered (chat completions or responses API usage shapes)."""
    prompt, completion, cached = _tokens(response)
    return _call_event(
        request_id or _get(response, "_request_id") or _get(response, "id"),
        started_at,
        elapsed_ms,
        model=model or str(_get(response, "model") or "unknown"),
        endpoint=endpoint,
        user_id=user_id,
        tags=tags,
        task_type=task_type,
        stream=stream,
        ttft_ms=ttft_ms,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        status_code=200,
    )


def failure_event(
    exc: BaseException,
    started_at: datetime,
    elapsed_ms: float,
    *,
    model: str | None,
    endpoint: str | None,
    user_id: str | None,
    request_id: str | None,
    tags: tuple[str, ...] = (),
    task_type: str | None = None,
    stream: bool = False,
    ttft_ms: float | None = None,
) -> UsageRecorded:
    """The event of a call that raised: HTTP status, error code and message when the error
    has them."""
    status = _get(exc, "status_code")
    if not isinstance(status, int):
        status = _get(exc, "response", "status_code")
    code = _get(exc, "code")
    if not isinstance(code, str) or not code:
        name = type(exc).__name__
        code = "timeout" if "Timeout" in name else _snake(name)
    # The provider's own text: OpenAI's errors keep the error object of the answer in `body`
    # (their `message` adds "Error code: 429 - " to it).
    message = _text(_get(exc, "body", "message")) or _text(_get(exc, "message")) or _text(str(exc))
    return _call_event(
        request_id or _get(exc, "request_id"),
        started_at,
        elapsed_ms,
        model=model or "unknown",
        endpoint=endpoint,
        user_id=user_id,
        tags=tags,
        task_type=task_type,
        stream=stream,
        ttft_ms=ttft_ms,
        # 0: no HTTP answer at all (connection error, timeout).
        status_code=status if isinstance(status, int) and 0 <= status <= 999 else 0,
        error_code=code[:MAX_ERROR_CODE],
        error_message=message,
    )


def _call_event(
    rid: Any,
    started_at: datetime,
    elapsed_ms: float,
    *,
    model: str,
    endpoint: str | None,
    user_id: str | None,
    tags: tuple[str, ...],
    task_type: str | None,
    stream: bool,
    ttft_ms: float | None,
    **outcome: Any,
) -> UsageRecorded:
    """The event of one call, answered or not: what describes the call is the same for both
    (the id from the request id when there is one); `outcome` is what its answer said."""
    return UsageRecorded(
        id=str(rid) if rid else f"usage-{uuid.uuid4().hex}",
        occurred_at=started_at,
        request_id=str(rid) if rid else None,
        model=model,
        endpoint=endpoint,
        response_time_ms=round(elapsed_ms, 3),
        user_id=user_id,
        tags=_clean_tags(tags),
        task_type=_short(task_type, MAX_TASK_TYPE),
        stream=stream,
        ttft_ms=ttft_ms,
        **outcome,
    )


# A word starts at a capital after a lower-case letter or digit, or at the last capital of a
# run followed by lower case: APIConnectionError -> API|Connection|Error (as OpenAI names it).
_WORD_START = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def _snake(name: str) -> str:
    """An exception class name as the provider's error code: `api_connection_error`."""
    return _WORD_START.sub("_", name).lower()
