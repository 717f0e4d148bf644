"""The dashboard in real headless Chromium against the real gateway, services and nats-server.

Set STOCKPILOT_UPDATE_SCREENSHOT=1 to rewrite docs/dashboard.png (the README screenshot)
from the live-data test.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from ops import demo
from services.batch.contract import BatchFinished, BatchStarted
from shared.events import Alert, Event, utc_now
from shared.settings import load_settings
from tests.dashboard.harness import (
    ADMIN_TOKEN,
    Stack,
    chromium_page,
    demo_history,
    require_routes,
    running_stack,
)

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
WAIT_MS = 15_000


def expect(target: Any) -> Any:
    """Playwright's auto-retrying assertions (imported late: the browser part may skip)."""
    from playwright.async_api import expect as playwright_expect

    return playwright_expect(target)


def watch_errors(page: Any) -> list[str]:
    """Uncaught page errors; a panel that fails must never throw."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


def finished_run(job_id: str, *, failed: bool = False) -> tuple[str, list[tuple[str, Event]]]:
    """A short execution of `job_id` that just ended, as contract batch events."""
    execution_id = f"test-{uuid.uuid4().hex[:10]}"
    started = utc_now() - timedelta(seconds=42)
    subject = f"stockpilot.batch.run.{job_id}"
    return execution_id, [
        (
            subject,
            BatchStarted(
                id=f"{execution_id}.started",
                occurred_at=started,
                execution_id=execution_id,
                job_id=job_id,
                host="batch-1",
                pid=4242,
                items_total=1000,
            ),
        ),
        (
            subject,
            BatchFinished(
                id=f"{execution_id}.finished",
                occurred_at=started + timedelta(seconds=40),
                execution_id=execution_id,
                job_id=job_id,
                status="failed" if failed else "succeeded",
                items_processed=600 if failed else 1000,
                duration_s=40.0,
                throughput_per_s=15.0 if failed else 25.0,
                peak_memory_mb=512.0,
                avg_cpu_percent=40.0,
                error="RuntimeError: upstream closed the connection" if failed else None,
            ),
        ),
    ]


async def test_page_and_assets_are_served_and_kept_out_of_the_api_schema(
    env: dict[str, str],
) -> None:
    app = create_app(load_settings(GatewaySettings, env))
    async with AsyncTestClient(app) as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/static/dashboard.js">' in page.text
        for asset, kind in (
            ("dashboard.js", "javascript"),
            ("i18n.js", "javascript"),
            ("charts.js", "javascript"),
            ("dashboard.css", "css"),
        ):
            answer = await client.get(f"/static/{asset}")
            assert answer.status_code == 200, asset
            assert kind in answer.headers["content-type"], asset
        assert (await client.get("/static/nope.js")).status_code == 404
        schema = (await client.get("/schema/openapi.json")).json()
    assert "/" not in schema["paths"]
    assert not [p for p in schema["paths"] if p.startswith("/static")]
    # No CDN: every asset the page loads is served by the gateway itself.
    assert "http://" not in page.text and "https://" not in page.text


async def test_every_panel_fails_on_its_own_when_no_service_runs(
    env: dict[str, str], tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    async with (
        running_stack(env, postgres_url=postgres_url, redis_url=redis_url, services=()) as stack,
        chromium_page(tmp_path / "profile") as page,
    ):
        errors = watch_errors(page)
        await page.goto(f"{stack.url}/?refresh_ms=500")
        for name in ("health", "usage", "batch"):
            await expect(page.get_by_test_id(f"service-{name}")).to_have_attribute(
                "data-status", "unavailable", timeout=WAIT_MS
            )
        await expect(page.get_by_test_id("overall-status")).to_have_attribute(
            "data-status", "unhealthy"
        )
        for panel in (
            "components",
            "cost",
            "costchart",
            "requests",
            "top",
            "latency",
            "executions",
        ):
            locator = page.get_by_test_id(f"panel-{panel}")
            await expect(locator).to_have_attribute("data-state", "unavailable", timeout=WAIT_MS)
            await expect(locator.locator(".panel-error")).to_contain_text("service")
        # The gateway itself answers, so the alert stream is live even with no service.
        require_routes(stack.app, "/api/v1/alerts/stream")
        await expect(page.get_by_test_id("alert-stream-state")).to_have_attribute(
            "data-status", "connected", timeout=WAIT_MS
        )
        assert errors == []


async def test_a_read_token_is_asked_for_and_then_sent_with_every_read(
    env: dict[str, str], tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    guarded = {**env, "STOCKPILOT_READ_TOKEN": "dashboard-read-token"}
    async with (
        running_stack(guarded, postgres_url=postgres_url, redis_url=redis_url) as stack,
        chromium_page(tmp_path / "profile") as page,
    ):
        require_routes(stack.app, "/api/v1/alerts/stream")
        errors = watch_errors(page)
        await page.goto(f"{stack.url}/?refresh_ms=500")
        await expect(
            page.get_by_test_id("panel-executions").locator(".panel-error")
        ).to_contain_text("HTTP 401", timeout=WAIT_MS)
        page.once("dialog", lambda dialog: dialog.accept("dashboard-read-token"))
        await page.locator("#read-token-button").click()
        await expect(page.get_by_test_id("panel-executions")).to_have_attribute(
            "data-state", "ok", timeout=WAIT_MS
        )
        await expect(page.get_by_test_id("service-batch")).to_have_attribute("data-status", "up")
        # The live feed carries the token too (EventSource cannot: a fetch stream does).
        await expect(page.get_by_test_id("alert-stream-state")).to_have_attribute(
            "data-status", "connected", timeout=WAIT_MS
        )
        alert = Alert(
            id=f"health.status_changed:test:{uuid.uuid4().hex[:8]}",
            occurred_at=utc_now(),
            source="health",
            kind="health.status_changed",
            severity="warning",
            title="Token-guarded alert",
            message="external.fx went from healthy to unhealthy",
            metric="status",
            value=0.0,
            threshold=1.0,
        )
        await stack.publish([(alert.subject, alert)])
        await expect(page.locator(f'[data-alert-id="{alert.id}"]')).to_be_visible(timeout=WAIT_MS)
        assert errors == []


async def _seed(stack: Stack) -> None:
    """What `stockpilot demo` sends, compressed: history, an incident, runs, a stuck lock."""
    settings_zone = load_settings(GatewaySettings, stack.env).zone
    now = utc_now()
    await stack.publish(demo_history(now, settings_zone))
    # The rate-limit incident of the last minutes (trips the error-rate alert).
    rng = random.Random(11)
    incident: list[tuple[str, Event]] = [
        (demo.USAGE_SUBJECT, demo.usage_event(rng, now - timedelta(seconds=i * 5), error_rate=0.5))
        for i in range(40)
    ]
    await stack.publish(incident)
    # Live runs through the worker client: one succeeds, the report job fails. No heartbeat
    # falls inside these short runs: a cancel arriving during one can be swallowed by nats-py
    # and leave the client's heartbeat task running (reported to the batch client's owner).
    assert await demo.live_run(stack.nc, "price-sync", seconds=0.4, heartbeat_s=30) == "succeeded"
    failed = await demo.live_run(stack.nc, demo.FAILING_JOB, fail=True, seconds=0.4, heartbeat_s=30)
    assert failed == "failed"
    await demo.stuck_lock(stack.nc, ttl_s=1.0)


async def test_live_data_alerts_and_lock_release(
    env: dict[str, str], tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    async with running_stack(env, postgres_url=postgres_url, redis_url=redis_url) as stack:
        require_routes(
            stack.app,
            "/api/v1/usage/stats",
            "/api/v1/batch/executions/recent",
            "/api/v1/health/comprehensive",
            "/api/v1/alerts/stream",
        )
        await _seed(stack)
        async with chromium_page(tmp_path / "profile") as page:
            errors = watch_errors(page)
            await page.goto(f"{stack.url}/?refresh_ms=1000")

            # Components: a tile per dependency, probed for real.
            for name in ("database", "redis", "openai", "external.quotes", "external.fx"):
                await expect(page.get_by_test_id(f"component-{name}")).to_be_visible(
                    timeout=WAIT_MS
                )
            await expect(page.get_by_test_id("component-database")).to_have_attribute(
                "data-status", "healthy", timeout=WAIT_MS
            )

            # The README screenshot: the demo's data as an operator sees it.
            lock = page.locator(f'[data-testid=lock-row][data-job-id="{demo.STUCK_JOB}"]')
            await expect(lock).to_have_attribute("data-expired", "true", timeout=WAIT_MS)
            await expect(page.locator('[data-alert-id^="usage.error_rate"]')).to_be_visible(
                timeout=WAIT_MS
            )
            # The headline with its reasons open: what an operator reads first.
            headline = page.get_by_test_id("overall-status")
            await expect(headline).not_to_have_attribute("data-status", "healthy")
            await headline.click()
            await expect(page.get_by_test_id("status-reason").first).to_be_visible(timeout=WAIT_MS)
            if os.environ.get("STOCKPILOT_UPDATE_SCREENSHOT") == "1":
                await _screenshot(page, SCREENSHOT)
            shot = tmp_path / "dashboard.png"
            await _screenshot(page, shot)
            assert shot.stat().st_size > 50_000
            await headline.click()  # closed again: the panels below are clicked next
            await page.mouse.move(0, 900)

            # Usage published now shows up: the request count and a new endpoint.
            async with httpx.AsyncClient(base_url=stack.url) as client:
                before = (await client.get("/api/v1/usage/stats")).json()["total_requests"]
                rng = random.Random()
                calls: list[tuple[str, Event]] = [
                    (
                        demo.USAGE_SUBJECT,
                        msgspec.structs.replace(
                            demo.usage_event(rng, utc_now(), error_rate=0.0),
                            endpoint="/api/v1/dash-test",
                        ),
                    )
                    for _ in range(7)
                ]
                await stack.publish(calls)
                await expect(page.get_by_test_id("kpi-requests")).to_have_text(
                    f"{before + 7:,}", timeout=WAIT_MS
                )
                await expect(
                    page.get_by_test_id("top-endpoints").locator('[data-key="/api/v1/dash-test"]')
                ).to_contain_text("7 calls")

                # A batch execution published now appears with its numbers.
                execution_id, events = finished_run("price-sync", failed=True)
                await stack.publish(events)
                row = page.locator(f'[data-execution-id="{execution_id}"]')
                await expect(row).to_have_attribute("data-status", "failed", timeout=WAIT_MS)
                await expect(row).to_contain_text("15/s")
                await expect(row).to_contain_text("512 MB")

                # An alert published now appears in the live feed.
                alert = Alert(
                    id=f"batch.job_failed:test:{uuid.uuid4().hex[:8]}",
                    occurred_at=utc_now(),
                    source="batch",
                    kind="batch.job_failed",
                    severity="critical",
                    title="Dashboard test alert",
                    message="price-sync failed: upstream closed the connection",
                    metric="failed_runs",
                    value=1.0,
                    threshold=1.0,
                )
                await stack.publish([(alert.subject, alert)])
                item = page.locator(f'[data-alert-id="{alert.id}"]')
                await expect(item).to_contain_text("Dashboard test alert", timeout=WAIT_MS)
                await expect(item).to_have_attribute("data-severity", "critical")

                # The expired lock is highlighted; releasing it needs the admin token.
                await expect(lock).to_have_attribute("data-expired", "true")
                message = page.get_by_test_id("lock-message")
                for token, status in (("", "401"), ("not-the-token", "403")):
                    await lock.get_by_test_id("lock-release").click()
                    await page.get_by_test_id("token-input").fill(token)
                    await page.get_by_test_id("token-submit").click()
                    await expect(message).to_have_attribute("data-kind", "error")
                    await expect(message).to_contain_text(f"refused ({status})")
                    status_now = (
                        await client.get(f"/api/v1/batch/jobs/{demo.STUCK_JOB}/lock/status")
                    ).json()
                    assert status_now["expired"] is True
                await expect(lock).to_be_visible()

                await lock.get_by_test_id("lock-release").click()
                await page.get_by_test_id("token-input").fill(ADMIN_TOKEN)
                await page.get_by_test_id("token-submit").click()
                await expect(message).to_have_attribute("data-kind", "ok", timeout=WAIT_MS)
                await expect(message).to_contain_text("released")
                await expect(lock).to_have_count(0, timeout=WAIT_MS)
                status_now = (
                    await client.get(f"/api/v1/batch/jobs/{demo.STUCK_JOB}/lock/status")
                ).json()
                assert status_now["locked"] is False and status_now["expired"] is False
            assert errors == []


async def _screenshot(page: Any, path: Path) -> None:
    """The whole page once its charts have drawn (the live feed may keep moving)."""
    await expect(page.get_by_test_id("panel-costchart").locator("svg")).to_be_visible(
        timeout=WAIT_MS
    )
    await page.evaluate("window.scrollTo(0, 0)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    await page.screenshot(path=str(tmp), full_page=True)
    shutil.move(tmp, path)


async def test_stopped_usage_service_greys_out_its_panels_only(
    env: dict[str, str], tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    async with running_stack(env, postgres_url=postgres_url, redis_url=redis_url) as stack:
        require_routes(stack.app, "/api/v1/usage/stats", "/api/v1/batch/executions/recent")
        await _seed(stack)
        async with chromium_page(tmp_path / "profile") as page:
            errors = watch_errors(page)
            await page.goto(f"{stack.url}/?refresh_ms=700")
            for panel in ("cost", "requests", "executions", "components"):
                await expect(page.get_by_test_id(f"panel-{panel}")).to_have_attribute(
                    "data-state", "ok", timeout=WAIT_MS
                )
            requests = await page.get_by_test_id("kpi-requests").inner_text()
            assert requests not in ("–", "0")

            await stack.stop_service("usage")

            await expect(page.get_by_test_id("service-usage")).to_have_attribute(
                "data-status", "unavailable", timeout=WAIT_MS
            )
            for panel in ("cost", "costchart", "requests", "top", "latency"):
                locator = page.get_by_test_id(f"panel-{panel}")
                await expect(locator).to_have_attribute(
                    "data-state", "unavailable", timeout=WAIT_MS
                )
                await expect(locator.locator(".panel-error")).to_contain_text("Usage service")
            # The last numbers stay on screen, greyed out, instead of vanishing.
            await expect(page.get_by_test_id("kpi-requests")).to_have_text(requests)
            await expect(page.get_by_test_id("overall-status")).not_to_have_attribute(
                "data-status", "healthy"
            )

            # The rest keeps working: batch data published now still appears.
            execution_id, events = finished_run("news-ingest")
            await stack.publish(events)
            await expect(page.locator(f'[data-execution-id="{execution_id}"]')).to_be_visible(
                timeout=WAIT_MS
            )
            for panel in ("executions", "jobs", "locks", "components"):
                await expect(page.get_by_test_id(f"panel-{panel}")).to_have_attribute(
                    "data-state", "ok"
                )
            await expect(page.get_by_test_id("service-batch")).to_have_attribute(
                "data-status", "up"
            )

            # Korean labels, remembered across a reload.
            await page.get_by_test_id("lang-toggle").click()
            await expect(page.get_by_test_id("panel-executions").locator("h2")).to_have_text(
                "최근 배치 실행"
            )
            await page.reload()
            await expect(page.get_by_test_id("panel-executions").locator("h2")).to_have_text(
                "최근 배치 실행"
            )
            await expect(page.get_by_test_id("panel-cost").locator(".panel-error")).to_contain_text(
                "사용량 서비스", timeout=WAIT_MS
            )
            assert errors == []
