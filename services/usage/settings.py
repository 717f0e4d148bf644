"""Settings of the usage service: budgets, alert thresholds, price overrides."""

from __future__ import annotations

from typing import Annotated

import msgspec

from services.usage.events import PriceUsd
from shared.settings import CommonSettings, PositiveFloat, PositiveInt

Threshold = Annotated[float, msgspec.Meta(gt=0, le=100)]


class ModelPrice(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """USD per million tokens; cached input costs the input price unless given.

    Bounded as in the `usage.prices_changed` event the table is published as.
    """

    input: PriceUsd
    output: PriceUsd = 0.0
    cached_input: PriceUsd | None = None


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
    # Users listed in /usage/stats (the projection holds more, bounded per day).
    top_users: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20


Settings = UsageSettings
