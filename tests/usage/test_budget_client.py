"""The usage client's budget check against the real gateway and usage service: allowed until
an enforced budget is used up, answers kept for at most a second, one request for many."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest

from services.usage.budget_client import BudgetChecker, BudgetError, BudgetExceeded
from services.usage.client import UsageRecorder
from services.usage.service import build
from shared.clock import ManualClock
from tests.harness import running_service
from tests.usage.helpers import INGEST, auth, gateway, gateway_settings, recorded, usage_settings

BUDGETS = '[{"scope": "user:u-42", "period": "daily", "usd": 1.0, "enforce": true}]'


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_check_budget_and_guard_follow_the_service_within_a_second(
    env: dict[str, str], clock: ManualClock
) -> None:
    settings = usage_settings(env, budgets=BUDGETS)
    ticks = Ticks()
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_settings(env, read_token="r-secret"), clock) as client,
    ):
        budgets = BudgetChecker("http://unused", token="r-secret", monotonic=ticks, http=client)
        allowed = await budgets.check_budget(user_id="u-42", model="gpt-4o")
        assert allowed.allowed and allowed.budgets[0].used_usd == 0.0
        calls = [recorded(i, clock.now(), user_id="u-42", cost_usd=0.35) for i in range(3)]
        body = [msgspec.to_builtins(c) for c in calls]
        posted = await client.post("/api/v1/usage/records", json=body, headers=auth(INGEST))
        assert posted.json()["accepted"] == 3
        # Within the second the kept answer stands (no request); concurrent checks of new
        # parameters share one request.
        async with budgets.guard(user_id="u-42", model="gpt-4o"):
            pass
        assert budgets.requests == 1
        await asyncio.gather(*(budgets.answer(user_id="u-7") for _ in range(20)))
        assert budgets.requests == 2
        ticks.now += 1.0
        with pytest.raises(BudgetExceeded) as refused:
            async with budgets.guard(user_id="u-42", model="gpt-4o"):
                raise AssertionError("the guarded call ran")
        assert "user:u-42" in str(refused.value)
        assert refused.value.answer.budgets[0].used_usd == 1.05
        assert (await budgets.check_budget(user_id="u-7")).allowed  # other users may go on
        nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
        recorder = UsageRecorder(nc, budgets=budgets)
        with pytest.raises(BudgetExceeded):
            await recorder.check_budget(user_id="u-42")
        await nc.close()
        unauthorised = BudgetChecker("http://unused", token="wrong", http=client)
        with pytest.raises(BudgetError, match="403"):
            await unauthorised.check_budget(user_id="u-42")
        await budgets.aclose()
