"""The one translator from nats-py's exceptions to ours (pure: no server needed)."""

from __future__ import annotations

import nats.aio.client
import nats.errors
import nats.js.client
import pytest
from nats.js.errors import BadRequestError, KeyWrongLastSequenceError, NotFoundError
from nats.micro.request import ServiceError

from services.batch.errors import LockStateError
from shared.errors import StockpilotError, UnavailableError
from shared.nats_errors import (
    JsErrorCode,
    NatsStatus,
    has_code,
    is_nats_error,
    is_wrong_last_sequence,
    status_line,
    translate,
)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (nats.errors.NoRespondersError(), True),
        (nats.errors.TimeoutError(), True),
        (NotFoundError(code=404, err_code=JsErrorCode.STREAM_NOT_FOUND), True),
        (KeyWrongLastSequenceError(), True),
        (ServiceError("500", "boom"), True),
        (TimeoutError(), False),
        (ValueError("not ours"), False),
        (UnavailableError("already ours"), False),
    ],
)
def test_is_nats_error_knows_every_nats_py_exception_and_nothing_else(
    exc: BaseException, expected: bool
) -> None:
    assert is_nats_error(exc) is expected


def test_wrong_last_sequence_is_recognised_by_its_server_code_only() -> None:
    wrong = BadRequestError(code=400, err_code=10071, description="wrong last sequence: 3")
    other = BadRequestError(code=400, err_code=JsErrorCode.STREAM_NAME_IN_USE)
    assert is_wrong_last_sequence(wrong)
    assert not is_wrong_last_sequence(other)
    assert has_code(other, JsErrorCode.STREAM_NAME_IN_USE)
    assert not has_code(ValueError(), JsErrorCode.STREAM_NAME_IN_USE)


def test_the_codes_are_the_servers() -> None:
    """The numbers nats-server's errors.json gives these errors."""
    assert JsErrorCode.STREAM_NAME_IN_USE == 10058
    assert JsErrorCode.STREAM_NOT_FOUND == 10059
    assert JsErrorCode.STREAM_WRONG_LAST_SEQUENCE == 10071


def test_the_message_statuses_are_nats_pys() -> None:
    """The status codes nats-py itself compares a message's status with, and the line the
    bare reader and publisher look for."""
    assert str(NatsStatus.NO_RESPONDERS.value) == nats.aio.client.NO_RESPONDERS_STATUS
    assert str(NatsStatus.NO_RESPONDERS.value) == nats.js.client.NO_RESPONDERS_STATUS
    assert str(NatsStatus.CONTROL.value) == nats.aio.client.CTRL_STATUS
    assert status_line(NatsStatus.NO_RESPONDERS) == b"NATS/1.0 503"
    assert status_line(NatsStatus.CONTROL) == b"NATS/1.0 100"


def test_translate_names_what_failed_and_keeps_natss_words() -> None:
    error = translate(nats.errors.NoRespondersError(), "could not read the lock of job-1")
    assert isinstance(error, UnavailableError)
    assert error.status == 503
    assert (
        error.detail
        == "could not read the lock of job-1: nats: no responders available for request"
    )


def test_translate_takes_a_packages_own_error_class() -> None:
    error: StockpilotError = translate(
        nats.errors.ConnectionClosedError(), "could not store the lock", LockStateError
    )
    assert isinstance(error, LockStateError)
    assert error.detail.startswith("could not store the lock: ")
