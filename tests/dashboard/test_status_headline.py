"""The headline tells the truth: each bad state drives it, in English and Korean, at 1280/1440 px.

Real Chromium against the real gateway, services and nats-server (tests/dashboard/harness).
Each test drives the stack into one state the issue found the page lying about, then checks the
headline's text, its colour, its reasons (opened by a click), the same in Korean, and that no
element overflows its panel and no label is cut off at 1280 and 1440 px wide.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ops import demo
from services.batch.events import BatchFinished, BatchStarted
from services.usage.events import UsageRecorded
from shared.events import Event, utc_now
from tests.dashboard.harness import Stack, chromium_page, running_stack

WAIT_MS = 20_000
# The page's status colours (dashboard.css --ok, --warn, --bad, --unknown) as computed.
COLOURS = {
    "healthy": "rgb(63, 185, 80)",
    "degraded": "rgb(210, 153, 34)",
    "unhealthy": "rgb(248, 81, 73)",
    "unknown": "rgb(125, 133, 144)",
}
LABELS = {
    "en": {
        "healthy": "Healthy",
        "degraded": "Degraded",
        "unhealthy": "Unhealthy",
        "unknown": "Unknown",
    },
    "ko": {
        "healthy": "정상",
        "degraded": "성능 저하",
        "unhealthy": "장애",
        "unknown": "알 수 없음",
    },
}
# Steady loopback dependencies (none flaps), so only the state a test drives is wrong.
STEADY = [demo.FakeApi("quotes", delay_s=0.01), demo.fake_openai()]

# Every element inside a panel (or the top bar) must lie within it; labels must not be cut.
OVERFLOW_JS = "\n".join(
    line
    for line in (Path(__file__).parent / "layout_check.js").read_text().splitlines()
    if not line.startswith("//")
)


def expect(target: Any) -> Any:
    from playwright.async_api import expect as playwright_expect

    return playwright_expect(target)


def call(at_offset_s: float, **fields: Any) -> tuple[str, Event]:
    """One LLM call `at_offset_s` seconds ago."""
    ident = f"hl-{uuid.uuid4().hex[:12]}"
    values: dict[str, Any] = {"model": "gpt-4o-mini", "status_code": 200, "cost_usd": 0.001}
    values.update(fields)
    event = UsageRecorded(
        id=ident,
        occurred_at=utc_now() - timedelta(seconds=at_offset_s),
        request_id=ident,
        endpoint="/api/v1/analysis",
        response_time_ms=800.0,
        **values,
    )
    return demo.USAGE_SUBJECT, event


async def budget_over(stack: Stack) -> None:
    """$75 against the stack's $25 daily budget: 300 %."""
    await stack.publish([call(60, cost_usd=75.0)])


async def errors_over(stack: Stack) -> None:
    """Half of 40 calls in the last minutes failed."""
    failed = {"status_code": 429, "error_code": "rate_limit"}
    await stack.publish([call(5 + i, **(failed if i % 2 else {})) for i in range(40)])


async def failed_job(stack: Stack) -> None:
    """price-sync's last run failed; nothing has succeeded since."""
    execution_id = f"hl-{uuid.uuid4().hex[:10]}"
    started = utc_now() - timedelta(seconds=50)
    subject = "stockpilot.batch.run.price-sync"
    await stack.publish(
        [
            (
                subject,
                BatchStarted(
                    id=f"{execution_id}.started",
                    occurred_at=started,
                    execution_id=execution_id,
                    job_id="price-sync",
                    host="batch-1",
                    pid=4242,
                ),
            ),
            (
                subject,
                BatchFinished(
                    id=f"{execution_id}.finished",
                    occurred_at=started + timedelta(seconds=40),
                    execution_id=execution_id,
                    job_id="price-sync",
                    status="failed",
                    items_processed=10,
                    duration_s=40.0,
                    throughput_per_s=0.25,
                    peak_memory_mb=100.0,
                    avg_cpu_percent=20.0,
                    error="RuntimeError: upstream closed the connection",
                ),
            ),
        ]
    )


async def expired_lock(stack: Stack) -> None:
    """A worker took the report job's lock for a second and died holding it."""
    await demo.stuck_lock(stack.nc, ttl_s=1.0)


async def usage_stopped(stack: Stack) -> None:
    await stack.stop_service("usage")


async def nothing(stack: Stack) -> None:
    return None


@dataclass(frozen=True)
class Case:
    drive: Callable[[Stack], Awaitable[None]]
    status: str
    # (area, a fragment of its reason in English, the same in Korean)
    reason: tuple[str, str, str]
    configured: bool = True


