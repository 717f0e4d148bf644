"""Supervised background work: a loop that fails ends its process, loudly.

Every long-running task of a process (a service's snapshot, alert, reader and background
loops; the hook runner's workers and status loop) is started through one `Supervisor`. A task
that raises is logged with its traceback and stops the process, which then exits with
`EXIT_LOOP_FAILED`, so `stockpilot up` or compose restarts it. The alternative, a task that
dies quietly while the process keeps answering "up", is how a snapshot loop once stopped for
good with no log line (issue #22). A loop started with `forever=True` that merely returns
before the process stops is a failure too: nothing would be doing its work any more.

Restarting a failed loop in place was the old behaviour; it hides the same bug forever (the
loop fails again on the same state) and keeps the process looking healthy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from functools import partial
from typing import Any

log = logging.getLogger("stockpilot.supervise")

# sysexits' EX_SOFTWARE: "an internal software error has been detected". Distinct from 1 (NATS
# closed for good) and 2 (bad settings), so an operator can tell why a process ended.
EXIT_LOOP_FAILED = 70


class Supervisor:
    """Starts a process's background tasks; the first that fails sets `stop` and is kept."""

    def __init__(self, process: str, stop: asyncio.Event) -> None:
        self.process = process
        self.stop = stop
        self.failure: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def failed(self) -> bool:
        """Whether a supervised task failed (the process must exit non-zero)."""
        return self.failure is not None

    def exit_status(self, otherwise: int = 0) -> int:
        """EXIT_LOOP_FAILED after a failed task, else `otherwise`."""
        return EXIT_LOOP_FAILED if self.failed else otherwise

    def start(
        self, work: Coroutine[Any, Any, None], name: str, *, forever: bool = False
    ) -> asyncio.Task[None]:
        """Run `work` as a supervised task; `forever`: returning before `stop` is a failure."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(partial(self._done, forever))
        return task

    def fail(self, name: str, exc: BaseException | None) -> None:
        """Record that task `name` failed, log why (with its traceback) and stop the process."""
        reason = repr(exc) if exc is not None else "ended although it should run until stop"
        if self.failure is None:
            self.failure = f"{name}: {reason}"[:500]
        log.critical(
            "%s: background task %s failed (%s); the process exits with status %d so that "
            "it is restarted",
            self.process,
            name,
            reason,
            EXIT_LOOP_FAILED,
            exc_info=exc,
        )
        self.stop.set()

    def _done(self, forever: bool, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.fail(task.get_name(), exc)
        elif forever and not self.stop.is_set():
            self.fail(task.get_name(), None)

    async def cancel_all(self) -> None:
        """Cancel every task still running and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
