"""Profile the usage fold in-process: decode + admit + apply + alerts, as the runtime folds.

`python -m bench.profile_usage_fold [--events N] [--out FILE] [--no-profile]` folds N
(default 300,000) synthetic `usage.recorded` events (the stream benchmarks' own events,
`bench.ceilings.sample_usage`) through the usage projection with their subject and a stored
time, like a replay of a freshly filled stream: every id in one 24-hour generation, so past
100,000 ids the de-duplication's Bloom part runs. Prints the CPU time per event without the
profiler (the best of --runs, default 3: CPU time, as the machine is shared), then (unless
--no-profile) the cProfile table sorted by own time, and writes it to FILE.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

from bench.ceilings import sample_usage
from services.usage.contract import SUBJECT_RECORDED
from services.usage.service import usage_projection
from services.usage.settings import UsageSettings
from shared.publish import encode_event

SUBJECT = SUBJECT_RECORDED.encode()


def stored_events(count: int) -> list[tuple[bytes, int]]:
    """`count` encoded events and their stream timestamps: 1 ms apart from a minute after
    the events' (fixed) occurred_at, so every run folds the same view."""
    first = sample_usage(0)
    start_ns = int(first.occurred_at.timestamp() + 60) * 1_000_000_000
    return [(encode_event(sample_usage(i)), start_ns + i * 1_000_000) for i in range(count)]


def fold_all(stored: list[tuple[bytes, int]]) -> str:
    """Fold every event into a fresh projection; the view's digest (to compare runs)."""
    from shared.projection import view_digest

    projection = usage_projection(_settings())
    for seq, (data, stored_ns) in enumerate(stored, start=1):
        projection.fold(seq, data, SUBJECT, stored_ns)
    return view_digest(projection.view)


def _settings() -> UsageSettings:
    # The bench's settings (bench.usage_ingest): a zone with no DST, no budgets.
    return UsageSettings(nats_url="nats://127.0.0.1:1", log_level="WARNING", tz="Asia/Seoul")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)

    stored = stored_events(args.events)
    elapsed = float("inf")
    for _ in range(args.runs):
        started = time.process_time()
        digest = fold_all(stored)
        elapsed = min(elapsed, time.process_time() - started)
    header = (
        f"# usage fold in-process (bench/profile_usage_fold.py), {args.events:,} events\n"
        f"# {elapsed * 1e6 / args.events:.2f} us/event of CPU without the profiler (best of "
        f"{args.runs}: {args.events / elapsed:,.0f} events/s); view digest {digest[:16]}\n"
    )
    print(header, end="")
    if args.no_profile:
        return 0
    profiler = cProfile.Profile()
    profiler.enable()
    fold_all(stored)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(30)
    text = header + out.getvalue()
    print(out.getvalue())
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
