"""Alerts from what a usage event crossed: deterministic ids, contract fields."""

from __future__ import annotations

from collections.abc import Sequence

from services.usage.contract import UsageEvent
from services.usage.view import QUIET_S, WINDOW_S, Fired, FoldConfig
from shared.events import Alert, Severity, alert_id

_TEXT: dict[str, tuple[Severity, str, str]] = {
    "usage.cost_warning": ("warning", "{scope} LLM cost budget {pct}% used", "{metric}"),
    "usage.cost_exceeded": ("critical", "{scope} LLM cost budget exceeded", "{metric}"),
    "usage.cost_forecast": ("warning", "monthly LLM cost forecast over budget", "{metric}"),
    "usage.error_rate": ("critical", "LLM error rate high", "error_rate_pct"),
    "usage.unpriced_model": ("info", "model without a price", "unpriced_model"),
    "usage.budget_warning": ("warning", "LLM budget {scope} {pct}% used", "budget_cost_usd"),
    "usage.budget_exceeded": ("critical", "LLM budget {scope} exceeded", "budget_cost_usd"),
}


def alerts_for(fired: Sequence[Fired], event: UsageEvent, config: FoldConfig) -> list[Alert]:
    """The alerts for what `event` crossed (deterministic ids: kind + scope + period)."""
    return [_alert(f, event, config) for f in fired]


def _alert(fired: Fired, event: UsageEvent, config: FoldConfig) -> Alert:
    if fired.kind == "usage.error_rate" and fired.period.endswith(RECOVERED):
        return _recovered(fired, event)
    severity, title, metric = _TEXT[fired.kind]
    scope = fired.scope
    metric = metric.format(metric=f"{scope}_cost_usd" if scope in ("daily", "monthly") else "")
    if fired.kind == "usage.cost_forecast":
        metric = "forecast_month_cost_usd"
    if fired.kind in ("usage.cost_warning", "usage.cost_exceeded"):
        message = (
            f"{scope} LLM spend for {fired.period} is {_usd(fired.value)}, "
            f"at or over {_usd(fired.threshold)}"
        )
    elif fired.kind in ("usage.budget_warning", "usage.budget_exceeded"):
        message = (
            f"LLM spend of {scope} for {fired.period} is {_usd(fired.value)}, "
            f"at or over {_usd(fired.threshold)}"
        )
    elif fired.kind == "usage.cost_forecast":
        message = (
            f"at the current pace {fired.period} ends at {_usd(fired.value)}, "
            f"over the monthly budget of {_usd(fired.threshold)}"
        )
    elif fired.kind == "usage.error_rate":
        message = (
            f"{fired.value:.1f}% of LLM calls failed over the last {WINDOW_S // 60} minutes "
            f"(threshold {fired.threshold:g}%, at least {config.error_rate_min_calls} calls)"
        )
    else:
        message = f"model {scope!r} is not in the price table: its calls are counted at $0"
    return Alert(
        id=alert_id(fired.kind, scope, fired.period),
        occurred_at=event.occurred_at,
        source="usage",
        kind=fired.kind,
        severity=severity,
        title=title.format(scope=scope, pct=f"{config.cost_alert_pct:g}"),
        message=message,
        metric=metric,
        value=round(fired.value, 6),
        threshold=round(fired.threshold, 6),
        params={
            "scope": scope,
            "period": fired.period,
            "warn_pct": config.cost_alert_pct,
            "minutes": WINDOW_S // 60,
            "min_calls": config.error_rate_min_calls,
        },
    )


RECOVERED = ":recovered"


def _recovered(fired: Fired, event: UsageEvent) -> Alert:
    """The one announcement that an error-rate episode is over (clear for QUIET_S)."""
    return Alert(
        id=alert_id(fired.kind, fired.scope, fired.period),
        occurred_at=event.occurred_at,
        source="usage",
        kind=fired.kind,
        severity="info",
        title="LLM error rate back to normal",
        message=(
            f"the LLM error rate has stayed under {fired.threshold:g}% for "
            f"{QUIET_S // 60} minutes ({fired.value:.1f}% when it cleared)"
        ),
        metric="error_rate_pct",
        value=round(fired.value, 6),
        threshold=round(fired.threshold, 6),
        params={"recovered": True, "minutes": QUIET_S // 60, "period": fired.period},
    )


def _usd(amount: float) -> str:
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.4f}"
