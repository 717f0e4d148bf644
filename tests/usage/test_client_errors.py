"""Error codes of failed calls, named as the provider names its exception classes."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.usage.client import failure_event
from tests.clocks import NOON


class APIConnectionError(Exception):
    """Named like openai.APIConnectionError (the code reads only the class name)."""


class RateLimitError(Exception):
    pass


class APITimeoutError(Exception):
    pass


class InternalServerError(Exception):
    pass


class HTTP2ProtocolError(Exception):
    pass


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (APIConnectionError(), "api_connection_error"),
        (RateLimitError(), "rate_limit_error"),
        (APITimeoutError(), "timeout"),
        (InternalServerError(), "internal_server_error"),
        (HTTP2ProtocolError(), "http2_protocol_error"),
        (ConnectionRefusedError(), "connection_refused_error"),
    ],
)
def test_an_error_without_a_code_is_named_after_its_class(exc: Exception, code: str) -> None:
    event = failure_event(
        exc,
        NOON - timedelta(seconds=2),
        12.5,
        model="gpt-4o-mini",
        endpoint="/analysis",
        user_id=None,
        request_id="req-1",
    )
    assert event.error_code == code
    assert event.status_code == 0  # no HTTP answer at all


def test_a_code_the_error_carries_wins_over_its_class_name() -> None:
    exc = RateLimitError()
    exc.code = "insufficient_quota"  # type: ignore[attr-defined]
    event = failure_event(
        exc, NOON, 1.0, model="gpt-4o", endpoint=None, user_id=None, request_id="req-2"
    )
    assert event.error_code == "insufficient_quota"