CASES = {
    "budget-over": Case(
        budget_over,
        "unhealthy",
        ("llm_spend", "daily LLM budget 300 % used", "일일 LLM 예산 300%"),
    ),
    "errors-over": Case(
        errors_over,
        "degraded",
        ("llm_errors", "50.0 % of 40 LLM calls failed", "40건 중 50.0% 실패"),
    ),
    "failed-job": Case(
        failed_job,
        "degraded",
        ("batch", "the last run of price-sync failed", "price-sync의 마지막 실행이 실패"),
    ),
    "expired-lock": Case(
        expired_lock,
        "degraded",
        ("locks", f"the lock of {demo.STUCK_JOB} expired", "아직 보유 중"),
    ),
    "usage-stopped": Case(
        usage_stopped,
        "degraded",
        ("services", "the usage service does not answer", "사용량 서비스가 응답하지 않습니다"),
    ),
    "nothing-configured": Case(
        nothing,
        "unknown",
        ("dependencies", "no dependency is configured", "설정된 의존성이 없습니다"),
        configured=False,
    ),
}


async def check_headline(page: Any, status: str, lang: str, area: str, fragment: str) -> None:
    headline = page.get_by_test_id("overall-status")
    await expect(headline).to_have_attribute("data-status", status, timeout=WAIT_MS)
    await expect(headline.locator(".overall-label")).to_have_text(LABELS[lang][status])
    colour = await headline.locator(".dot").evaluate("el => getComputedStyle(el).backgroundColor")
    assert colour == COLOURS[status]
    await expect(page.get_by_test_id("reason-count")).not_to_be_empty()
    if await headline.get_attribute("aria-expanded") != "true":
        await headline.click()
    reason = page.locator(f'[data-testid=status-reason][data-area="{area}"]')
    await expect(reason.first).to_be_visible()
    await expect(reason.filter(has_text=fragment).first).to_be_visible(timeout=WAIT_MS)


async def check_layout(page: Any) -> None:
    for width in (1280, 1440):
        await page.set_viewport_size({"width": width, "height": 1000})
        await page.wait_for_timeout(300)
        problems = await page.evaluate(OVERFLOW_JS)
        assert problems == [], f"at {width} px: {problems}"


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
async def test_headline_tells_the_bad_state_with_its_reasons(
    case: str, env: dict[str, str], tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    spec = CASES[case]
    async with running_stack(
        env,
        postgres_url=postgres_url,
        redis_url=redis_url,
        apis=list(STEADY),
        configured=spec.configured,
    ) as stack:
        await spec.drive(stack)
        async with chromium_page(tmp_path / "profile", width=1280) as page:
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{stack.url}/?refresh_ms=500")
            area, english, korean = spec.reason
            await check_headline(page, spec.status, "en", area, english)
            await check_layout(page)
            await page.get_by_test_id("lang-toggle").click()
            await check_headline(page, spec.status, "ko", area, korean)
            await check_layout(page)
            if case == "budget-over":
                # The alert itself in Korean, from its kind and params.
                alert = page.locator('[data-testid=alert-item][data-kind="usage.cost_exceeded"]')
                await expect(alert.first).to_contain_text(
                    "일일 LLM 비용 예산 초과", timeout=WAIT_MS
                )
            if case == "failed-job":
                alert = page.locator('[data-testid=alert-item][data-kind="batch.job_failed"]')
                await expect(alert.first).to_contain_text(
                    "배치 작업 price-sync 실패", timeout=WAIT_MS
                )
            if case == "nothing-configured":
                tile = page.get_by_test_id("component-database")
                await expect(tile).to_have_attribute("data-configured", "false", timeout=WAIT_MS)
                await expect(tile).to_contain_text("미설정")
                await expect(tile).to_contain_text("STOCKPILOT_DATABASE_URL")
            if case == "usage-stopped":
                # Its panels and the alert feed say so: never "No alerts" or zeros.
                for panel in ("cost", "requests", "alerts"):
                    await expect(page.get_by_test_id(f"panel-{panel}")).to_have_attribute(
                        "data-state", "unavailable", timeout=WAIT_MS
                    )
            if case == "expired-lock":
                row = page.locator(f'[data-testid=lock-row][data-job-id="{demo.STUCK_JOB}"]')
                await expect(row).to_have_attribute("data-lock-state", "expired", timeout=WAIT_MS)
                await expect(row.locator(".badge")).to_have_text("만료됨")
            assert errors == []


async def test_a_quiet_configured_stack_reads_healthy_with_dashes_for_empty_figures(
    env: dict[str, str], tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    async with running_stack(
        env, postgres_url=postgres_url, redis_url=redis_url, apis=list(STEADY)
    ) as stack:
        async with chromium_page(tmp_path / "profile", width=1440) as page:
            await page.goto(f"{stack.url}/?refresh_ms=500")
            headline = page.get_by_test_id("overall-status")
            await expect(headline).to_have_attribute("data-status", "healthy", timeout=WAIT_MS)
            await expect(page.get_by_test_id("reason-count")).to_be_empty()
            # No calls today: no error rate, not "0.0 %".
            await expect(page.get_by_test_id("kpi-error-rate")).to_have_text("–")
            await expect(page.get_by_test_id("panel-alerts")).to_have_attribute("data-state", "ok")
            await check_layout(page)
