"""The one rule that decides who holds a job lock, from the lock subject's events.

The batch projection (what `lock/status` answers) and the workers (`locks.py`, which read the
subject before they acquire, renew, check or release) both fold the subject's events with
`lock_step`, so they cannot disagree: the last message on the subject is not the lock, the fold
of all of them is. The rule:

- `lock.acquired` takes the lock unless another holder's lock is still live when it is stored
  (its `expires_at` after the new event's `occurred_at`); then it changes nothing.
- `lock.renewed` extends the lock only when it names the live holder (owner and fencing token).
- `lock.released` frees the lock only when it names the holder (owner, and the fencing token
  when it carries one) and either the holder gives it back (`by` = the owner, reason
  `released`) or the batch service takes it (`forced`, `lost`, or `expired` once the lock has
  expired). A release by anyone else changes nothing.

The Expected-Last-Subject-Sequence header keeps racing *well-behaved* publishers from both
winning; this rule keeps everything else (no header, the wrong owner) from changing the lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec

from services.batch.contract import LockAcquired, LockEvent, LockReleased, LockRenewed
from shared.events import AwareDatetime

Outcome = Literal["acquired", "renewed", "released", "ignored"]
# Ended locks a LockRead remembers (newest): a run asks why its own, recent, lock ended.
MAX_ENDED = 256
# Releases the batch service stores on its own authority (not the holder's).
SERVICE_REASONS = frozenset({"forced", "lost", "expired"})


class LockState(msgspec.Struct, kw_only=True):
    """A held lock (possibly expired: that is judged at query time)."""

    job_id: str
    owner: str
    execution_id: str | None
    acquired_at: AwareDatetime
    expires_at: AwareDatetime
    fencing_token: int
    ignored_acquires: int = 0
    renewals: int = 0


@dataclass(frozen=True)
class LockStep:
    """What one lock event did: the holder after it, and the holder it released (if any)."""

    held: LockState | None
    outcome: Outcome
    released: LockState | None = None


def lock_step(held: LockState | None, event: LockEvent, seq: int) -> LockStep:
    """Apply one lock event stored at `seq` to the current holder (`held` may be updated)."""
    match event:
        case LockAcquired():
            if held is not None and held.expires_at > event.occurred_at:
                held.ignored_acquires += 1
                return LockStep(held, "ignored")
            return LockStep(
                LockState(
                    job_id=event.job_id,
                    owner=event.owner,
                    execution_id=event.execution_id,
                    acquired_at=event.occurred_at,
                    expires_at=event.expires_at,
                    fencing_token=seq,
                ),
                "acquired",
                released=None,
            )
        case LockRenewed():
            if (
                held is None
                or held.fencing_token != event.fencing_token
                or held.owner != event.owner
                or held.expires_at <= event.occurred_at
            ):
                return LockStep(held, "ignored")
            held.expires_at = event.expires_at
            held.renewals += 1
            return LockStep(held, "renewed")
        case LockReleased():
            if not releases(held, event):
                return LockStep(held, "ignored")
            return LockStep(None, "released", released=held)
    return LockStep(held, "ignored")  # pragma: no cover - the union is exhausted above


def releases(held: LockState | None, event: LockReleased) -> bool:
    """Whether `event` frees `held` under the rule (see the module docstring)."""
    if held is None or event.owner != held.owner:
        return False
    if event.fencing_token is not None and event.fencing_token != held.fencing_token:
        return False
    if event.reason == "released":
        return event.by == held.owner
    if event.reason == "expired":
        return held.expires_at <= event.occurred_at
    return event.reason in SERVICE_REASONS


@dataclass
class LockRead:
    """A lock subject folded by `lock_step`: the holder, the subject's last sequence, and for
    each lock that ended, the event that ended it (what a worker that lost it is told)."""

    job_id: str
    held: LockState | None = None
    last_seq: int = 0
    ended: dict[int, LockEvent] | None = None

    def apply(self, event: LockEvent, seq: int) -> None:
        """Fold one decodable lock event of this job (stored at `seq`)."""
        before = self.held
        step = lock_step(self.held, event, seq)
        self.held = step.held
        if before is not None and step.held is not before:
            if self.ended is None:
                self.ended = {}
            self.ended[before.fencing_token] = event
            if len(self.ended) > MAX_ENDED:  # only recent runs ask why their lock ended
                del self.ended[next(iter(self.ended))]

    def copy(self) -> LockRead:
        """An independent copy (the fold updates the holder in place on a renewal)."""
        return LockRead(
            job_id=self.job_id,
            held=msgspec.structs.replace(self.held) if self.held is not None else None,
            last_seq=self.last_seq,
            ended=dict(self.ended) if self.ended is not None else None,
        )

    def ended_by(self, fencing_token: int) -> LockEvent | None:
        """The event that ended lock `fencing_token`, if one did."""
        return (self.ended or {}).get(fencing_token)
