"""`stockpilot replay`: rebuild a service's projections from the first event and compare.

The live service says, through its built-in `digest` endpoint, how far each projection got
(`last_seq`) and the fingerprint of its view there. The replay folds the same stream, with
the same Projection objects, into a fresh view up to exactly that sequence, and compares
`view_digest`. Equal digests mean the live projection is what its events say it should be.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js import api as js_api

from ops.stream_io import Progress, read_stream
from shared.alerts import alert_ledger
from shared.endpoints import endpoint_subject
from shared.projection import Projection, view_digest
from shared.runtime import ServiceDefinition
from shared.service_status import DigestAnswer
from shared.settings import CommonSettings, SettingsError, env_name, load_settings
from shared.streams import STREAMS
from shared.transport import ack_metadata

# Which services fold which stream (every service keeps an alert ledger over the alerts).
STREAM_SERVICES: dict[str, tuple[str, ...]] = {
    STREAMS["usage"].name: ("usage",),
    STREAMS["health"].name: ("health",),
    STREAMS["batch"].name: ("batch",),
    STREAMS["alerts"].name: ("usage", "health", "batch"),
}


class ReplayError(Exception):
    """The replay could not be compared (service not answering, unknown stream…)."""


class ReplayResult(msgspec.Struct, kw_only=True):
    """One projection rebuilt and compared (one JSON line of `stockpilot replay`)."""

    service: str
    projection: str
    stream: str
    filter_subject: str
    last_seq: int
    live_digest: str
    replayed_digest: str
    equal: bool
    events: int
    refused: int
    seconds: float


def stream_name(text: str) -> str:
    """`usage`, `STOCKPILOT_USAGE` or `stockpilot_usage` → `STOCKPILOT_USAGE`."""
    upper = text.strip().upper()
    if upper in STREAM_SERVICES:
        return upper
    if upper.lower() in STREAMS:
        return STREAMS[upper.lower()].name
    raise ReplayError(f"unknown stream {text!r}: expected one of {', '.join(STREAM_SERVICES)}")


def settings_class(service: str) -> type[CommonSettings]:
    """The settings struct of a real service (imported lazily)."""
    settings_module = importlib.import_module(f"services.{service}.settings")
    settings_cls = getattr(settings_module, "Settings", None) or getattr(
        settings_module, f"{service.capitalize()}Settings", None
    )
    if settings_cls is None:
        candidates = [
            value
            for value in vars(settings_module).values()
            if isinstance(value, type)
            and issubclass(value, CommonSettings)
            and value is not CommonSettings
        ]
        if len(candidates) != 1:
            raise ReplayError(f"services.{service}.settings has no Settings class")
        settings_cls = candidates[0]
    found: type[CommonSettings] = settings_cls
    return found


class SettingDifference(msgspec.Struct, kw_only=True):
    """A fold setting whose live value is not this shell's (the replay uses the live one)."""

    service: str
    variable: str
    live: Any
    here: Any


def with_live_settings(
    service: str, local: CommonSettings, live: dict[str, Any]
) -> tuple[CommonSettings, list[SettingDifference]]:
    """`local` with the live service's fold settings over it, and what differed."""
    cls = type(local)
    here = msgspec.to_builtins(local)
    differences = [
        SettingDifference(
            service=service, variable=env_name(cls, name), live=value, here=here.get(name)
        )
        for name, value in sorted(live.items())
        if name in here and here[name] != value
    ]
    unknown = sorted(name for name in live if name not in here)
    if unknown:
        raise ReplayError(
            f"the live {service} service folds with settings this checkout does not know "
            f"({', '.join(unknown)}): replay with the same version of StockPilot Ops"
        )
    try:
        merged = msgspec.convert({**here, **live}, cls, strict=False)
    except (msgspec.ValidationError, SettingsError) as exc:
        raise ReplayError(
            f"the live {service} service's settings do not load here: {exc}"
        ) from None
    return merged, differences


def load_definition(service: str, settings: CommonSettings | None = None) -> ServiceDefinition:
    """A fresh definition of a real service, built from `settings` (default: this process's
    environment)."""
    service_module = importlib.import_module(f"services.{service}.service")
    if settings is None:
        settings = load_settings(settings_class(service))
    definition: ServiceDefinition = service_module.build(settings)
    return definition


def projections_over(definition: ServiceDefinition, stream: str) -> list[Projection[Any, Any]]:
    """The definition's projections that fold `stream`, the runtime's alert ledger included."""
    projections = list(definition.projections)
    if definition.alert_source:
        projections.insert(0, alert_ledger(definition.alert_source))
    return [p for p in projections if p.stream.name == stream]


