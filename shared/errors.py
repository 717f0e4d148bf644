"""The one error tree every layer shares: each error knows the HTTP status it maps to.

Services raise these from queries and commands; the runtime sends them over NATS as micro
service errors (code = status); the gateway turns them back into HTTP with a `detail`.
"""

from __future__ import annotations


class StockpilotError(Exception):
    """Base of the project's errors; `status` is the HTTP status it maps to."""

    status = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidRequestError(StockpilotError):
    """A parameter or body is malformed or out of range."""

    status = 422


class UnauthorizedError(StockpilotError):
    """No credentials where a token is required."""

    status = 401


class ForbiddenError(StockpilotError):
    """Credentials present but wrong, or the route is disabled."""

    status = 403


class NotFoundError(StockpilotError):
    """The thing asked for does not exist."""

    status = 404


class ConflictError(StockpilotError):
    """The request conflicts with the current state (a lock held by someone else)."""

    status = 409


class UnavailableError(StockpilotError):
    """A service or dependency did not answer in time."""

    status = 503


_BY_STATUS: dict[int, type[StockpilotError]] = {
    422: InvalidRequestError,
    400: InvalidRequestError,
    401: UnauthorizedError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    503: UnavailableError,
}


def error_for_status(status: int, detail: str) -> StockpilotError:
    """Rebuild an error received over NATS from its status code."""
    cls = _BY_STATUS.get(status, StockpilotError)
    error = cls(detail)
    error.status = status
    return error
