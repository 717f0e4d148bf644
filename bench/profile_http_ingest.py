"""Profile HTTP ingest: the usage service and the gateway as processes, one under cProfile.

`python -m bench.profile_http_ingest [--records N] [--prefill N] [--profile usage|gateway|none]
[--out FILE]` starts a nats-server, publishes `--prefill` events (bench.usage_ingest's week of
calls, as `make bench` leaves the stream before bench.http_ingest runs), spawns the usage
service and the gateway (`python -m ops ...`, the one named by --profile under cProfile),
posts N records as lists of 1,000, IN_FLIGHT at a time (bench.http_ingest), prints the rate
and each process's CPU, then the profiled process's cProfile table (own time and cumulative)
and writes it to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats
import psutil

from bench.harness import ROOT
from bench.http_ingest import IN_FLIGHT, TOKEN, bodies, post_all
from bench.stack import wait_folded
from bench.usage_ingest import events
from services.usage.contract import SUBJECT_RECORDED
from shared.streams import provision
from tests.harness import NatsServer, free_port, stop_process, wait_for_port


async def prefill(url: str, count: int) -> int:
    """`count` events in the usage stream; its last sequence."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await provision(js)
    encode = msgspec.json.Encoder().encode
    for event in events(count, prefix="prefill"):
        await js.publish_async(SUBJECT_RECORDED, encode(event), headers={"Nats-Msg-Id": event.id})
    await js.publish_async_completed()
    last = int((await js.stream_info("STOCKPILOT_USAGE")).state.last_seq)
    await nc.close()
    return last


def spawn(
    name: str, env: dict[str, str], profile: Path | None, logs: Path
) -> subprocess.Popen[bytes]:
    args = [name] if name == "gateway" else ["service", name]
    prefix = ["-m", "cProfile", "-o", str(profile)] if profile else []
    log = open(logs / f"{name}.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, *prefix, "-m", "ops", *args],
        env=os.environ | env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="stockpilot-profile-") as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            last = await prefill(server.url, args.prefill) if args.prefill else 0
            port = free_port()
            env = {
                "STOCKPILOT_NATS_URL": server.url,
                "STOCKPILOT_DATA_DIR": tmp,
                "STOCKPILOT_HTTP_PORT": str(port),
                "STOCKPILOT_LOG_LEVEL": "WARNING",
                "STOCKPILOT_INGEST_TOKEN": TOKEN,
                "STOCKPILOT_TZ": "UTC",
            }
            prof = Path(tmp) / "process.prof"
            logs = Path(args.logs or tmp)
            logs.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (before the clock starts)
            children = {
                name: spawn(name, env, prof if args.profile == name else None, logs)
                for name in ("usage", "gateway")
            }
            try:
                wait_for_port("127.0.0.1", port, timeout=60)
                nc = await nats.connect(server.url)
                await wait_folded(nc, last, 600)
                await nc.close()
                base = f"http://127.0.0.1:{port}"
                await post_all(base, bodies(1000, "warm"), 1)
                posts = bodies(args.records, "profiled")
                procs = {n: psutil.Process(c.pid) for n, c in children.items()}
                me = psutil.Process()
                procs["nats-server"] = next(
                    c for c in me.children(recursive=True) if c.name().startswith("nats-server")
                )
                procs["client"] = me
                before = {n: sum(p.cpu_times()[:2]) for n, p in procs.items()}
                started = time.perf_counter()
                await post_all(base, posts, IN_FLIGHT)
                elapsed = time.perf_counter() - started
                busy = {n: (sum(p.cpu_times()[:2]) - before[n]) / elapsed for n, p in procs.items()}
                print(
                    f"{args.records:,} records in {elapsed:.2f} s: {args.records / elapsed:,.0f} "
                    f"records/s; " + ", ".join(f"{n} {b:.0%} of a core" for n, b in busy.items())
                )
            finally:
                for child in children.values():
                    stop_process(child, timeout=30)
            if args.profile != "none":
                report(prof, args.out)
        finally:
            server.stop()


def report(prof: Path, out_path: str) -> None:
    """The cProfile table (own time, then cumulative), printed and written to `out_path`."""
    out = io.StringIO()
    stats = pstats.Stats(str(prof), stream=out)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)
    text = out.getvalue()
    print(text)
    if out_path:
        Path(out_path).write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_http_ingest")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--prefill", type=int, default=0)
    parser.add_argument("--profile", choices=("usage", "gateway", "none"), default="usage")
    parser.add_argument("--out", default="")
    parser.add_argument("--logs", default="", help="where the processes log (default: gone)")
    asyncio.run(main_async(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
