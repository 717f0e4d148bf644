"""The usage stream's events: one LLM call recorded, statistics reset."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from shared.events import AwareDatetime, Event, EventId, wrong_subject

SUBJECT_RECORDED = "stockpilot.usage.recorded"
SUBJECT_RESET = "stockpilot.usage.reset"

# Ranges of the contract (§4): what no real LLM call comes near, and what keeps every sum,
# snapshot and answer finite and small (a 1.7e308 cost or a 2^64-1 token count broke them).
# An upper bound on a float also refuses infinity; JSON has no NaN.
TokenCount = Annotated[int, msgspec.Meta(ge=0, lt=10**9)]
CostUsd = Annotated[float, msgspec.Meta(ge=0, lt=1e6)]
Millis = Annotated[float, msgspec.Meta(ge=0, lt=1e8)]
# 0 stands for "no HTTP answer at all" (a connection error; error_code says which).
StatusCode = Annotated[int, msgspec.Meta(ge=0, le=999)]
# Model names are short ("gpt-4o-mini-2024-07-18"); 128 leaves room for fine-tune names.
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
# A request id is a UUID or the like; a user id an opaque key of StockPilot AI.
ShortId = Annotated[str, msgspec.Meta(max_length=256)]
# An endpoint is a URL path of StockPilot AI ("/api/v1/analysis").
EndpointPath = Annotated[str, msgspec.Meta(max_length=512)]
# An error code is a label ("rate_limit_exceeded", "timeout").
ErrorCode = Annotated[str, msgspec.Meta(max_length=128)]
Actor = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Reason = Annotated[str, msgspec.Meta(max_length=500)]


class UsageRecorded(Event, frozen=True, kw_only=True, tag="usage.recorded"):
    """One LLM call (`stockpilot.usage.recorded`)."""

    model: ModelName
    status_code: StatusCode
    request_id: ShortId | None = None
    endpoint: EndpointPath | None = None
    prompt_tokens: TokenCount = 0
    completion_tokens: TokenCount = 0
    cached_tokens: TokenCount = 0
    cost_usd: CostUsd | None = None
    error_code: ErrorCode | None = None
    response_time_ms: Millis | None = None
    user_id: ShortId | None = None

    def stored_problem(self, subject: str) -> str | None:
        """A recorded call belongs on `stockpilot.usage.recorded` only, and its names are
        printable: they reach alert ids (a Nats-Msg-Id header), logs and webhook texts.

        Checked here rather than in `__post_init__`, which would make every decode half as
        slow again; one expression, as this runs for every event folded.
        """
        if subject != SUBJECT_RECORDED:
            return wrong_subject("a usage.recorded event", subject, SUBJECT_RECORDED)
        if not (
            self.model.isprintable()
            and self.id.isprintable()
            and (self.user_id is None or self.user_id.isprintable())
            and (self.endpoint is None or self.endpoint.isprintable())
            and (self.request_id is None or self.request_id.isprintable())
            and (self.error_code is None or self.error_code.isprintable())
        ):
            return UNPRINTABLE
        return None

    @property
    def failed(self) -> bool:
        """A call fails with an HTTP status >= 400 or any error code."""
        return self.status_code >= 400 or bool(self.error_code)


UNPRINTABLE = (
    "id, model, request_id, endpoint, user_id and error_code must not contain control characters"
)


def printable(value: str, name: str) -> None:
    """Refuse (ValueError: msgspec reports it as a validation error) a name with control or
    other non-printable characters."""
    if not value.isprintable():
        raise ValueError(f"`{name}` must not contain control characters")


class UsageReset(Event, frozen=True, kw_only=True, tag="usage.reset"):
    """Statistics restart from zero (`stockpilot.usage.reset`); the stream keeps everything."""

    actor: Actor
    scope: Literal["all"] = "all"
    reason: Reason | None = None

    def stored_problem(self, subject: str) -> str | None:
        """A reset belongs on `stockpilot.usage.reset` only (which producers may not publish)."""
        if subject == SUBJECT_RESET:
            return None
        return wrong_subject("a usage.reset event", subject, SUBJECT_RESET)


UsageEvent = UsageRecorded | UsageReset

decode_usage_event = msgspec.json.Decoder(UsageEvent).decode


class UsageRecordedIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """A record posted to `POST /api/v1/usage/records`: the event with lenient defaults.

    `type` may be left out, `id` defaults to `request_id` (assigned when both are missing),
    `occurred_at` defaults to when the gateway received it. Extra fields are ignored, as on
    the subject, so a newer client can post to an older gateway.
    """

    model: ModelName
    status_code: StatusCode
    type: Literal["usage.recorded"] = "usage.recorded"
    id: EventId | None = None
    occurred_at: AwareDatetime | None = None
    request_id: ShortId | None = None
    endpoint: EndpointPath | None = None
    prompt_tokens: TokenCount = 0
    completion_tokens: TokenCount = 0
    cached_tokens: TokenCount = 0
    cost_usd: CostUsd | None = None
    error_code: ErrorCode | None = None
    response_time_ms: Millis | None = None
    user_id: ShortId | None = None

    def __post_init__(self) -> None:
        for name in ("id", "model", "request_id", "endpoint", "user_id", "error_code"):
            value = getattr(self, name)
            if value is not None:
                printable(value, name)
