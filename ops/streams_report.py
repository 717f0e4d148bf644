"""`stockpilot streams`: stream sizes, service projection lag and alert hook state, as lines.

Each line is a tagged struct (`kind`: stream, service, projection, hook).
"""

from __future__ import annotations

import asyncio
from typing import Literal

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from shared.events import AwareDatetime
from shared.hook_status import read_hooks_status
from shared.runtime import ServiceStatus, endpoint_subject

SERVICES = ("health", "usage", "batch")


class StreamLine(msgspec.Struct, kw_only=True, tag_field="kind", tag="stream"):
    """One stream's size."""

    stream: str
    subjects: list[str]
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    consumers: int


class ProjectionLine(msgspec.Struct, kw_only=True, tag_field="kind", tag="projection"):
    """How far one service projection is behind its stream."""

    service: str
    projection: str
    stream: str
    last_seq: int
    lag: int
    caught_up: bool
    snapshot_seq: int
    snapshot_at: AwareDatetime | None


class ServiceLine(msgspec.Struct, kw_only=True, tag_field="kind", tag="service"):
    """A service as a whole."""

    service: str
    status: Literal["up", "catching_up", "unavailable"]
    detail: str | None = None
    instance: str | None = None
    uptime_s: float | None = None


class HookLine(msgspec.Struct, kw_only=True, tag_field="kind", tag="hook"):
    """One alert hook as the hook process last reported it (`hooks.status`)."""

    hook: str
    state: str
    delivered: int
    failures: int
    consecutive_failures: int
    pending: int | None
    last_error: str | None
    reported_at: AwareDatetime


async def _hook_lines(nc: NATS) -> list[msgspec.Struct]:
    try:
        status = await read_hooks_status(nc.jetstream())
    except Exception:  # no state bucket yet, or an older shape: nothing to report
        return []
    if status is None:
        return []
    return [
        HookLine(
            hook=h.name,
            state=h.state,
            delivered=h.delivered,
            failures=h.failures,
            consecutive_failures=h.consecutive_failures,
            pending=h.pending,
            last_error=h.last_error,
            reported_at=status.updated_at,
        )
        for h in status.hooks
    ]


async def streams_report(nc: NATS, timeout: float = 1.0) -> list[msgspec.Struct]:
    """Streams, then each service and its projections' lag, then the alert hooks."""
    js = nc.jetstream()
    lines: list[msgspec.Struct] = []
    for info in await js.streams_info():
        state = info.state
        lines.append(
            StreamLine(
                stream=info.config.name or "",
                subjects=list(info.config.subjects or []),
                messages=state.messages,
                bytes=state.bytes,
                first_seq=state.first_seq,
                last_seq=state.last_seq,
                consumers=state.consumer_count,
            )
        )

    async def one(service: str) -> list[msgspec.Struct]:
        try:
            msg = await nc.request(endpoint_subject(service, "status"), b"{}", timeout=timeout)
            status = msgspec.json.decode(msg.data, type=ServiceStatus)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            detail = (
                "not running"
                if isinstance(exc, nats.errors.NoRespondersError)
                else (f"no answer within {timeout:g}s")
            )
            return [ServiceLine(service=service, status="unavailable", detail=detail)]
        except msgspec.DecodeError as exc:
            return [ServiceLine(service=service, status="unavailable", detail=str(exc))]
        found: list[msgspec.Struct] = [
            ServiceLine(
                service=service,
                status="up" if status.ready else "catching_up",
                instance=status.instance,
                uptime_s=status.uptime_s,
            )
        ]
        found += [
            ProjectionLine(
                service=service,
                projection=p.name,
                stream=p.stream,
                last_seq=p.last_seq,
                lag=p.lag,
                caught_up=p.caught_up,
                snapshot_seq=p.snapshot_seq,
                snapshot_at=p.snapshot_at,
            )
            for p in status.projections
        ]
        return found

    for found in await asyncio.gather(*(one(s) for s in SERVICES)):
        lines += found
    return lines + await _hook_lines(nc)
