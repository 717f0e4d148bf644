"""`stockpilot streams`: stream sizes, service projection lag and alert hook state, as lines.

Each line is a tagged struct (`kind`: stream, service, projection, hook).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Literal

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from shared.endpoints import endpoint_subject
from shared.events import AwareDatetime
from shared.hook_status import read_hooks_status
from shared.service_status import ServiceStatus

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


# ----- the table for people ----------------------------------------------------------------


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # pragma: no cover - the loop always returns


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def _moment(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if at is not None else "-"


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def render_table(lines: list[msgspec.Struct]) -> str:
    """`streams_report` as aligned tables: streams, services, projections, hooks."""
    streams = [line for line in lines if isinstance(line, StreamLine)]
    services = [line for line in lines if isinstance(line, ServiceLine)]
    projections = [line for line in lines if isinstance(line, ProjectionLine)]
    hooks = [line for line in lines if isinstance(line, HookLine)]
    blocks: list[list[str]] = []
    blocks.append(
        _grid(
            ["STREAM", "MESSAGES", "SIZE", "FIRST SEQ", "LAST SEQ", "CONSUMERS"],
            [
                [
                    s.stream,
                    f"{s.messages:,}",
                    _size(s.bytes),
                    str(s.first_seq),
                    str(s.last_seq),
                    str(s.consumers),
                ]
                for s in streams
            ],
        )
    )
    blocks.append(
        _grid(
            ["SERVICE", "STATUS", "UPTIME", "INSTANCE / DETAIL"],
            [
                [s.service, s.status, _duration(s.uptime_s), s.instance or s.detail or ""]
                for s in services
            ],
        )
    )
    if projections:
        blocks.append(
            _grid(
                ["PROJECTION", "STREAM", "LAST SEQ", "LAG", "CAUGHT UP", "SNAPSHOT SEQ", "AT"],
                [
                    [
                        f"{p.service}/{p.projection}",
                        p.stream,
                        str(p.last_seq),
                        str(p.lag),
                        "yes" if p.caught_up else "no",
                        str(p.snapshot_seq),
                        _moment(p.snapshot_at),
                    ]
                    for p in projections
                ],
            )
        )
    if hooks:
        blocks.append(
            _grid(
                ["HOOK", "STATE", "DELIVERED", "FAILURES", "PENDING", "LAST ERROR"],
                [
                    [
                        h.hook,
                        h.state,
                        str(h.delivered),
                        f"{h.failures} ({h.consecutive_failures} in a row)",
                        "-" if h.pending is None else str(h.pending),
                        h.last_error or "",
                    ]
                    for h in hooks
                ],
            )
        )
    return "\n\n".join("\n".join(block) for block in blocks) + "\n"


def unavailable_services(lines: list[msgspec.Struct]) -> list[str]:
    """The services that did not answer (the command then exits 1)."""
    return [
        line.service
        for line in lines
        if isinstance(line, ServiceLine) and line.status == "unavailable"
    ]
