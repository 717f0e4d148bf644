"""One line that records every call of an OpenAI client object.

    recorder = await UsageRecorder.connect(settings)
    client = instrument(openai.AsyncOpenAI(), recorder, endpoint="/api/v1/analysis")
    with usage_context(user_id=user.id, tags=("feature:screener",)):
        answer = await client.chat.completions.create(model="gpt-4o-mini", messages=...)

`create`, `parse` and `stream` of `client.chat.completions` and `client.responses` of that
object (an `openai.OpenAI` or `openai.AsyncOpenAI`) are recorded, streamed or not, answered
or failed
(errors named as `failure_event` names them: the provider's `code`, else its class name).
The library's own retries stay one logical call: every HTTP request it sends for the call
is counted (its `_prepare_request` hook, which runs once per attempt), and a call that took
more than one carries the tag `attempts:N`, and its `response_time_ms` (and `ttft_ms`) count
from the start of its last attempt: the failed attempts and the back-off before each retry
are in the tag, not hidden in the latency.

`usage_context` labels the calls made inside it (in this thread or task): endpoint, user,
tags and task type, over the defaults given to `instrument`. A call made inside `track()`
is recorded by `track` only, once.

Clients made from it later (`client.with_options(...)`, `copy()`) are new objects: instrument
them too. `with_raw_response` / `with_streaming_response` calls are not recorded.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from services.usage.calls import Call, Labels, Sink, current_call
from shared.clock import Clock

C = TypeVar("C")

# The labels of the innermost usage_context.
_scope: ContextVar[Labels | None] = ContextVar("stockpilot_usage_labels", default=None)
_NO_LABELS = Labels()

_MARK = "_stockpilot_instrumented"


class Recorder(Sink, Protocol):
    """What instrument needs of the UsageRecorder: where calls go, and its clock."""

    @property
    def clock(self) -> Clock:
        """Stamps each call's start."""
        ...


@contextlib.contextmanager
def usage_context(
    *,
    endpoint: str | None = None,
    user_id: str | None = None,
    tags: tuple[str, ...] = (),
    task_type: str | None = None,
    model: str | None = None,
) -> Iterator[None]:
    """Label the instrumented calls made inside (nested contexts add tags, inner names win)."""
    labels = Labels(
        model=model, endpoint=endpoint, user_id=user_id, tags=tuple(tags), task_type=task_type
    )
    token = _scope.set(labels.over(_scope.get() or _NO_LABELS))
    try:
        yield
    finally:
        _scope.reset(token)


def instrument(
    client: C,
    recorder: Recorder,
    *,
    endpoint: str | None = None,
    user_id: str | None = None,
    tags: tuple[str, ...] = (),
    task_type: str | None = None,
) -> C:
    """Record every chat completion and Responses API call of `client`; returns it.

    Instrumenting the same client twice changes nothing.
    """
    if getattr(client, _MARK, False):
        return client
    defaults = Labels(endpoint=endpoint, user_id=user_id, tags=tuple(tags), task_type=task_type)
    # An AsyncOpenAI's methods are not all coroutine functions (some are sync wrappers that
    # return a coroutine); its request hook is, and so is what they wrap.
    asynchronous = inspect.iscoroutinefunction(getattr(client, "_prepare_request", None))
    _count_attempts(client)
    for path in (("chat", "completions"), ("responses",)):
        resource: Any = client
        for name in path:
            resource = getattr(resource, name, None)
        # `stream()` goes through `create`; `parse()` posts by itself.
        for method in ("create", "parse"):
            original = getattr(resource, method, None)
            if original is None:
                continue
            # An instance attribute over the class's method; the client caches its resources
            # (`client.chat` is the same object at every access), so this stays.
            is_async = asynchronous or inspect.iscoroutinefunction(inspect.unwrap(original))
            setattr(resource, method, _recorded(original, recorder, defaults, is_async))
    setattr(client, _MARK, True)
    return client


def _recorded(
    create: Callable[..., Any], recorder: Recorder, defaults: Labels, is_async: bool
) -> Any:
    if is_async:

        @functools.wraps(create)
        async def create_async(*args: Any, **kwargs: Any) -> Any:
            if current_call.get() is not None:  # inside track(): recorded there
                return await create(*args, **kwargs)
            call = _begin(recorder, defaults, kwargs)
            token = current_call.set(call)
            try:
                result = await create(*args, **kwargs)
            except Exception as exc:
                call.failed(exc)
                raise
            finally:
                current_call.reset(token)
            return call.answered(result)

        return create_async

    @functools.wraps(create)
    def create_sync(*args: Any, **kwargs: Any) -> Any:
        if current_call.get() is not None:
            return create(*args, **kwargs)
        call = _begin(recorder, defaults, kwargs)
        token = current_call.set(call)
        try:
            result = create(*args, **kwargs)
        except Exception as exc:
            call.failed(exc)
            raise
        finally:
            current_call.reset(token)
        return call.answered(result)

    return create_sync


def _begin(recorder: Recorder, defaults: Labels, kwargs: dict[str, Any]) -> Call:
    labels = (_scope.get() or _NO_LABELS).over(defaults)
    if labels.user_id is None:
        # The end-user id the application already hands OpenAI, when it does.
        for name in ("safety_identifier", "user"):
            value = kwargs.get(name)
            if isinstance(value, str) and value:
                labels = replace(labels, user_id=value)
                break
    call = Call.begin(recorder, labels, recorder.clock)
    model = kwargs.get("model")
    call.requested_model = model if isinstance(model, str) and model else None
    return call


def _count_attempts(client: Any) -> None:
    """Count the HTTP requests of each call: the client runs `_prepare_request` once per
    attempt (the first and each retry) before sending it."""
    prepare = getattr(client, "_prepare_request", None)
    if prepare is None:
        return
    if inspect.iscoroutinefunction(prepare):

        async def prepare_async(request: Any) -> None:
            _attempted()
            await prepare(request)

        client._prepare_request = prepare_async
    else:

        def prepare_sync(request: Any) -> None:
            _attempted()
            prepare(request)

        client._prepare_request = prepare_sync


def _attempted() -> None:
    call = current_call.get()
    if call is not None:
        call.attempted()
