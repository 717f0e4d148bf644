"""The spend log on a big stream: how long one page of `GET /api/v1/usage/records` takes once
STOCKPILOT_USAGE holds 3M events (`--quick`: 150k).

Timed at the usage service's `records` endpoint (what the gateway forwards, one NATS request;
the service runs in its own thread and event loop here), for three pages:

- the first page (limit 50, no filter): the newest calls;
- a filtered page whose matches are rare: a user with no call at all, so the page reads its
  whole scan budget (SCAN_BUDGET events) and answers none, the slowest page there is;
- a page from a deep cursor: the middle of the stream, limit 50.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client as NATS

from bench.harness import Report, Result, log, repeat
from bench.usage_stream import STREAM, fill_to
from services.usage import spend_log
from services.usage.contract import SpendLog, SpendLogParams
from services.usage.service import build
from services.usage.settings import UsageSettings
from shared.streams import provision
from tests.harness import running_service

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(SpendLog).decode
# Event numbers of this module's fill, far from the other modules' (Msg-Ids must differ).
FIRST_ID = 50_000_000


async def page_ms(nc: NATS, params: SpendLogParams, expect_records: int | None) -> float:
    """One page through the service's endpoint: milliseconds."""
    started = time.perf_counter()
    msg = await nc.request("stockpilot.svc.usage.records", _encode(params), timeout=60)
    elapsed = (time.perf_counter() - started) * 1000
    headers = msg.headers or {}
    if headers.get("Nats-Service-Error-Code"):
        raise RuntimeError(f"records answered {headers}")
    page = _decode(msg.data)
    if expect_records is not None and len(page.records) != expect_records:
        raise RuntimeError(f"expected {expect_records} records, got {len(page.records)}")
    return elapsed


async def run(report: Report, ctx: object) -> None:
    """Fill the usage stream to 3M events, then time the three pages."""
    url: str = ctx.nats_url  # type: ignore[attr-defined]
    runs: int = ctx.runs  # type: ignore[attr-defined]
    workdir: Path = ctx.workdir  # type: ignore[attr-defined]
    target = ctx.count(3_000_000)  # type: ignore[attr-defined]
    nc = await nats.connect(url)
    js = nc.jetstream()
    await provision(js)
    log(f"spend log: filling {STREAM} to {target:,} events")
    await fill_to(js, target, FIRST_ID)
    info = await js.stream_info(STREAM)
    held = info.state.messages
    settings = UsageSettings(
        nats_url=url,
        data_dir=str(workdir / "spend-log"),
        log_level="WARNING",
        snapshot_every_events=10_000_000,
        snapshot_every_s=3600,
    )
    log(f"spend log: starting the usage service on {held:,} events")
    async with running_service(build(settings), settings, ready_timeout=3600):
        zone = settings.zone
        deep = SpendLogParams(limit=50)
        middle = info.state.first_seq + held // 2
        cursor = spend_log.encode_cursor(
            middle, spend_log.read_query(deep, zone), spend_log.cursor_key(info)
        )
        cases = (
            ("first page, limit 50, no filter", SpendLogParams(limit=50), 50),
            (
                f"a filtered page with no match (reads its whole budget, "
                f"{spend_log.SCAN_BUDGET:,} events)",
                SpendLogParams(limit=50, user_id="nobody"),
                0,
            ),
            (
                f"a page from a deep cursor (sequence {middle:,}), limit 50",
                SpendLogParams(limit=50, cursor=cursor),
                50,
            ),
        )
        for name, params, expect in cases:
            log(f"spend log: {name}")
            report.results.append(
                Result(
                    f"spend log page on {held:,} usage events: {name}",
                    await repeat(runs, page_ms, nc, params, expect),
                    "ms",
                    higher_is_better=False,
                    target="≤ 500 ms",
                    max_value=500.0,
                    note="the usage service's records endpoint, one NATS request; the "
                    "gateway adds its HTTP hop",
                )
            )
    await nc.close()
