"""The headline tells the truth: each bad state drives it, in English and Korean, at 1280/1440 px.

Real Chromium against the real gateway, services and nats-server (tests/dashboard/harness).
One stack and one page: the test drives the stack into each state the issue found the page
lying about, one after another, checks the headline's text, its colour and its reasons (opened
by a click) in both languages, that no element overflows its panel and no label is cut off at
1280 and 1440 px wide, then puts the state right and sees the headline return to healthy, so
every state is judged on its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from ops import demo
from services.batch.client import acquire_lock
from services.batch.contract import BatchFinished, BatchStarted
from services.usage.contract import UsageRecorded
from shared.events import Event, utc_now
from tests.dashboard.harness import ADMIN_TOKEN, Stack, chromium_page, running_stack

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
OTHER = {"en": "ko", "ko": "en"}
# Steady loopback dependencies (none flaps), so only the state a test drives is wrong.
STEADY = [demo.FakeApi("quotes", delay_s=0.01), demo.fake_openai()]
# Reasons that say something is wrong (`info` ones only say an area is unknown).
SERIOUS = '[data-testid=status-reason]:not([data-severity="info"])'

# Every element inside a panel (or the top bar) must lie within it; labels must not be cut.
OVERFLOW_JS = "\n".join(
    line
    for line in (Path(__file__).parent / "layout_check.js").read_text().splitlines()
    if not line.startswith("//")
)


def expect(target: Any) -> Any:
    from playwright.async_api import expect as playwright_expect

    return playwright_expect(target)


# ----- driving the stack into a state, and out of it again ----------------------------------


def call(at_offset_s: float, **fields: Any) -> tuple[str, Event]:
    """One LLM call `at_offset_s` seconds ago, free unless told (so the budget is only spent by
    the budget state, at exactly 300 %)."""
    ident = f"hl-{uuid.uuid4().hex[:12]}"
    values: dict[str, Any] = {"model": "gpt-4o-mini", "status_code": 200, "cost_usd": 0.0}
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


def run(job_id: str, status: str, error: str | None = None) -> list[tuple[str, Event]]:
    """One finished run of `job_id`, started 50 s ago."""
    execution_id = f"hl-{uuid.uuid4().hex[:10]}"
    started = utc_now() - timedelta(seconds=50)
    subject = f"stockpilot.batch.run.{job_id}"
    return [
        (
            subject,
            BatchStarted(
                id=f"{execution_id}.started",
                occurred_at=started,
                execution_id=execution_id,
                job_id=job_id,
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
                job_id=job_id,
                status=status,
                items_processed=10,
                duration_s=40.0,
                throughput_per_s=0.25,
                peak_memory_mb=100.0,
                avg_cpu_percent=20.0,
                error=error,
            ),
        ),
    ]


async def nothing_to_do(stack: Stack) -> None:
    """The stack starts with no dependency configured."""


async def configure(stack: Stack) -> None:
    await stack.configure_dependencies()


async def failed_job(stack: Stack) -> None:
    """price-sync's last run failed."""
    await stack.publish(run("price-sync", "failed", "RuntimeError: upstream closed the connection"))


async def job_succeeded(stack: Stack) -> None:
    await stack.publish(run("price-sync", "succeeded"))


async def expired_lock(stack: Stack) -> None:
    """A worker took portfolio-rebalance's lock for a second and vanished holding it (no run)."""
    await acquire_lock(
        stack.nc.jetstream(),
        demo.STUCK_JOB,
        owner="batch-2:4411",
        execution_id=f"hl-{uuid.uuid4().hex[:10]}",
        ttl_s=1.0,
    )


