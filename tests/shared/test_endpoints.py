"""The micro adapter alone, against a real nats-server: parameters decoded and validated,
errors answered with their status, `$SRV.PING`, and concurrent endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from nats import connect
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro.service import Service

from shared.endpoints import (
    Endpoint,
    NoParams,
    add_endpoints,
    endpoint_subject,
    micro_name,
    start_service,
)
from shared.errors import ConflictError
from tests.harness import NatsServer


class EchoParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    word: str
    times: int = 1


class Echo(msgspec.Struct, kw_only=True):
    said: str


async def echo(params: EchoParams, _: Any) -> Echo:
    return Echo(said=params.word * params.times)


async def conflict(_: NoParams, __: Any) -> Echo:
    raise ConflictError("the lock is held")


async def broken(_: NoParams, __: Any) -> Echo:
    raise ZeroDivisionError("a bug")


async def raw(_: NoParams, __: Any) -> bytes:
    return b'{"already":"encoded"}'


@pytest.fixture
async def nc(nats: NatsServer) -> AsyncIterator[NATS]:
    client = await connect(nats.url)
    yield client
    await client.close()


@pytest.fixture
async def service(nc: NATS) -> AsyncIterator[Service]:
    micro = await start_service(nc, "toy", "", "9.9.9")
    endpoints = [
        Endpoint("echo", EchoParams, echo),
        Endpoint("conflict", NoParams, conflict),
        Endpoint("broken", NoParams, broken),
        Endpoint("raw", NoParams, raw),
    ]
    await add_endpoints(micro, "toy", endpoints, context=None)  # type: ignore[arg-type]
    yield micro
    await micro.stop()


def error_of(msg: Msg) -> tuple[str, str] | None:
    headers = msg.headers or {}
    if "Nats-Service-Error-Code" not in headers:
        return None
    return headers["Nats-Service-Error-Code"], headers["Nats-Service-Error"]


async def ask(nc: NATS, endpoint: str, body: bytes = b"") -> Msg:
    return await nc.request(endpoint_subject("toy", endpoint), body, timeout=5)


async def test_parameters_are_decoded_and_the_answer_encoded(nc: NATS, service: Service) -> None:
    msg = await ask(nc, "echo", b'{"word":"ab","times":2}')
    assert error_of(msg) is None
    assert msgspec.json.decode(msg.data, type=Echo).said == "abab"
    assert (await ask(nc, "raw")).data == b'{"already":"encoded"}'


async def test_bad_parameters_are_a_422(nc: NATS, service: Service) -> None:
    for body in (b'{"word":1}', b'{"word":"a","extra":true}', b"{not json"):
        error = error_of(await ask(nc, "echo", body))
        assert error is not None and error[0] == "422", body


async def test_errors_keep_their_status_and_a_bug_is_a_500(nc: NATS, service: Service) -> None:
    assert error_of(await ask(nc, "conflict")) == ("409", "the lock is held")
    assert error_of(await ask(nc, "broken")) == ("500", "internal error in broken")


async def test_the_instance_answers_ping_under_its_micro_name(nc: NATS, service: Service) -> None:
    ping = await nc.request(f"$SRV.PING.{micro_name('toy')}", b"", timeout=5)
    answer = msgspec.json.decode(ping.data)
    assert answer["name"] == "stockpilot-toy"
    assert answer["id"] == service.id
    assert answer["version"] == "9.9.9"
    assert answer["metadata"]["service"] == "toy"


async def test_a_concurrent_endpoint_answers_while_an_earlier_request_waits(nc: NATS) -> None:
    """The first request waits for the second: answered only if each runs in its own task."""
    entered, opened = asyncio.Event(), asyncio.Event()

    async def gate(params: EchoParams, _: Any) -> Echo:
        if params.word == "open":
            opened.set()
        else:
            entered.set()
            await opened.wait()
        return Echo(said=params.word)

    micro = await start_service(nc, "gated", "", "9.9.9")
    await add_endpoints(
        micro,
        "gated",
        [Endpoint("gate", EchoParams, gate, concurrent=True)],
        None,  # type: ignore[arg-type]
    )
    try:
        subject = endpoint_subject("gated", "gate")
        waiting = asyncio.create_task(nc.request(subject, b'{"word":"wait"}', timeout=5))
        await asyncio.wait_for(entered.wait(), 5)  # the first request is being handled
        opener = await nc.request(subject, b'{"word":"open"}', timeout=5)
        assert msgspec.json.decode(opener.data, type=Echo).said == "open"
        assert msgspec.json.decode((await waiting).data, type=Echo).said == "wait"
    finally:
        await micro.stop()
