"""The usage service as its own process: its replay, then its CPU per event while it folds
what the usage client records. What an A/B of a fold change is measured with.

`python -m bench.profile_usage_live [--stored N] [--recorded N] [--py-spy FILE]` starts a
nats-server, publishes N events (default 1,000,000; `bench.ceilings.sample_usage`, what
`bench.usage_stream` publishes), spawns the usage service (`python -m ops service usage`,
as `stockpilot up` runs it) and times its replay from spawn to ready, then records
--recorded events (default 300,000) with the usage client (`UsageRecorder`) and prints the
rate until the service folded the last, each process's share of a core while they were
published, and the usage process's CPU per event recorded. With --py-spy, py-spy (not a
project dependency: `pip install py-spy` somewhere on PATH) samples the usage process during
the recording (or, with --recorded 0, during the replay), writes its raw stacks to FILE and
prints the functions with the most samples.

The machine is shared: compare versions by alternating runs, and read the usage CPU per
event rather than the rates (bench/EXPLANATIONS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import nats
import psutil

from bench.ceilings import sample_usage
from bench.profile_http_ingest import spawn
from bench.stack import wait_folded
from bench.usage_stream import STREAM, _cpu, publish, record
from shared.streams import provision
from tests.harness import NatsServer, free_port, stop_process


def _sampler(pid: int, out: str | None) -> subprocess.Popen[bytes] | None:
    """py-spy attached to `pid`, writing raw stacks to `out` (None without --py-spy)."""
    if not out:
        return None
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--py-spy needs py-spy on PATH (pip install py-spy)")
    command = [spy, "record", "-r", "250", "--format", "raw", "-o", out, "-p", str(pid)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_sampler(sampler: subprocess.Popen[bytes] | None, out: str) -> None:
    if sampler is not None:
        sampler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        sampler.wait(timeout=60)
        print(by_function(Path(out).read_text()))


def by_function(raw: str, top: int = 30) -> str:
    """py-spy's raw stacks (`frame;frame;... count` a line) as the functions with the most
    samples: their own, then with what they call (% of all samples)."""
    own: Counter[str] = Counter()
    within: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        # "function (path/file.py:line)" -> "function file.py"
        frames = [
            f"{f.split(' (')[0]} {f.rsplit('/', 1)[-1].split(':')[0]}" for f in stack.split(";")
        ]
        own[frames[-1]] += samples
        for frame in set(frames):
            within[frame] += samples
    lines = [f"# {total:,} samples; own time:"]
    lines += [f"{100 * n / total:6.1f} %  {name}" for name, n in own.most_common(top)]
    lines += ["# with what they call:"]
    lines += [f"{100 * n / total:6.1f} %  {name}" for name, n in within.most_common(top)]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="stockpilot-live-") as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        child: subprocess.Popen[bytes] | None = None
        try:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await provision(js)
            started = time.perf_counter()
            await publish(js, 0, args.stored)
            last = int((await js.stream_info(STREAM)).state.last_seq)
            print(f"stored {args.stored:,} events in {time.perf_counter() - started:.1f} s")

            env = {
                "STOCKPILOT_NATS_URL": server.url,
                "STOCKPILOT_DATA_DIR": tmp,
                "STOCKPILOT_HTTP_PORT": str(free_port()),
                "STOCKPILOT_LOG_LEVEL": "WARNING",
                "STOCKPILOT_TZ": "UTC",
            }
            started = time.perf_counter()
            child = spawn("usage", env, None, Path(tmp))  # as `stockpilot up` runs it
            sampler = _sampler(child.pid, args.py_spy) if not args.recorded else None
            await wait_folded(nc, last, timeout=900, interval=0.05)
            _stop_sampler(sampler, args.py_spy)
            elapsed = time.perf_counter() - started
            print(f"replay of {last:,} events from spawn: {elapsed:.1f} s, {last / elapsed:,.0f}/s")
            if not args.recorded:
                return

            events = [sample_usage(i, "recorded") for i in range(args.recorded)]
            usage, me = psutil.Process(child.pid), psutil.Process()
            nats_server = next(
                c for c in me.children(recursive=True) if c.name().startswith("nats-server")
            )
            sampler = _sampler(child.pid, args.py_spy)
            before = {p: _cpu(p) for p in (usage, me, nats_server)}
            started = time.perf_counter()
            await record(nc, events)
            published = time.perf_counter() - started
            share = {p: (_cpu(p) - before[p]) / published for p in before}
            await wait_folded(nc, int((await js.stream_info(STREAM)).state.last_seq), 900, 0.01)
            elapsed = time.perf_counter() - started
            usage_cpu = _cpu(usage) - before[usage]
            _stop_sampler(sampler, args.py_spy)
            print(
                f"recorded {args.recorded:,} events, folded in {elapsed:.1f} s: "
                f"{args.recorded / elapsed:,.0f}/s; usage CPU {usage_cpu / args.recorded * 1e6:.1f}"
                f" us an event; while publishing ({published:.1f} s) usage {share[usage]:.0%}, "
                f"publisher {share[me]:.0%}, nats-server {share[nats_server]:.0%} of a core"
            )
            await nc.close()
        finally:
            if child is not None:
                stop_process(child, timeout=60)
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile_usage_live",
        description="The usage service's replay and its CPU per event while following ingest.",
    )
    parser.add_argument("--stored", type=int, default=1_000_000, help="events stored first")
    parser.add_argument("--recorded", type=int, default=300_000, help="events then recorded")
    parser.add_argument("--py-spy", default="", help="write py-spy raw stacks to this file")
    asyncio.run(main_async(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
