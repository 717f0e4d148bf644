"""The 30-day cost-by-model chart and the latency panel (issue #20) in real headless Chromium.

The chart is drawn from one `/usage/timeseries?bucket=day&group_by=model` (it used to take a
`/usage/stats?date=` per day with calls), `(other)` included and said; the latency panel
shows today's p50/p95/p99 per model and per endpoint from the refresh's one `/usage/stats`.
Events are dated from the `clock` fixture, which the gateway and the usage service share.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from services.usage.contract import SUBJECT_RECORDED, UsageRecorded
from shared.clock import ManualClock
from shared.events import Event
from tests.dashboard.harness import chromium_page, running_stack
from tests.dashboard.test_status_headline import STEADY, check_layout

WAIT_MS = 20_000
# One refresh per page load: the requests counted are those of one draw of every panel.
ONE_REFRESH = "refresh_ms=600000"
SLOW = "gpt-4o"
FAST = "gpt-4o-mini"
# Twelve models in the past days: the ten dearest get their own series, two go to (other).
PAST_MODELS = [f"model-{i:02d}" for i in range(12)]
PAST_DAYS = 6
COST_CHART = "/usage/timeseries?bucket=day&group_by=model"


def expect(target: Any) -> Any:
    """Playwright's auto-retrying assertions (imported late: the browser part may skip)."""
    from playwright.async_api import expect as playwright_expect

    return playwright_expect(target)


def call(
    clock: ManualClock, name: str, *, ago: timedelta, model: str, endpoint: str, ms: float
) -> tuple[str, Event]:
    return (
        SUBJECT_RECORDED,
        UsageRecorded(
            id=name,
            occurred_at=clock.now() - ago,
            model=model,
            endpoint=endpoint,
            status_code=200,
            prompt_tokens=100,
            completion_tokens=50,
            cost_usd=0.01,
            response_time_ms=ms,
        ),
    )


def seeded(clock: ManualClock) -> list[tuple[str, Event]]:
    """Today: `SLOW` 90 calls at 200 ms and 10 at 2 s on /api/v1/analysis (p50 200 ms, p95
    and p99 2 s), `FAST` 20 calls at 500 ms on /api/v1/chat. The past days: one call of each
    of the twelve past models a day, model-00 dearest (more calls)."""
    events = [
        call(
            clock,
            f"slow-{i:03d}",
            ago=timedelta(minutes=1 + i),
            model=SLOW,
            endpoint="/api/v1/analysis",
            ms=2000.0 if i % 10 == 0 else 200.0,
        )
        for i in range(100)
    ]
    events += [
        call(
            clock,
            f"fast-{i:03d}",
            ago=timedelta(minutes=2 + i),
            model=FAST,
            endpoint="/api/v1/chat",
            ms=500.0,
        )
        for i in range(20)
    ]
    for day in range(1, PAST_DAYS + 1):
        for rank, model in enumerate(PAST_MODELS):
            for n in range(len(PAST_MODELS) - rank):
                events.append(
                    call(
                        clock,
                        f"past-{day}-{model}-{n}",
                        ago=timedelta(days=day, minutes=n),
                        model=model,
                        endpoint="/api/v1/batch",
                        ms=300.0,
                    )
                )
    return events


async def usage_requests(page: Any, url: str) -> list[str]:
    """Load the page once; the /api/v1/usage/stats and /usage/timeseries URLs it asked for."""
    asked: list[str] = []
    listener = lambda request: asked.append(request.url)  # noqa: E731
    page.on("request", listener)
    await page.goto(url)
    for panel in ("costchart", "latency", "top", "requests"):
        await expect(page.get_by_test_id(f"panel-{panel}")).to_have_attribute(
            "data-state", "ok", timeout=WAIT_MS
        )
    await expect(page.locator("body")).to_have_attribute("data-refreshes", "1", timeout=WAIT_MS)
    page.remove_listener("request", listener)
    return [u for u in asked if "/api/v1/usage/stats" in u or "/api/v1/usage/timeseries" in u]