async def live_digests(nc: NATS, service: str, timeout: float) -> DigestAnswer:
    """Ask the live service where its projections stand."""
    try:
        msg = await nc.request(endpoint_subject(service, "digest"), b"{}", timeout=timeout)
    except NoRespondersError:
        raise ReplayError(f"the {service} service is not running") from None
    except NatsTimeoutError:
        raise ReplayError(f"the {service} service did not answer within {timeout:g}s") from None
    if msg.headers and "Nats-Service-Error" in msg.headers:
        raise ReplayError(f"the {service} service refused: {msg.headers['Nats-Service-Error']}")
    return msgspec.json.decode(msg.data, type=DigestAnswer)


async def fold_to(
    js: JetStreamContext,
    projection: Projection[Any, Any],
    last_seq: int,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Fold the projection's events from the first up to `last_seq`; (applied, refused)."""
    projection.reset()
    applied = refused = 0

    def on_message(msg: Msg) -> None:
        nonlocal applied, refused
        if progress is not None:
            progress.tick()
        seq, _, stored_ns = ack_metadata(msg)
        if seq <= projection.view.last_seq:
            return
        try:
            # The subject and stored time decide as they did for the live service.
            projection.fold(seq, msg.data, msg.subject, stored_ns)
        except Exception:  # what the runtime dead-letters: the view only moves its last_seq
            projection.view.last_seq = seq
            refused += 1
        else:
            applied += 1

    await read_stream(
        js,
        projection.stream.name,
        on_message,
        subject=projection.subject,
        start=js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL),
        end_seq=last_seq,
    )
    return applied, refused


async def replay_definition(
    nc: NATS,
    definition: ServiceDefinition,
    stream: str,
    *,
    timeout: float = 5.0,
    on_result: Callable[[ReplayResult], None] | None = None,
    show_progress: bool = False,
    answer: DigestAnswer | None = None,
) -> list[ReplayResult]:
    """Rebuild the definition's projections over `stream` and compare them with the live ones
    (`answer`: the live service's digest answer, asked here when not given).

    `definition` must be a fresh one (its views are reset and refolded here).
    """
    selected = projections_over(definition, stream)
    if not selected:
        return []
    if answer is None:
        answer = await live_digests(nc, definition.name, timeout)
    live = {p.name: p for p in answer.projections}
    js = nc.jetstream()
    if definition.prepare is not None:
        await definition.prepare(js, None)  # read only: what the folds need
    results: list[ReplayResult] = []
    for projection in selected:
        state = live.get(projection.name)
        if state is None:
            raise ReplayError(
                f"the live {definition.name} service has no projection {projection.name!r}"
            )
        started = time.monotonic()
        progress = (
            Progress(f"replay {definition.name}/{projection.name}", total=state.last_seq)
            if show_progress
            else None
        )
        applied, refused = await fold_to(js, projection, state.last_seq, progress)
        if progress is not None:
            progress.finish()
        replayed = view_digest(projection.view)
        result = ReplayResult(
            service=definition.name,
            projection=projection.name,
            stream=stream,
            filter_subject=projection.subject,
            last_seq=state.last_seq,
            live_digest=state.digest,
            replayed_digest=replayed,
            equal=replayed == state.digest and projection.view.last_seq == state.last_seq,
            events=applied,
            refused=refused,
            seconds=round(time.monotonic() - started, 3),
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


async def live_definition(
    nc: NATS, service: str, timeout: float
) -> tuple[ServiceDefinition, DigestAnswer, list[str]]:
    """A fresh definition of `service` built with the live service's fold settings (this
    shell's environment for the rest), the live digest answer, and lines for the operator:
    each fold setting whose live value differs from this shell's."""
    answer = await live_digests(nc, service, timeout)
    try:
        local = load_settings(settings_class(service))
    except SettingsError as exc:
        raise ReplayError(f"this shell's {service} settings do not load: {exc}") from None
    if answer.settings is None:  # a service older than the fold settings in its answer
        note = (
            f"the live {service} service does not report its fold settings (an older "
            "version): folding with this shell's, so a difference may come from them"
        )
        return load_definition(service, local), answer, [note]
    merged, differences = with_live_settings(service, local, answer.settings)
    notes = [
        f"folding with the live service's {d.variable}={_json(d.live)} "
        f"(this shell: {_json(d.here)})"
        for d in differences
    ]
    return load_definition(service, merged), answer, notes


def _json(value: Any) -> str:
    """A setting's value in a line (JSON, cut: a price table can be long)."""
    text = msgspec.json.encode(value).decode()
    return text if len(text) <= 80 else text[:77] + "..."
