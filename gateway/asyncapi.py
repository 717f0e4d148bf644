"""The event side described like the HTTP side: an AsyncAPI 3 document built from the structs.

Why one module of over 300 lines: it is the one table of channels (`CHANNELS`), the document
built from it and the `--check` that keeps docs/asyncapi.json current; the table and its
rendering change together, so they stay together.

Every subject a program outside StockPilot Ops may publish to or read, every event type on
it (the JSON Schema comes from the same msgspec structs the services decode with, so the
document cannot drift from the code), the headers, and which NATS role may do what. The
gateway serves it at `/asyncapi.json`; `docs/asyncapi.json` is a copy that `make check` keeps
current (`python -m gateway.asyncapi --check docs/asyncapi.json`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from services.batch.contract import (
    BatchFinished,
    BatchProgress,
    BatchSkipped,
    BatchStarted,
    JobScheduled,
    LockAcquired,
    LockReleased,
    LockRenewed,
)
from services.health.contract import HealthChecked, HostSampled
from services.usage.contract import PricesChanged, UsageRecorded, UsageReset
from shared.dead_letters import DeadLetter
from shared.events import JOB_ID_PATTERN, Alert
from shared.service_status import VERSION

SCHEMA_REF = "#/components/schemas/{name}"

MSG_ID_HEADER = {
    "Nats-Msg-Id": {
        "type": "string",
        "description": "Equal to the event's `id`: JetStream stores a retried publish once "
        "within the stream's duplicate window. Readers still dedupe by `id` (see docs/events.md).",
    }
}
LOCK_HEADERS = {
    **MSG_ID_HEADER,
    "Nats-Expected-Last-Subject-Sequence": {
        "type": "string",
        "description": "The lock subject's last stream sequence (0 when none) as the publisher "
        "read it: of racing acquirers exactly one is stored. The stored sequence of a "
        "`lock.acquired` is the lock's fencing token.",
    },
}


@dataclass(frozen=True)
class Channel:
    """One subject (or subject pattern) and what travels on it."""

    key: str
    address: str
    description: str
    events: tuple[type[Any], ...]
    headers: dict[str, Any]
    # Roles that publish here and roles that read it (contract §4; docs/operations.md).
    senders: tuple[str, ...]
    readers: tuple[str, ...]
    parameters: dict[str, str] | None = None
    stream: str | None = None


CHANNELS = (
    Channel(
        "usageRecorded",
        "stockpilot.usage.recorded",
        "One LLM call of StockPilot AI (the usage client, or POST /api/v1/usage/records).",
        (UsageRecorded,),
        MSG_ID_HEADER,
        senders=("producer", "gateway"),
        readers=("usage", "observer", "ops"),
        stream="STOCKPILOT_USAGE",
    ),
    Channel(
        "usageReset",
        "stockpilot.usage.reset",
        "Statistics restart from zero (POST /api/v1/usage/reset); the stream keeps every event.",
        (UsageReset,),
        MSG_ID_HEADER,
        senders=("gateway", "usage"),
        readers=("usage", "observer", "ops"),
        stream="STOCKPILOT_USAGE",
    ),
    Channel(
        "usagePricesChanged",
        "stockpilot.usage.prices_changed",
        "The price table in effect from occurred_at on, published by the usage service at start "
        "when its configured table (shipped prices.toml and STOCKPILOT_PRICES) differs from the "
        "stream's last. A call is priced with the table in effect at its occurred_at, so a "
        "price change never re-prices history and a replay prices every call as the live "
        "service did.",
        (PricesChanged,),
        MSG_ID_HEADER,
        senders=("usage",),
        readers=("usage", "observer", "ops"),
        stream="STOCKPILOT_USAGE",
    ),
    Channel(
        "healthChecked",
        "stockpilot.health.checked.{component}",
        "One probe result of a dependency.",
        (HealthChecked,),
        MSG_ID_HEADER,
        senders=("health",),
        readers=("health", "observer", "ops"),
        parameters={
            "component": "`database`, `redis`, `openai`, or `external.<name>`; equal to the "
            "event's `component`."
        },
        stream="STOCKPILOT_HEALTH",
    ),
    Channel(
        "healthHost",
        "stockpilot.health.host",
        "CPU, memory and disk of the host the health service runs on, once per round.",
        (HostSampled,),
        MSG_ID_HEADER,
        senders=("health",),
        readers=("health", "observer", "ops"),
        stream="STOCKPILOT_HEALTH",
    ),
    Channel(
        "batchRun",
        "stockpilot.batch.run.{job_id}",
        "A batch job execution's lifecycle: started, progress (heartbeats), finished, or "
        "skipped (it did not start because the lock was held).",
        (BatchStarted, BatchProgress, BatchFinished, BatchSkipped),
        MSG_ID_HEADER,
        senders=("producer", "gateway"),
        readers=("batch", "observer", "ops"),
        parameters={"job_id": f"Matches `{JOB_ID_PATTERN}`; equal to the event's `job_id`."},
        stream="STOCKPILOT_BATCH",
    ),
    Channel(
        "batchLock",
        "stockpilot.batch.lock.{job_id}",
        "A job lock's lifecycle (acquired, renewed, released), fenced by the "
        "expected-last-subject-sequence header; who holds it is the fold of all of them.",
        (LockAcquired, LockRenewed, LockReleased),
        LOCK_HEADERS,
        senders=("producer", "gateway", "batch"),
        readers=("batch", "observer", "ops"),
        parameters={"job_id": f"Matches `{JOB_ID_PATTERN}`; equal to the event's `job_id`."},
        stream="STOCKPILOT_BATCH",
    ),
    Channel(
        "batchSchedule",
        "stockpilot.batch.schedule.{job_id}",
        "A job's expected starts (STOCKPILOT_JOB_SCHEDULES), stored by the batch service when "
        "they change; GET /api/v1/batch/jobs judges each job against the one in force.",
        (JobScheduled,),
        MSG_ID_HEADER,
        senders=("batch",),
        readers=("batch", "observer", "ops"),
        parameters={"job_id": f"Matches `{JOB_ID_PATTERN}`; equal to the event's `job_id`."},
        stream="STOCKPILOT_BATCH",
    ),
    Channel(
        "alerts",
        "stockpilot.alerts.{source}.{name}",
        "An alert; `{source}.{name}` is its `kind` (e.g. `usage.cost_warning`). The `id` is "
        "derived from kind, scope and period, so one condition in one period is stored once.",
        (Alert,),
        MSG_ID_HEADER,
        senders=("usage", "health", "batch"),
        readers=("observer", "hooks", "gateway", "ops"),
        parameters={
            "source": "`usage`, `batch` or `health`",
            "name": "the rest of the alert's kind",
        },
        stream="STOCKPILOT_ALERTS",
    ),
    Channel(
        "deadLetters",
        "stockpilot.deadletter.{service}",
        "A message a service refused (it did not decode, did not belong to its subject, or was "
        "out of range), with the reason. Core NATS: not stored in any stream.",
        (DeadLetter,),
        {},
        senders=("usage", "health", "batch", "hooks"),
        readers=("observer", "ops"),
        parameters={"service": "`usage`, `health`, `batch` or `hooks`"},
    ),
)


def _message_name(kind: type[Any]) -> str:
    return kind.__name__


def _tag(kind: type[Any]) -> str | None:
    config = getattr(kind, "__struct_config__", None)
    tag = getattr(config, "tag", None)
    return tag if isinstance(tag, str) else None


def build_document() -> dict[str, Any]:
    """The AsyncAPI 3.1 document, as plain data (JSON-ready)."""
    kinds = sorted({k for c in CHANNELS for k in c.events}, key=_message_name)
    _, schemas = msgspec.json.schema_components(kinds, ref_template=SCHEMA_REF)
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for channel in CHANNELS:
        refs = {}
        for kind in channel.events:
            name = _message_name(kind)
            tag = _tag(kind)
            refs[name] = {"$ref": f"#/components/messages/{name}"}
            messages[name] = {
                "name": tag or name,
                "title": name,
                "summary": (kind.__doc__ or name).strip().splitlines()[0],
                "contentType": "application/json",
                "payload": {"$ref": SCHEMA_REF.format(name=name)},
                **(
                    {"headers": {"type": "object", "properties": channel.headers}}
                    if channel.headers
                    else {}
                ),
            }
        body: dict[str, Any] = {
            "address": channel.address,
            "description": channel.description,
            "messages": refs,
        }
        if channel.parameters:
            body["parameters"] = {k: {"description": v} for k, v in channel.parameters.items()}
        if channel.stream:
            body["x-stockpilot-stream"] = channel.stream
        channels[channel.key] = body
        ref = {"$ref": f"#/channels/{channel.key}"}
        operations[f"publish{channel.key[0].upper()}{channel.key[1:]}"] = {
            "action": "send",
            "channel": ref,
            "summary": f"Publish to {channel.address}",
            "x-stockpilot-roles": list(channel.senders),
        }
        operations[f"read{channel.key[0].upper()}{channel.key[1:]}"] = {
            "action": "receive",
            "channel": ref,
            "summary": f"Read {channel.address}"
            + (f" (stream {channel.stream})" if channel.stream else ""),
            "x-stockpilot-roles": list(channel.readers),
        }
    return {
        "asyncapi": "3.1.0",
        "info": {
            "title": "StockPilot Ops events",
            "version": VERSION,
            "description": (
                "The NATS subjects of StockPilot Ops: what StockPilot AI publishes (usage, batch "
                "runs and locks), what the services publish (probe results, alerts, dead "
                "letters), and which NATS role may publish or read each. Every event is one "
                "JSON object with `type`, `id` and `occurred_at`; unknown fields are ignored. "
                "`stockpilot nats-info --role <role>` prints how to connect as a role."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "embedded": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "The embedded server of `stockpilot up` (its port is kept under "
                "the data dir; `stockpilot nats-info` prints it). Users and passwords per role.",
                "security": [{"$ref": "#/components/securitySchemes/rolePassword"}],
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": schemas,
            "securitySchemes": {
                "rolePassword": {
                    "type": "userPassword",
                    "description": "One NATS user per role (producer, observer, ops, and one "
                    "per StockPilot process); see docs/operations.md, Security model.",
                }
            },
        },
    }


def render() -> bytes:
    """The document as stable, indented JSON (what `docs/asyncapi.json` holds)."""
    return msgspec.json.format(msgspec.json.encode(build_document()), indent=2) + b"\n"


def main(argv: list[str] | None = None) -> int:
    """Write the document, or (`--check`) say whether a file still equals it."""
    parser = argparse.ArgumentParser(
        prog="python -m gateway.asyncapi",
        description="Write the AsyncAPI 3 document of StockPilot Ops' events, or check a copy.",
    )
    parser.add_argument("path", type=Path, help="the file to write or check")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when the file differs from the code"
    )
    args = parser.parse_args(argv)
    document = render()
    if args.check:
        if not args.path.exists() or args.path.read_bytes() != document:
            print(
                f"{args.path} is out of date with the event structs: "
                f"run `python -m gateway.asyncapi {args.path}`",
                file=sys.stderr,
            )
            return 1
        return 0
    args.path.write_bytes(document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
