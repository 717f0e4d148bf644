"""Every setting a fold reads (a service's FOLD_SETTINGS) is in its projection's fingerprint,
so a snapshot folded under another value of it is rebuilt (pure: no server)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from services.batch import service as batch
from services.batch.settings import BatchSettings
from services.health import service as health
from services.health.settings import HealthSettings
from services.usage import service as usage
from services.usage.settings import Budget, UsageSettings
from shared.projection import Projection

# Another valid value of each fold setting.
OTHER: dict[str, dict[str, Any]] = {
    "health": {
        "hysteresis_down": 5,
        "hysteresis_up": 4,
        "history_max_samples": 999,
        "history_max_hours": 48,
    },
    "batch": {"history_limit": 10},
    "usage": {
        "tz": "America/New_York",
        "daily_budget_usd": 5.0,
        "monthly_budget_usd": 50.0,
        "budgets": [Budget(scope="user:u-1", period="daily", usd=1.0)],
        "cost_alert_pct": 50.0,
        "error_rate_alert_pct": 30.0,
        "error_rate_min_calls": 3,
    },
}
# The usage fold's configured prices only price calls folded before the stream's first
# usage.prices_changed, which the service stores at start: a changed table is an event to
# fold, not another configuration (services.usage.view.config_fingerprint).
NOT_FINGERPRINTED = {"usage": {"prices"}}


def _projection(service: str, settings: Any) -> Projection[Any, Any]:
    if service == "health":
        return health.health_projection(settings)
    if service == "batch":
        return batch.batch_projection(settings.history_limit)
    return usage.usage_projection(settings)


SERVICES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "health": (HealthSettings(), health.FOLD_SETTINGS),
    "batch": (BatchSettings(), batch.FOLD_SETTINGS),
    "usage": (UsageSettings(), usage.FOLD_SETTINGS),
}


@pytest.mark.parametrize(
    ("service", "name"),
    [
        (service, name)
        for service, (_, names) in SERVICES.items()
        for name in names
        if name not in NOT_FINGERPRINTED.get(service, set())
    ],
)
def test_each_fold_setting_changes_the_fingerprint(service: str, name: str) -> None:
    base, _ = SERVICES[service]
    changed = msgspec.structs.replace(base, **{name: OTHER[service][name]})
    assert getattr(changed, name) != getattr(base, name)
    assert _projection(service, changed).fingerprint != _projection(service, base).fingerprint


@pytest.mark.parametrize("service", list(SERVICES))
def test_every_fold_setting_has_a_case_here(service: str) -> None:
    """A fold setting added to a service must be added above (and to its fingerprint)."""
    _, names = SERVICES[service]
    assert set(names) == set(OTHER[service]) | NOT_FINGERPRINTED.get(service, set())


@pytest.mark.parametrize("service", list(SERVICES))
def test_the_same_settings_give_the_same_fingerprint(service: str) -> None:
    base, _ = SERVICES[service]
    first, second = _projection(service, base), _projection(service, base)
    assert first.fingerprint and first.fingerprint == second.fingerprint
    assert first.version
