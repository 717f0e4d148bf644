"""The one source of "now" for every process: services, gateway, hooks and clients.

Wherever a day, a window, an expiry, a bucket or a timestamp is decided, the code asks a
`Clock` it was handed instead of calling `datetime.now` in place, so a test (or a simulation)
can set the instant: "the last second of a month in Asia/Seoul", "29 February", "the hour the
clocks go back in New York". Folds never read a clock (their time comes from events); query
functions take `now` as an argument, which their adapter reads from its clock.

Durations and deadlines (how long to wait, when to snapshot again) stay on `time.monotonic`:
they measure elapsed time, which no test needs to fake and which must not jump.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import UTC, datetime, timedelta


class Clock(ABC):
    """Tells the current time, aware, in UTC.

    A base class rather than a Protocol: Litestar checks a dependency's value against its
    annotation, which a non-runtime Protocol cannot pass.
    """

    @abstractmethod
    def now(self) -> datetime:
        """The current instant."""


class SystemClock(Clock):
    """The machine's wall clock: what every process uses unless it is handed another."""

    def now(self) -> datetime:
        """The current instant from the operating system."""
        return datetime.now(UTC)


class ManualClock(Clock):
    """A clock that says what it was set to and moves only when told (tests, simulations)."""

    def __init__(self, at: datetime) -> None:
        if at.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        self._at = at.astimezone(UTC)

    def now(self) -> datetime:
        """The instant the clock was last set to."""
        return self._at

    def set(self, at: datetime) -> None:
        """Move the clock to `at` (forwards or back)."""
        if at.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        self._at = at.astimezone(UTC)

    def advance(self, by: timedelta) -> datetime:
        """Move the clock on by `by`; the new instant."""
        self._at += by
        return self._at


SYSTEM_CLOCK: Clock = SystemClock()
