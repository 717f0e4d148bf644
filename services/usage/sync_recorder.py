"""The usage recorder for a synchronous program (a cron script, a Django view, a notebook).

    with SyncUsageRecorder.connect(settings) as recorder:
        client = instrument(openai.OpenAI(), recorder, endpoint="/jobs/daily-report")
        client.chat.completions.create(model="gpt-4o-mini", messages=...)

The `UsageRecorder` runs on an event loop of its own in a daemon thread; calls recorded from
the program's threads are handed to it (`UsageRecorder.record` is thread-safe), so the
program never waits for NATS. `close()` (or leaving the `with`) sends what is left, then
stops the thread; what NATS did not take stays in the spool for the next start.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from services.usage.client import UsageRecorder
from services.usage.contract import UsageRecorded
from shared.clock import Clock
from shared.settings import CommonSettings

T = TypeVar("T")

# How long connecting may take before the program is told (NATS away at start).
CONNECT_TIMEOUT_S = 30.0


class SyncUsageRecorder:
    """A UsageRecorder on its own event loop thread, used from synchronous code."""

    def __init__(
        self, recorder: UsageRecorder, loop: asyncio.AbstractEventLoop, thread: threading.Thread
    ) -> None:
        self._recorder = recorder
        self._loop = loop
        self._thread = thread

    @classmethod
    def connect(
        cls, settings: CommonSettings, name: str = "stockpilot-usage-client", **options: Any
    ) -> SyncUsageRecorder:
        """Start the loop thread and connect a recorder on it (see UsageRecorder.connect)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="usage-recorder", daemon=True)
        thread.start()
        try:
            connecting = UsageRecorder.connect(settings, name, **options)
            recorder = asyncio.run_coroutine_threadsafe(connecting, loop).result(CONNECT_TIMEOUT_S)
        except BaseException:
            _stop(loop, thread)
            raise
        return cls(recorder, loop, thread)

    @property
    def recorder(self) -> UsageRecorder:
        """The recorder itself (its counters: published, dropped, pending)."""
        return self._recorder

    @property
    def clock(self) -> Clock:
        """The recorder's clock."""
        return self._recorder.clock

    def record(self, event: UsageRecorded) -> bool:
        """Hand one event to the recorder (from any thread)."""
        return self._recorder.record(event)

    def track(self, call: Callable[[], T], **labels: Any) -> T:
        """Make a call and record it: `recorder.track(lambda: client.chat...)`; the labels of
        UsageRecorder.track_sync."""
        return self._recorder.track_sync(call, **labels)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything recorded so far is acknowledged (TimeoutError past
        `timeout`)."""
        barrier = asyncio.run_coroutine_threadsafe(_after_handed(self._recorder), self._loop)
        barrier.result(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is left (up to `timeout`), close the recorder and stop its thread."""
        if self._loop.is_closed():
            return
        closing = asyncio.run_coroutine_threadsafe(self._recorder.close(timeout), self._loop)
        try:
            closing.result(timeout + 5.0)
        finally:
            _stop(self._loop, self._thread)

    def __enter__(self) -> SyncUsageRecorder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def _after_handed(recorder: UsageRecorder) -> None:
    # Events handed over from other threads are queued on this loop before this coroutine
    # runs (call_soon_threadsafe keeps order), so flushing here covers them.
    await asyncio.sleep(0)
    await recorder.flush()


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
