"""The scheduled-jobs panel (issue #18) in real headless Chromium: each job's state, its
schedule, its last run and its next expected start, in English and Korean, within its panel.

The schedules have been in force for three hours: the test stores their `batch.job_scheduled`
events dated then (as the batch service would have), and the batch service, started after,
finds them equal to its STOCKPILOT_JOB_SCHEDULES and stores nothing new.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ops import demo
from services.batch.contract import (
    BatchFinished,
    BatchStarted,
    JobScheduled,
    run_subject,
    schedule_subject,
)
from shared.events import Event, utc_now
from tests.dashboard.harness import chromium_page, running_stack
from tests.dashboard.test_status_headline import STEADY, check_layout

WAIT_MS = 20_000
H = timedelta(hours=1)


def expect(target: Any) -> Any:
    """Playwright's auto-retrying assertions (imported late: the browser part may skip)."""
    from playwright.async_api import expect as playwright_expect

    return playwright_expect(target)


def run(
    job_id: str, started: datetime, status: str | None, *, error: str | None = None
) -> list[tuple[str, Event]]:
    """One run of `job_id` as contract events: started, and finished unless `status` is None."""
    execution_id = f"test-{uuid.uuid4().hex[:10]}"
    events: list[tuple[str, Event]] = [
        (
            run_subject(job_id),
            BatchStarted(
                id=f"{execution_id}.started",
                occurred_at=started,
                execution_id=execution_id,
                job_id=job_id,
                host="batch-1",
                pid=4242,
                heartbeat_interval_s=3600.0,
            ),
        )
    ]
    if status is not None:
        events.append(
            (
                run_subject(job_id),
                BatchFinished(
                    id=f"{execution_id}.finished",
                    occurred_at=started + timedelta(seconds=30),
                    execution_id=execution_id,
                    job_id=job_id,
                    status="failed" if status == "failed" else "succeeded",
                    items_processed=10,
                    duration_s=30.0,
                    throughput_per_s=0.3,
                    peak_memory_mb=100.0,
                    avg_cpu_percent=20.0,
                    error=error,
                ),
            )
        )
    return events


async def test_jobs_panel_shows_each_jobs_state_schedule_and_next_expected_start(
    env: dict[str, str], tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    now = utc_now()
    # A daily cron two hours from now (to the minute): "new", expected in 2 hours.
    nightly_at = (now + 2 * H).replace(second=0, microsecond=0)
    hourly = {"every_s": 3600, "grace_s": 600}
    schedules: dict[str, dict[str, Any]] = {
        "price-sync": hourly,
        "report-generation": hourly,
        "news-ingest": hourly,
        "nightly-report": {"cron": f"{nightly_at.minute} {nightly_at.hour} * * *", "grace_s": 1800},
    }
    since = now - 3 * H
    stored: list[tuple[str, Event]] = [
        (
            schedule_subject(job_id),
            JobScheduled(
                id=f"schedule.{job_id}.test",
                occurred_at=since,
                job_id=job_id,
                cron=spec.get("cron"),
                every_s=spec.get("every_s"),
                grace_s=spec["grace_s"],
                tz="UTC",
            ),
        )
        for job_id, spec in schedules.items()
    ]
    stored += run("price-sync", now - H / 3, "succeeded")  # on time: up
    stored += run("news-ingest", now - H / 6, "failed", error="upstream closed")  # failing
    stored += run("portfolio-rebalance", now - timedelta(minutes=1), None)  # running, unscheduled
    # report-generation never ran: its slots 2 h and 1 h ago are missed.
    env = {**env, "STOCKPILOT_JOB_SCHEDULES": json.dumps(schedules)}
    async with running_stack(
        env,
        postgres_url=postgres_url,
        redis_url=redis_url,
        apis=list(STEADY),
        services=("usage",),
    ) as stack:
        await demo.publish_all(stack.nc.jetstream(), stored)
        await stack.start_service("batch")
        info = await stack.nc.jetstream().stream_info(
            "STOCKPILOT_BATCH", subjects_filter="stockpilot.batch.schedule.>"
        )
        assert sum((info.state.subjects or {}).values()) == 4  # the service stored none anew
        async with chromium_page(tmp_path / "profile", width=1440) as page:
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{stack.url}/?refresh_ms=500")
            panel = page.get_by_test_id("panel-schedules")
            await expect(panel).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
            rows = panel.get_by_test_id("schedule-row")
            await expect(rows).to_have_count(5, timeout=WAIT_MS)
            # Missed first, then failing, running, new and up.
            states = {
                "report-generation": "missed",
                "news-ingest": "failing",
                "portfolio-rebalance": "running",
                "nightly-report": "new",
                "price-sync": "up",
            }
            assert [await r.get_attribute("data-job-id") for r in await rows.all()] == list(states)
            for job_id, job_state in states.items():
                row = panel.locator(f'[data-testid=schedule-row][data-job-id="{job_id}"]')
                await expect(row).to_have_attribute("data-state", job_state)
            missed = panel.locator('[data-testid=schedule-row][data-job-id="report-generation"]')
            await expect(missed.locator(".badge").first).to_have_text("Missed")
            await expect(missed.get_by_test_id("schedule-next")).to_contain_text("2 missed")
            await expect(missed).to_contain_text("every 1 h 0 m")
            await expect(missed).to_contain_text("never ran")
            nightly = panel.locator('[data-testid=schedule-row][data-job-id="nightly-report"]')
            await expect(nightly).to_contain_text(
                f"cron {nightly_at.minute} {nightly_at.hour} * * *"
            )
            await expect(nightly.get_by_test_id("schedule-next")).to_contain_text("in 2 hours")
            failing = panel.locator('[data-testid=schedule-row][data-job-id="news-ingest"]')
            await expect(failing).to_contain_text("Failed")  # its last run's badge
            unscheduled = panel.locator(
                '[data-testid=schedule-row][data-job-id="portfolio-rebalance"]'
            )
            await expect(unscheduled).to_contain_text("Not scheduled")
            await check_layout(page)

            await page.get_by_test_id("lang-toggle").click()
            await expect(panel.locator("h2")).to_have_text("예약된 작업")
            await expect(missed.locator(".badge").first).to_have_text("놓침")
            await expect(missed.get_by_test_id("schedule-next")).to_contain_text("2회 놓침")
            await expect(missed).to_contain_text("실행 기록 없음")
            # The batch.job_missed alerts, said in Korean from their kind and params.
            alert = page.locator('[data-testid=alert-item][data-kind="batch.job_missed"]')
            await expect(alert.first).to_contain_text(
                "배치 작업 report-generation이(가) 시작되지 않음", timeout=WAIT_MS
            )
            await check_layout(page)
            assert errors == []
