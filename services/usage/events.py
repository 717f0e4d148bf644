"""The usage stream's events: one LLM call recorded, statistics reset."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from shared.events import AwareDatetime, Event, NonEmptyStr

SUBJECT_RECORDED = "stockpilot.usage.recorded"
SUBJECT_RESET = "stockpilot.usage.reset"

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
# 0 stands for "no HTTP answer at all" (a connection error; error_code says which).
StatusCode = Annotated[int, msgspec.Meta(ge=0, le=999)]
ShortStr = Annotated[str, msgspec.Meta(max_length=512)]


class UsageRecorded(Event, frozen=True, kw_only=True, tag="usage.recorded"):
    """One LLM call (`stockpilot.usage.recorded`)."""

    model: NonEmptyStr
    status_code: StatusCode
    request_id: ShortStr | None = None
    endpoint: ShortStr | None = None
    prompt_tokens: NonNegativeInt = 0
    completion_tokens: NonNegativeInt = 0
    cached_tokens: NonNegativeInt = 0
    cost_usd: NonNegativeFloat | None = None
    error_code: ShortStr | None = None
    response_time_ms: NonNegativeFloat | None = None
    user_id: ShortStr | None = None

    @property
    def failed(self) -> bool:
        """A call fails with an HTTP status >= 400 or any error code."""
        return self.status_code >= 400 or bool(self.error_code)


class UsageReset(Event, frozen=True, kw_only=True, tag="usage.reset"):
    """Statistics restart from zero (`stockpilot.usage.reset`); the stream keeps everything."""

    actor: NonEmptyStr
    scope: Literal["all"] = "all"
    reason: ShortStr | None = None


UsageEvent = UsageRecorded | UsageReset

decode_usage_event = msgspec.json.Decoder(UsageEvent).decode


class UsageRecordedIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """A record posted to `POST /api/v1/usage/records`: the event with lenient defaults.

    `type` may be left out, `id` defaults to `request_id` (assigned when both are missing),
    `occurred_at` defaults to when the gateway received it. Extra fields are ignored, as on
    the subject, so a newer client can post to an older gateway.
    """

    model: NonEmptyStr
    status_code: StatusCode
    type: Literal["usage.recorded"] = "usage.recorded"
    id: NonEmptyStr | None = None
    occurred_at: AwareDatetime | None = None
    request_id: ShortStr | None = None
    endpoint: ShortStr | None = None
    prompt_tokens: NonNegativeInt = 0
    completion_tokens: NonNegativeInt = 0
    cached_tokens: NonNegativeInt = 0
    cost_usd: NonNegativeFloat | None = None
    error_code: ShortStr | None = None
    response_time_ms: NonNegativeFloat | None = None
    user_id: ShortStr | None = None
