"""`python -m bench` (`make bench`): ceilings, then every benchmark module, then BENCHMARKS.md.

Options: --runs N (default 3), --quick (smaller counts, shorter HTTP runs; for a smoke
check), --only NAME[,NAME] (benchmark modules to run).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import ceilings
from bench.harness import ROOT, Report, log, write_report
from tests.harness import NatsServer

MODULES = (
    "usage_ingest",
    "http_ingest",
    "usage_stream",
    "health",
    "batch",
    "gateway",
    "freshness",
    "alert_latency",
    "sse_fanout",
    "cluster",
    "spend_log",
)


@dataclass
class BenchContext:
    """What a benchmark module gets."""

    nats_url: str
    runs: int
    quick: bool
    workdir: Path
    http_seconds: int

    def count(self, full: int) -> int:
        """An event count, smaller with --quick."""
        return max(1000, full // 20) if self.quick else full


async def main_async(args: argparse.Namespace) -> int:
    started = time.monotonic()
    report = Report()
    only = set(args.only.split(",")) if args.only else set(MODULES)
    with tempfile.TemporaryDirectory(prefix="stockpilot-bench-") as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            ctx = BenchContext(server.url, args.runs, args.quick, Path(tmp), 3 if args.quick else 8)
            await ceilings.measure(
                report, server.url, args.runs, ctx.count(200_000), ctx.http_seconds
            )
            for name in MODULES:
                if name not in only:
                    continue
                try:
                    module = importlib.import_module(f"bench.{name}")
                except ImportError as exc:
                    log(f"skipping {name}: {exc}")
                    continue
                log(f"== {name}")
                await module.run(report, ctx)
        finally:
            server.stop()
    out = Path(args.output)
    write_report(report, out, args.runs, time.monotonic() - started)
    log(f"wrote {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--quick", action="store_true", help="small counts, short HTTP runs")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {MODULES}")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
