"""A tiny service built on the runtime, to test the runtime itself with real NATS."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared.dead_letters import DeadLetter, dead_letter_subject
from shared.endpoints import Endpoint, NoParams
from shared.events import Alert, Event, alert_id
from shared.projection import FoldError, Projection, View
from shared.runtime import Context, ServiceDefinition
from shared.streams import STREAMS


class Counted(Event, frozen=True, kw_only=True, tag="usage.recorded"):
    """Reuses the usage stream's subject space: one counted thing."""

    model: str
    status_code: int


class ToyView(View, kw_only=True):
    count: int = 0
    by_model: dict[str, int] = {}
    ids: list[str] = []


decode = msgspec.json.Decoder(Counted).decode


def apply(view: ToyView, event: Counted, seq: int) -> Sequence[Alert]:
    if event.status_code < 0:
        raise FoldError("negative status code")
    view.count += 1
    view.by_model[event.model] = view.by_model.get(event.model, 0) + 1
    view.ids.append(event.id)
    if view.count == 3:
        return [
            Alert(
                id=alert_id("usage.toy_three", "all", "ever"),
                occurred_at=event.occurred_at,
                source="usage",
                kind="usage.toy_three",
                severity="info",
                title="three",
                message="three events",
                metric="count",
                value=3,
                threshold=3,
            )
        ]
    return ()


class CountAnswer(msgspec.Struct, kw_only=True):
    count: int
    by_model: dict[str, int]
    ids: list[str]


def build() -> tuple[ServiceDefinition, Projection[ToyView, Counted]]:
    projection = Projection(
        name="toy",
        stream=STREAMS["usage"],
        view_type=ToyView,
        decode=decode,
        apply=apply,
    )

    async def count(_: NoParams, ctx: Context) -> CountAnswer:
        v = projection.view
        return CountAnswer(count=v.count, by_model=dict(v.by_model), ids=list(v.ids))

    definition = ServiceDefinition(
        name="usage",
        projections=[projection],
        endpoints=[Endpoint("count", NoParams, count)],
        alert_source="usage",
    )
    return definition, projection


async def dead_letters(nc: NATS, service: str = "usage") -> list[DeadLetter]:
    """A list that fills with the service's dead letters as they arrive."""
    letters: list[DeadLetter] = []

    async def on_letter(msg: Msg) -> None:
        letters.append(msgspec.json.decode(msg.data, type=DeadLetter))

    await nc.subscribe(dead_letter_subject(service), cb=on_letter)
    return letters
