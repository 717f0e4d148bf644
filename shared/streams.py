"""The streams and buckets StockPilot keeps, and provisioning them (or checking they exist)."""

from __future__ import annotations

import msgspec
import nats
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError
from nats.js.object_store import ObjectStore

from shared.connection import ADMIN_USER, may_administer
from shared.nats_errors import JsErrorCode, has_code
from shared.settings import CommonSettings

DAY_S = 86_400.0
# The duplicate window of every stream: a retried publish within it is stored once.
# How long JetStream stores a repeated Nats-Msg-Id once. Usage keeps 24 h (issue #19: an
# independent reader of the stream then rarely needs to dedupe by id itself); the cost is in
# nats-server's memory, about 240 bytes per id of the last 24 h (measured: 300k ids, +72 MB
# against a 100 ms window), i.e. ~24 MB at 100k calls a day. The other streams carry ids that
# are derived (alerts, batch runs) or periodic (health): 20 minutes covers their retries.
DUPLICATE_WINDOW_S = 20 * 60.0
USAGE_DUPLICATE_WINDOW_S = 24 * 3600.0
MAX_EVENT_BYTES = 1024 * 1024
# The services whose snapshots and consumers the NATS roles (ops.nats_auth) keep apart.
SERVICES = ("health", "usage", "batch")
STATE_BUCKET = "STOCKPILOT_STATE"
# Which alerts each hook has delivered. A mark only has to outlive the oldest alert a hook
# can be handed again (its backfill, at most HOOK_BACKFILL_MAX_S), so marks expire.
HOOK_MARKS_BUCKET = "STOCKPILOT_HOOK_MARKS"
HOOK_BACKFILL_MAX_S = 30 * DAY_S
HOOK_MARK_TTL_S = 35 * DAY_S


def snapshot_bucket(service: str) -> str:
    """The object store holding one service's projection snapshots.

    One bucket per service: NATS permissions can then give each service its own bucket's
    subjects only (an object store's chunks and its purges cannot be told apart by owner).
    """
    return f"STOCKPILOT_SNAPSHOTS_{service.upper()}"


class NotProvisionedError(Exception):
    """A stream or bucket a process needs is missing and its NATS user may not create it."""


class StreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One stream and the limits we chose for it (documented in README.md)."""

    name: str
    subjects: tuple[str, ...]
    description: str
    # Event-sourced history is kept; health checks are bounded by age since their
    # projection only ever looks back 24 h (and uptime series a few days).
    max_age_s: float | None = None
    max_bytes: int = -1
    duplicate_window_s: float = DUPLICATE_WINDOW_S


STREAMS: dict[str, StreamSpec] = {
    "usage": StreamSpec(
        name="STOCKPILOT_USAGE",
        subjects=("stockpilot.usage.>",),
        description="One event per LLM call, and statistics resets.",
        duplicate_window_s=USAGE_DUPLICATE_WINDOW_S,
    ),
    "health": StreamSpec(
        name="STOCKPILOT_HEALTH",
        subjects=("stockpilot.health.>",),
        description="Every probe result of every dependency.",
        max_age_s=400 * DAY_S,
    ),
    "batch": StreamSpec(
        name="STOCKPILOT_BATCH",
        subjects=("stockpilot.batch.>",),
        description="Batch-job executions and job-lock lifecycle.",
    ),
    "alerts": StreamSpec(
        name="STOCKPILOT_ALERTS",
        subjects=("stockpilot.alerts.>",),
        description="Alerts raised by the services, each condition once per period.",
    ),
}


def _stream_config(spec: StreamSpec, replicas: int) -> js_api.StreamConfig:
    return js_api.StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        description=spec.description,
        storage=js_api.StorageType.FILE,
        retention=js_api.RetentionPolicy.LIMITS,
        duplicate_window=spec.duplicate_window_s,
        max_age=spec.max_age_s,
        max_bytes=spec.max_bytes,
        max_msg_size=MAX_EVENT_BYTES,
        num_replicas=replicas,
        discard=js_api.DiscardPolicy.OLD,
        allow_direct=True,
    )


async def provision(js: JetStreamContext, replicas: int = 1) -> None:
    """Create or update the four streams and the state buckets; safe to run from every process."""
    for spec in STREAMS.values():
        config = _stream_config(spec, replicas)
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            if not has_code(exc, JsErrorCode.STREAM_NAME_IN_USE):
                raise
            await js.update_stream(config)
    for service in SERVICES:
        await snapshot_store(js, service, replicas)
    for bucket, description, ttl in (
        (STATE_BUCKET, "Small operational state: health rounds, hook status.", None),
        (HOOK_MARKS_BUCKET, "Which alerts each hook delivered (expire).", HOOK_MARK_TTL_S),
    ):
        try:
            await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            await js.create_key_value(
                js_api.KeyValueConfig(
                    bucket=bucket,
                    description=description,
                    history=1,
                    ttl=ttl,
                    storage=js_api.StorageType.FILE,
                    replicas=replicas,
                )
            )


async def snapshot_store(
    js: JetStreamContext, service: str, replicas: int = 1, *, create: bool = True
) -> ObjectStore:
    """`service`'s snapshot bucket, created first when missing (and `create`)."""
    bucket = snapshot_bucket(service)
    try:
        return await js.object_store(bucket)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            raise NotProvisionedError(_not_provisioned(f"object store {bucket}")) from None
    return await js.create_object_store(
        bucket,
        config=js_api.ObjectStoreConfig(
            description=f"Projection snapshots of the {service} service, one object each.",
            storage=js_api.StorageType.FILE,
            replicas=replicas,
        ),
    )


def _not_provisioned(what: str) -> str:
    return (
        f"{what} does not exist and this process's NATS user may not create it: start the "
        f"stack with `stockpilot up`, or run `stockpilot up --provision-only` as the "
        f"{ADMIN_USER} user"
    )


async def provision_or_check(
    js: JetStreamContext, settings: CommonSettings, streams: tuple[str, ...]
) -> None:
    """Provision everything when this process administers streams; otherwise only check
    that the streams (or KV_/OBJ_ streams of buckets) it needs exist."""
    if may_administer(settings):
        await provision(js, settings.stream_replicas)
        return
    for name in streams:
        try:
            await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            raise NotProvisionedError(_not_provisioned(f"stream {name}")) from None
