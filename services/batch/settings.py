"""Batch service settings."""

from __future__ import annotations

from services.batch.contract import JobSchedule
from shared.events import JobId
from shared.settings import CommonSettings, PositiveFloat, PositiveInt


class BatchSettings(CommonSettings, frozen=True, kw_only=True):
    """Lock lifetime, history bound, heartbeat cadence and how often lost runs are looked for."""

    # Default lifetime of a job lock (STOCKPILOT_LOCK_TTL_S); a job may choose its own.
    lock_ttl_s: PositiveFloat = 86_400.0
    # Executions kept in the history projection (STOCKPILOT_HISTORY_LIMIT).
    history_limit: PositiveInt = 1000
    # Heartbeat interval assumed for runs that did not announce theirs; workers default to it.
    heartbeat_interval_s: PositiveFloat = 10.0
    # How often the service looks for running executions whose heartbeats stopped.
    lost_check_interval_s: PositiveFloat = 5.0
    # When each job is expected to start (STOCKPILOT_JOB_SCHEDULES): {job_id: {"cron": "0 2 * * *"}
    # or {"every_s": 300}, "grace_s"?, "tz"?}. Stored as batch.job_scheduled events on change.
    job_schedules: dict[JobId, JobSchedule] = {}


Settings = BatchSettings
