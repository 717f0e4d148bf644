"""The alert-hook process's status, as it publishes it and the gateway reads it.

Shared because two processes use it: `stockpilot hooks` writes it under `hooks.status` in the
state bucket (STOCKPILOT_STATE); the gateway's /api/v1/status and `stockpilot streams` read it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from shared.events import AwareDatetime
from shared.streams import STATE_BUCKET

STATUS_KEY = "hooks.status"
# The hook process rewrites its status at least this often; older means it is not running.
STATUS_REFRESH_S = 10.0
STALE_AFTER_S = 3 * STATUS_REFRESH_S

HookStateName = Literal["starting", "ok", "retrying", "failing", "stopped"]


class HookStatus(msgspec.Struct, kw_only=True):
    """One hook as the status route shows it."""

    name: str
    state: HookStateName
    delivered: int = 0
    skipped_duplicates: int = 0
    failures: int = 0
    # Alerts given up on after the last attempt, copied to stockpilot.deadletter.hooks.
    parked: int = 0
    last_parked_alert_id: str | None = None
    consecutive_failures: int = 0
    pending: int | None = None
    last_seq: int = 0
    last_alert_id: str | None = None
    last_delivered_at: AwareDatetime | None = None
    last_error: str | None = None
    last_error_at: AwareDatetime | None = None
    next_attempt_at: AwareDatetime | None = None


class HooksStatus(msgspec.Struct, kw_only=True):
    """The value under `hooks.status` in the state bucket (STOCKPILOT_STATE).

    Rewritten on every change and at least every STATUS_REFRESH_S seconds while the hook
    process runs: an `updated_at` older than STALE_AFTER_S means it is not running.
    """

    updated_at: AwareDatetime
    pid: int
    hooks: list[HookStatus]
    # The last status the process wrote on its way out (stopped, or a loop of it failed).
    stopped: bool = False
    # Why it stopped when a background loop failed (the process exits non-zero).
    failure: str | None = None


HooksProcessState = Literal["up", "unavailable", "not_configured"]


def hooks_process_state(status: HooksStatus | None, now: datetime) -> HooksProcessState:
    """`up` only while the hook process runs: a fresh status it did not write on its way out."""
    if status is None:
        return "not_configured"
    if status.stopped or (now - status.updated_at).total_seconds() > STALE_AFTER_S:
        return "unavailable"
    return "up"


async def read_hooks_status(js: JetStreamContext) -> HooksStatus | None:
    """What the hook process last published, or None when it never ran."""
    kv = await js.key_value(STATE_BUCKET)
    try:
        entry = await kv.get(STATUS_KEY)
    except KeyNotFoundError:
        return None
    return msgspec.json.decode(entry.value or b"", type=HooksStatus)