async def clean_up_locks(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as client:
        response = await client.post(
            "/api/v1/batch/locks/cleanup", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
    assert response.status_code == 200, response.text
    assert response.json()["released"] == [demo.STUCK_JOB]


async def errors_over(stack: Stack) -> None:
    """Half of 40 calls in the last minute failed."""
    failed = {"status_code": 429, "error_code": "rate_limit"}
    await stack.publish([call(5 + i, **(failed if i % 2 else {})) for i in range(40)])


async def errors_diluted(stack: Stack) -> None:
    """160 more calls succeed: 20 failed of 200 is 10 %, under the 20 % threshold."""
    await stack.publish([call(1 + i / 10) for i in range(160)])


async def usage_stopped(stack: Stack) -> None:
    await stack.stop_service("usage")


async def usage_started(stack: Stack) -> None:
    await stack.start_service("usage")


async def budget_over(stack: Stack) -> None:
    """$75 against the stack's $25 daily budget: 300 %."""
    await stack.publish([call(60, cost_usd=75.0)])


# ----- what the page must say besides the headline --------------------------------------------


async def tiles_say_not_configured(page: Any, lang: str) -> None:
    tile = page.get_by_test_id("component-database")
    await expect(tile).to_have_attribute("data-configured", "false", timeout=WAIT_MS)
    await expect(tile).to_contain_text({"en": "Not configured", "ko": "미설정"}[lang])
    await expect(tile).to_contain_text("STOCKPILOT_DATABASE_URL")


def alert_says(kind: str, en: str, ko: str) -> Callable[[Any, str], Awaitable[None]]:
    """The newest alert of `kind` is shown in the page's language (from its kind and params)."""

    async def check(page: Any, lang: str) -> None:
        alert = page.locator(f'[data-testid=alert-item][data-kind="{kind}"]')
        await expect(alert.first).to_contain_text({"en": en, "ko": ko}[lang], timeout=WAIT_MS)

    return check


async def lock_row_says_expired(page: Any, lang: str) -> None:
    row = page.locator(f'[data-testid=lock-row][data-job-id="{demo.STUCK_JOB}"]')
    await expect(row).to_have_attribute("data-lock-state", "expired", timeout=WAIT_MS)
    await expect(row.locator(".badge")).to_have_text({"en": "Expired", "ko": "만료됨"}[lang])


async def usage_panels_unavailable(page: Any, lang: str) -> None:
    """Its panels and the alert feed say so: never "No alerts" or zeros."""
    for panel in ("cost", "requests", "alerts"):
        await expect(page.get_by_test_id(f"panel-{panel}")).to_have_attribute(
            "data-state", "unavailable", timeout=WAIT_MS
        )
    unavailable = {"en": "Unavailable: Usage service", "ko": "사용 불가: 사용량 서비스"}[lang]
    await expect(page.get_by_test_id("panel-alerts")).to_contain_text(unavailable)


@dataclass(frozen=True)
class State:
    name: str
    drive: Callable[[Stack], Awaitable[None]]
    status: str
    # The area whose reason must be shown, and a fragment of that reason in each language.
    area: str
    says: dict[str, str]
    # What puts the state right again (None: the last state).
    undo: Callable[[Stack], Awaitable[None]] | None
    extra: Callable[[Any, str], Awaitable[None]] | None = None


STATES = [
    State(
        "nothing configured",
        nothing_to_do,
        "unknown",
        "dependencies",
        {"en": "no dependency is configured", "ko": "설정된 의존성이 없습니다"},
        undo=configure,
        extra=tiles_say_not_configured,
    ),
    State(
        "a failed job",
        failed_job,
        "degraded",
        "batch",
        {"en": "the last run of price-sync failed", "ko": "price-sync의 마지막 실행이 실패"},
        undo=job_succeeded,
        extra=alert_says(
            "batch.job_failed", "Batch job price-sync failed", "배치 작업 price-sync 실패"
        ),
    ),
    State(
        "an expired lock",
        expired_lock,
        "degraded",
        "locks",
        {"en": f"the lock of {demo.STUCK_JOB} expired", "ko": "아직 보유 중"},
        undo=clean_up_locks,
        extra=lock_row_says_expired,
    ),
    State(
        "errors over",
        errors_over,
        "degraded",
        "llm_errors",
        {"en": "50.0 % of 40 LLM calls failed", "ko": "40건 중 50.0% 실패"},
        undo=errors_diluted,
        extra=alert_says("usage.error_rate", "LLM error rate high", "LLM 오류율 높음"),
    ),
    State(
        "a stopped service",
        usage_stopped,
        "degraded",
        "services",
        {"en": "the usage service does not answer", "ko": "사용량 서비스가 응답하지 않습니다"},
        undo=usage_started,
        extra=usage_panels_unavailable,
    ),
    State(
        "budget over",
        budget_over,
        "unhealthy",
        "llm_spend",
        {"en": "daily LLM budget 300 % used", "ko": "일일 LLM 예산 300%"},
        undo=None,
        extra=alert_says(
            "usage.cost_exceeded", "LLM cost budget exceeded", "일일 LLM 비용 예산 초과"
        ),
    ),
]

# ----- checks -------------------------------------------------------------------------------


async def language(page: Any) -> str:
    lang: str = await page.get_by_test_id("lang-toggle").get_attribute("data-lang")
    return lang


async def check_headline(page: Any, status: str, lang: str) -> None:
    headline = page.get_by_test_id("overall-status")
    await expect(headline).to_have_attribute("data-status", status, timeout=WAIT_MS)
    await expect(headline.locator(".overall-label")).to_have_text(LABELS[lang][status])
    colour = await headline.locator(".dot").evaluate("el => getComputedStyle(el).backgroundColor")
    assert colour == COLOURS[status]


async def check_reasons(page: Any, state: State, lang: str) -> None:
    """The reasons, opened by a click: the state's own, said in `lang`, and no other problem."""
    await expect(page.get_by_test_id("reason-count")).not_to_be_empty()
    headline = page.get_by_test_id("overall-status")
    if await headline.get_attribute("aria-expanded") != "true":
        await headline.click()
    reason = page.locator(f'[data-testid=status-reason][data-area="{state.area}"]')
    await expect(reason.filter(has_text=state.says[lang]).first).to_be_visible(timeout=WAIT_MS)
    serious = page.locator(SERIOUS)
    if state.status == "unknown":
        await expect(serious).to_have_count(0)
    else:
        await expect(serious).to_have_count(1)
        await expect(serious).to_have_attribute("data-area", state.area)
        severity = "critical" if state.status == "unhealthy" else "warning"
        await expect(serious).to_have_attribute("data-severity", severity)


async def check_layout(page: Any) -> None:
    """Nothing overflows at 1280 and 1440 px (the current width first: one resize less)."""
    now = page.viewport_size["width"]
    for width in (now, 1440 if now == 1280 else 1280):
        if width != page.viewport_size["width"]:
            await page.set_viewport_size({"width": width, "height": 1000})
            await page.wait_for_timeout(300)  # the charts redraw for the new width
        problems = await page.evaluate(OVERFLOW_JS)
        assert problems == [], f"at {width} px: {problems}"


async def check_healthy_again(page: Any) -> None:
    await check_headline(page, "healthy", await language(page))
    await expect(page.get_by_test_id("reason-count")).to_be_empty()


async def test_headline_tells_each_bad_state_with_its_reasons_in_both_languages(
    env: dict[str, str], tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    async with running_stack(
        env,
        postgres_url=postgres_url,
        redis_url=redis_url,
        apis=list(STEADY),
        configured=False,
    ) as stack:
        async with chromium_page(tmp_path / "profile", width=1280) as page:
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{stack.url}/?refresh_ms=500")
            # Hovering the headline shows its reasons and leaving hides them (a click pins
            # them open: check_reasons). The stack starts in the first state already.
            await check_headline(page, STATES[0].status, "en")
            await page.get_by_test_id("overall-status").hover()
            await expect(page.get_by_test_id("status-reasons")).to_be_visible()
            await page.mouse.move(0, 900)
            await expect(page.get_by_test_id("status-reasons")).to_be_hidden()
            for state in STATES:
                await state.drive(stack)
                first = await language(page)
                for lang in (first, OTHER[first]):
                    if lang != await language(page):
                        await page.get_by_test_id("lang-toggle").click()
                    try:
                        await check_headline(page, state.status, lang)
                        await check_reasons(page, state, lang)
                        if state.extra is not None:
                            await state.extra(page, lang)
                        await check_layout(page)
                    except AssertionError as exc:
                        raise AssertionError(f"{state.name} ({lang}): {exc}") from exc
                if state.undo is not None:
                    await state.undo(stack)
                    await check_healthy_again(page)
                if state is STATES[0]:
                    # A quiet configured stack: healthy, and no calls yet reads "–", not 0.0 %.
                    await expect(page.get_by_test_id("kpi-error-rate")).to_have_text("–")
                    await expect(page.get_by_test_id("panel-alerts")).to_have_attribute(
                        "data-state", "ok"
                    )
                    await check_layout(page)
            assert errors == []
