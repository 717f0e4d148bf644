"""The batch package's errors (each maps to an HTTP status through shared.errors)."""

from __future__ import annotations

from datetime import datetime

from shared.errors import ConflictError, InvalidRequestError, StockpilotError, UnavailableError


class BatchError(StockpilotError):
    """Base of the batch errors (each also subclasses the shared error of its HTTP status)."""


class InvalidJobIdError(InvalidRequestError, BatchError):
    """A job id that cannot be a subject token (`^[A-Za-z0-9_-]{1,64}$`)."""


class LockHeldError(ConflictError, BatchError):
    """The job's lock is held by someone else: the run is skipped, never queued."""

    def __init__(
        self,
        job_id: str,
        owner: str,
        expires_at: datetime | None,
        fencing_token: int | None,
        execution_id: str | None = None,
    ) -> None:
        until = f" until {expires_at.isoformat()}" if expires_at is not None else ""
        execution = f", execution {execution_id}" if execution_id else ""
        super().__init__(
            f"job {job_id} is locked by {owner}{until} (fencing token {fencing_token}"
            f"{execution}); this run is skipped"
        )
        self.job_id = job_id
        self.owner = owner
        self.expires_at = expires_at
        self.fencing_token = fencing_token
        self.execution_id = execution_id


class LockLostError(ConflictError, BatchError):
    """The run's lock was force-released, expired or taken over while it ran."""

    def __init__(self, job_id: str, fencing_token: int, why: str) -> None:
        super().__init__(
            f"the lock of job {job_id} (fencing token {fencing_token}) was lost: {why}"
        )
        self.job_id = job_id
        self.fencing_token = fencing_token
        self.why = why


class LockStateError(UnavailableError, BatchError):
    """The lock subject could not be read or holds something that is not a lock event."""