async def test_cost_chart_takes_one_request_and_latency_shows_percentiles_per_model(
    env: dict[str, str], tmp_path: Path, postgres_url: str, redis_url: str, clock: ManualClock
) -> None:
    async with running_stack(
        env,
        postgres_url=postgres_url,
        redis_url=redis_url,
        apis=list(STEADY),
        services=("usage",),
        clock=clock,
    ) as stack:
        async with chromium_page(tmp_path / "profile", width=1440) as page:
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            # No calls yet: both panels say so, neither fails.
            await page.goto(f"{stack.url}/?{ONE_REFRESH}")
            chart = page.get_by_test_id("panel-costchart")
            latency = page.get_by_test_id("panel-latency")
            await expect(chart).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
            await expect(chart).to_contain_text("No LLM cost recorded in the last 30 days")
            await expect(latency).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
            await expect(latency.get_by_test_id("latency-rows")).to_contain_text(
                "Nothing yet today."
            )

            events = seeded(clock)
            await stack.publish(events)
            # Wait until the gateway answers the page's own reads with every call (it keeps
            # answers between change notices): the reload below then draws them at once.
            async with httpx.AsyncClient(base_url=stack.url) as client:
                for _ in range(300):
                    today = (await client.get("/api/v1/usage/stats")).json()
                    days = (await client.get(f"/api/v1{COST_CHART}")).json()
                    if today["total_requests"] == 120 and days["other_keys"] == 4:
                        break
                    await asyncio.sleep(0.1)
            assert today["total_requests"] == 120
            assert days["other_keys"] == 4 and days["coverage"]["exact"] is True
            slow = today["by_model"][SLOW]
            # The sketch keeps 1 % accuracy: the p95 the page must show is the server's.
            assert abs(slow["p95_response_time_ms"] - 2000) <= 20
            assert abs(slow["p50_response_time_ms"] - 200) <= 2
            p95 = f"{slow['p95_response_time_ms'] / 1000:.2f} s"

            asked = await usage_requests(page, f"{stack.url}/?{ONE_REFRESH}")
            stats_urls = [u for u in asked if "/usage/stats" in u]
            series_urls = [u for u in asked if "/usage/timeseries" in u]
            # One /usage/stats for the whole refresh (shared by its panels), no per-day reads.
            assert len(stats_urls) == 1, asked
            assert "date=" not in stats_urls[0]
            by_model = [u for u in series_urls if "group_by=model" in u]
            assert len(by_model) == 1, asked
            assert "bucket=day" in by_model[0]
            assert len(series_urls) == 2, asked  # and the hourly one of "Requests today"

            # Every model drawn: the ten dearest by name, two more under "Other models".
            legend = chart.get_by_test_id("cost-legend-item")
            # By cost: SLOW $1.00, model-00..08 $0.72..$0.24; FAST $0.20 and model-09..11 after.
            await expect(legend).to_have_count(11)
            await expect(chart.locator('[data-key="(other)"]')).to_contain_text("Other models")
            await expect(chart.locator('[data-key="model-00"]')).to_contain_text("$0.72")
            # FAST $0.20, model-09 $0.18, model-10 $0.12, model-11 $0.06.
            await expect(chart.locator('[data-key="(other)"]')).to_contain_text("$0.56")
            await expect(page.locator("#cost-legend")).to_contain_text("$5.88")
            await expect(chart.get_by_test_id("costchart-note")).to_have_text(
                "“Other models” adds up 4 more models."
            )

            rows = latency.get_by_test_id("latency-row")
            await expect(rows).to_have_count(2)
            await expect(rows.nth(0)).to_have_attribute("data-key", SLOW)
            await expect(rows.nth(0).get_by_test_id("latency-p95")).to_have_text(p95)
            await expect(rows.nth(0).get_by_test_id("latency-p50")).to_contain_text("ms")
            await expect(rows.nth(1)).to_have_attribute("data-key", FAST)
            await check_layout(page)

            await latency.get_by_test_id("latency-by-endpoint").click()
            analysis = latency.locator('[data-testid=latency-row][data-key="/api/v1/analysis"]')
            await expect(analysis.get_by_test_id("latency-p95")).to_have_text(p95)
            await expect(latency.locator("th").first).to_have_text("Endpoint")

            await page.get_by_test_id("lang-toggle").click()
            await expect(latency.locator("h2")).to_have_text("오늘의 응답 시간")
            await expect(latency.locator("th").first).to_have_text("엔드포인트")
            await expect(analysis.get_by_test_id("latency-p95")).to_have_text(p95)
            await latency.get_by_test_id("latency-by-model").click()
            await expect(latency.get_by_test_id("latency-by-model")).to_have_text("모델별")
            await expect(rows.nth(0).get_by_test_id("latency-p95")).to_have_text(p95)
            await expect(chart.locator('[data-key="(other)"]')).to_contain_text("기타 모델")
            await expect(chart.get_by_test_id("costchart-note")).to_have_text(
                "‘기타 모델’은 모델 4개를 합한 값입니다."
            )
            await check_layout(page)
            assert errors == []
