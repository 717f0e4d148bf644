"""The usage client for StockPilot's own code: time an LLM call, record it, never lose it.

    recorder = await UsageRecorder.connect(settings)
    response = await recorder.track(
        client.chat.completions.create(model="gpt-4o-mini", messages=...),
        model="gpt-4o-mini", endpoint="/api/v1/analysis", user_id=user.id,
    )
    ...
    await recorder.close()

Every call becomes a `usage.recorded` event published to JetStream with `Nats-Msg-Id` = its
id and an acknowledgement awaited. Events wait in a bounded in-memory buffer; while NATS is
away (a restart, a failover) the sender keeps retrying the oldest one with backoff, so an
outage shorter than the buffer lasts loses nothing, and a retried publish is stored once.
When the buffer is full the new event is dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable
from datetime import datetime
from typing import Any, TypeVar

from nats.aio.client import Client as NATS

from services.usage.events import SUBJECT_RECORDED, UsageRecorded
from shared import bus
from shared.events import utc_now
from shared.settings import CommonSettings

log = logging.getLogger("stockpilot.usage.client")

T = TypeVar("T")

DEFAULT_BUFFER = 10_000
# Backoff between attempts while NATS is away: short first, never longer than this.
MAX_BACKOFF_S = 2.0
# Events in flight at once (publish_async, acknowledgements awaited together).
SEND_WINDOW = 256


class UsageRecorder:
    """Records LLM calls as usage events; buffered, retried, acknowledged by JetStream."""

    def __init__(
        self,
        nc: NATS,
        *,
        buffer_size: int = DEFAULT_BUFFER,
        publish_timeout: float = 2.0,
        owns_connection: bool = False,
    ) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        self._nc = nc
        self._js = nc.jetstream()
        self._buffer: collections.deque[UsageRecorded] = collections.deque()
        self._capacity = buffer_size
        self._timeout = publish_timeout
        self._owns = owns_connection
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sender: asyncio.Task[None] | None = None
        self.published = 0
        self.duplicates = 0
        self.dropped = 0
        self.retries = 0

    @classmethod
    async def connect(
        cls, settings: CommonSettings, name: str = "stockpilot-usage-client", **options: Any
    ) -> UsageRecorder:
        """A started recorder on its own NATS connection (reconnecting forever)."""
        nc = await bus.connect(settings, name)
        recorder = cls(nc, owns_connection=True, **options)
        recorder.start()
        return recorder

    @property
    def pending(self) -> int:
        """Events waiting to be acknowledged."""
        return len(self._buffer)

    def start(self) -> None:
        """Start the sender task (idempotent)."""
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_forever(), name="usage-recorder")

    async def close(self, timeout: float = 10.0) -> None:
        """Wait (up to `timeout`) until the buffer is sent, then stop; lost events are logged."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        if self._buffer:
            log.error("usage recorder closed with %d events unsent", len(self._buffer))
        if self._owns:
            with contextlib.suppress(Exception):
                await self._nc.drain()

    async def flush(self) -> None:
        """Wait until every buffered event is acknowledged."""
        await self._idle.wait()

    async def __aenter__(self) -> UsageRecorder:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----- recording -----------------------------------------------------------------------

    def record(self, event: UsageRecorded) -> bool:
        """Buffer one event for sending; False (counted, logged) when the buffer is full."""
        if len(self._buffer) >= self._capacity:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error(
                    "usage buffer full (%d events): dropped %d so far",
                    self._capacity,
                    self.dropped,
                )
            return False
        self._buffer.append(event)
        self._idle.clear()
        self._wakeup.set()
        return True

    async def track(
        self,
        call: Awaitable[T],
        *,
        model: str | None = None,
        endpoint: str | None = None,
        user_id: str | None = None,
        request_id: str | None = None,
    ) -> T:
        """Await an OpenAI-style call (or any awaitable), record it, return or re-raise."""
        started_at = utc_now()
        start = time.perf_counter()
        try:
            result = await call
        except Exception as exc:
            elapsed = (time.perf_counter() - start) * 1000
            self.record(
                failure_event(
                    exc,
                    started_at,
                    elapsed,
                    model=model,
                    endpoint=endpoint,
                    user_id=user_id,
                    request_id=request_id,
                )  # fmt: skip
            )
            raise
        elapsed = (time.perf_counter() - start) * 1000
        self.record(
            success_event(
                result,
                started_at,
                elapsed,
                model=model,
                endpoint=endpoint,
                user_id=user_id,
                request_id=request_id,
            )  # fmt: skip
        )
        return result

    # ----- sending -------------------------------------------------------------------------

    async def _send_forever(self) -> None:
        backoff = 0.05
        while True:
            if not self._buffer:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Events stay buffered (and counted) until acknowledged; a window of them is
            # pipelined with publish_async, which is several times faster than one by one.
            window = list(itertools.islice(self._buffer, SEND_WINDOW))
            acked = await self._send(window)
            for _ in range(acked):
                self._buffer.popleft()
            if acked == len(window):
                backoff = 0.05
                continue
            self.retries += 1
            if self.retries == 1 or self.retries % 50 == 0:
                log.warning("usage publish failed; %d events buffered, retrying", self.pending)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _send(self, window: list[UsageRecorded]) -> int:
        """Publish a window; how many from its start were acknowledged."""
        futures: list[asyncio.Future[Any]] = []
        try:
            for event in window:
                futures.append(
                    await self._js.publish_async(
                        SUBJECT_RECORDED, bus.encode_event(event), headers={"Nats-Msg-Id": event.id}
                    )
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            pass  # the events not yet handed over are retried with the rest
        if futures:
            done, pending = await asyncio.wait(futures, timeout=self._timeout)
            for future in pending:
                future.cancel()  # releases the library's in-flight slot
        acked = 0
        for future in futures:
            if future.cancelled() or future.exception() is not None:
                break
            acked += 1
            if future.result().duplicate:
                self.duplicates += 1
            else:
                self.published += 1
        # Read the remaining outcomes so no "exception was never retrieved" is logged.
        for future in futures[acked:]:
            if not future.cancelled():
                future.exception()
        return acked


def _get(obj: Any, *names: str) -> Any:
    """obj.a.b or obj["a"]["b"]; None when any step is missing."""
    for name in names:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def success_event(
    response: Any,
    started_at: datetime,
    elapsed_ms: float,
    *,
    model: str | None,
    endpoint: str | None,
    user_id: str | None,
    request_id: str | None,
) -> UsageRecorded:
    """The event of a call that answered (chat completions or responses API usage shapes)."""
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
    rid = request_id or _get(response, "_request_id") or _get(response, "id")
    return UsageRecorded(
        id=str(rid) if rid else f"usage-{uuid.uuid4().hex}",
        occurred_at=started_at,
        request_id=str(rid) if rid else None,
        model=model or str(_get(response, "model") or "unknown"),
        endpoint=endpoint,
        prompt_tokens=_int(prompt),
        completion_tokens=_int(completion),
        cached_tokens=_int(cached),
        status_code=200,
        response_time_ms=round(elapsed_ms, 3),
        user_id=user_id,
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
) -> UsageRecorded:
    """The event of a call that raised: HTTP status and error code when the error has them."""
    status = _get(exc, "status_code")
    if not isinstance(status, int):
        status = _get(exc, "response", "status_code")
    code = _get(exc, "code")
    if not isinstance(code, str) or not code:
        name = type(exc).__name__
        code = "timeout" if "Timeout" in name else _snake(name)
    rid = request_id or _get(exc, "request_id")
    return UsageRecorded(
        id=str(rid) if rid else f"usage-{uuid.uuid4().hex}",
        occurred_at=started_at,
        request_id=str(rid) if rid else None,
        model=model or "unknown",
        endpoint=endpoint,
        # 0: no HTTP answer at all (connection error, timeout).
        status_code=status if isinstance(status, int) and 0 <= status <= 999 else 0,
        error_code=code[:512],
        response_time_ms=round(elapsed_ms, 3),
        user_id=user_id,
    )


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
