"""Settings of the usage service: budgets, alert thresholds, price overrides."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from services.usage.contract import PriceUsd
from shared.settings import CommonSettings, PositiveFloat, PositiveInt

Threshold = Annotated[float, msgspec.Meta(gt=0, le=100)]


class ModelPrice(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """USD per million tokens; cached input costs the input price unless given.

    Bounded as in the `usage.prices_changed` event the table is published as.
    """

    input: PriceUsd
    output: PriceUsd = 0.0
    cached_input: PriceUsd | None = None


BudgetScope = Annotated[
    str, msgspec.Meta(pattern=r"^(all|(user|model|endpoint|tag):.{1,256})$", max_length=261)
]


class Budget(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A scoped budget (STOCKPILOT_BUDGETS): spend of the calls in `scope` per day or month.

    `enforce`: `GET /api/v1/usage/budget` answers `allowed: false` once it is used up (the
    usage client's check_budget raises BudgetExceeded); otherwise it only alerts.
    """

    scope: BudgetScope
    period: Literal["daily", "monthly"]
    usd: PositiveFloat
    enforce: bool = False

    def __post_init__(self) -> None:
        if not self.scope.isprintable():
            raise ValueError("a budget's scope must not contain control characters")

    @property
    def key(self) -> str:
        """What the projection keeps its spend under ("user:u-42 daily")."""
        return f"{self.scope} {self.period}"


class UsageSettings(CommonSettings, frozen=True, kw_only=True):
    """Budgets (unset → no budget alerts), thresholds in percent, the `[prices]` override."""

    daily_budget_usd: PositiveFloat | None = None
    monthly_budget_usd: PositiveFloat | None = None
    cost_alert_pct: Threshold = 80.0
    error_rate_alert_pct: Threshold = 20.0
    error_rate_min_calls: PositiveInt = 10
    # Model → price, over the shipped services/usage/prices.toml (a `[prices]` table in
    # stockpilot.toml, or STOCKPILOT_PRICES as JSON).
    prices: dict[str, ModelPrice] = {}
    # Scoped budgets, each with its own alerts; the daily/monthly budgets above are `all`.
    budgets: Annotated[list[Budget], msgspec.Meta(max_length=100)] = []
    # Users listed in /usage/stats (the projection holds more, bounded per day).
    top_users: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20


Settings = UsageSettings
