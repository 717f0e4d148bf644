"""The one place that knows nats-py's exceptions and the server's JetStream error codes.

Everywhere else asks here whether an exception came from NATS and turns it into one of the
project's errors (shared.errors), so no module recognises NATS errors by their module name or
compares the server's error codes as bare numbers: JetStream's API errors are JsErrorCode,
the status of a message (what the bare reader and publisher parse) NatsStatus.
"""

from __future__ import annotations

from enum import IntEnum

import nats.errors
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError
from nats.micro.request import ServiceError as MicroServiceError

from shared.errors import StockpilotError, UnavailableError


class JsErrorCode(IntEnum):
    """JetStream API error codes (`err_code`), named as nats-server's errors.json names them."""

    # JSStreamNameExistErr: "stream name already in use with a different configuration".
    STREAM_NAME_IN_USE = 10058
    # JSStreamNotFoundErr: "stream not found".
    STREAM_NOT_FOUND = 10059
    # JSStreamWrongLastSequenceErr: an expected-last-(subject-)sequence header did not hold.
    STREAM_WRONG_LAST_SEQUENCE = 10071


class NatsStatus(IntEnum):
    """Codes of the status line a NATS message may carry instead of data (`NATS/1.0 503`),
    as nats-py's client names them (NO_RESPONDERS_STATUS, CTRL_STATUS)."""

    # An idle heartbeat or a flow-control request of a push consumer.
    CONTROL = 100
    # Nobody subscribes to the subject; for a JetStream publish: no stream takes it.
    NO_RESPONDERS = 503


def status_line(code: NatsStatus) -> bytes:
    """How a header block carrying `code` starts (`b"NATS/1.0 503"`), for the bare reader and
    publisher, which read the frames themselves."""
    return b"NATS/1.0 %d" % code


# Every nats-py exception derives from nats.errors.Error except the micro framework's
# ServiceError (an error answer from a NATS micro endpoint), which is NATS's all the same.
NATS_ERRORS: tuple[type[Exception], ...] = (nats.errors.Error, MicroServiceError)


def is_nats_error(exc: BaseException) -> bool:
    """Whether `exc` was raised by nats-py (the connection, JetStream, a micro endpoint)."""
    return isinstance(exc, NATS_ERRORS)


def has_code(exc: BaseException, code: JsErrorCode) -> bool:
    """Whether `exc` is the server's JetStream API error `code`."""
    return isinstance(exc, APIError) and exc.err_code == code


def is_wrong_last_sequence(exc: BaseException) -> bool:
    """Whether a publish failed because the subject moved on (someone else stored first)."""
    return has_code(exc, JsErrorCode.STREAM_WRONG_LAST_SEQUENCE)


def translate(
    exc: BaseException, doing: str, error: type[StockpilotError] = UnavailableError
) -> StockpilotError:
    """The project's error for a nats-py exception met while `doing` something.

    `error` is the class to raise (UnavailableError, 503, unless a package has its own, such
    as batch's LockStateError); the detail names what failed and NATS's own words. The caller
    raises the result `from None` (the NATS traceback says nothing to an API client) and
    re-raises anything `is_nats_error` refuses.
    """
    assert is_nats_error(exc), f"not a NATS error: {exc!r}"
    return error(f"{doing}: {exc}")


# What a NATS restart, a reconnect or a stream leader election looks like to a caller: no
# answer in time, nobody listening yet, JetStream briefly unavailable, the reconnect buffer
# full. Worth trying again; every other NATS error (a refused permission, a bad request)
# would fail the same way again.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
    ServiceUnavailableError,
    NoStreamResponseError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is NATS being briefly away rather than refusing (see TRANSIENT_ERRORS)."""
    return isinstance(exc, TRANSIENT_ERRORS)
