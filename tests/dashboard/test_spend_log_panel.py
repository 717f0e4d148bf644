"""The spend-log panel (issue #20) in real headless Chromium: the last calls with what each was
charged, filtered by user and by model, in English and Korean, within its panel."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from services.usage.contract import SUBJECT_RECORDED, UsageRecorded
from shared.events import Event, utc_now
from tests.dashboard.harness import chromium_page, running_stack
from tests.dashboard.test_status_headline import STEADY, check_layout

WAIT_MS = 20_000


def expect(target: Any) -> Any:
    """Playwright's auto-retrying assertions (imported late: the browser part may skip)."""
    from playwright.async_api import expect as playwright_expect

    return playwright_expect(target)


def calls() -> list[tuple[str, Event]]:
    """Twenty calls a minute apart, the newest a minute ago: two users, two models; the
    newest failed; one reports its own cost."""
    now = utc_now()
    events: list[tuple[str, Event]] = []
    for i in range(20):
        events.append(
            (
                SUBJECT_RECORDED,
                UsageRecorded(
                    id=f"spend-{i:02d}",
                    occurred_at=now - timedelta(minutes=20 - i),
                    model="gpt-4o-2024-08-06" if i % 2 else "gpt-4o-mini",
                    endpoint="/api/v1/analysis",
                    prompt_tokens=1000,
                    completion_tokens=500,
                    status_code=429 if i == 19 else 200,
                    error_code="rate_limit_exceeded" if i == 19 else None,
                    cost_usd=1.5 if i == 18 else None,
                    response_time_ms=900.0,
                    user_id="alice" if i % 4 == 0 else "bob",
                ),
            )
        )
    return events


async def test_spend_log_panel_lists_the_last_calls_and_filters_by_user_and_model(
    env: dict[str, str], tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    async with running_stack(
        env,
        postgres_url=postgres_url,
        redis_url=redis_url,
        apis=list(STEADY),
        services=("usage",),
    ) as stack:
        await stack.publish(calls())
        async with chromium_page(tmp_path / "profile", width=1440) as page:
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{stack.url}/?refresh_ms=500")
            panel = page.get_by_test_id("panel-spendlog")
            await expect(panel).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
            rows = panel.get_by_test_id("spend-row")
            await expect(rows).to_have_count(15, timeout=WAIT_MS)
            # Newest first: the failed call, then the one with its own cost.
            newest = rows.nth(0)
            await expect(newest).to_have_attribute("data-id", "spend-19")
            await expect(newest).to_have_attribute("data-failed", "true")
            await expect(newest).to_contain_text("rate_limit_exceeded")
            await expect(rows.nth(1).get_by_test_id("spend-cost")).to_have_text("$1.50")
            # gpt-4o-2024-08-06 at gpt-4o's price: 1000 in at $2.50/M, 500 out at $10/M.
            await expect(rows.nth(2).get_by_test_id("spend-cost")).to_have_text("$0.0075")
            await check_layout(page)

            await panel.get_by_test_id("spend-user").fill("alice")
            await panel.get_by_test_id("spend-user").press("Enter")
            await expect(rows).to_have_count(5, timeout=WAIT_MS)
            ids = [await r.get_attribute("data-id") for r in await rows.all()]
            assert ids == ["spend-16", "spend-12", "spend-08", "spend-04", "spend-00"]

            await panel.get_by_test_id("spend-user").fill("")
            await panel.get_by_test_id("spend-user").press("Enter")
            await panel.get_by_test_id("spend-model").fill("gpt-4o")  # its dated names too
            await panel.get_by_test_id("spend-model").press("Enter")
            await expect(rows).to_have_count(10, timeout=WAIT_MS)
            await expect(rows.nth(0)).to_have_attribute("data-id", "spend-19")
            await panel.get_by_test_id("spend-user").fill("nobody")
            await panel.get_by_test_id("spend-user").press("Enter")
            await expect(panel.get_by_test_id("spend-log")).to_contain_text(
                "No recent call matches these filters", timeout=WAIT_MS
            )

            await page.get_by_test_id("lang-toggle").click()
            await expect(panel.locator("h2")).to_have_text("지출 로그: 최근 호출")
            await expect(panel.get_by_test_id("spend-log")).to_contain_text(
                "이 필터에 맞는 최근 호출이 없습니다"
            )
            await check_layout(page)
            assert errors == []
