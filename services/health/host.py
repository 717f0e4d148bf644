"""The health service's host, sampled with psutil once per round."""

from __future__ import annotations

import os
import time

import msgspec
import psutil


class HostMetrics(msgspec.Struct, kw_only=True):
    """CPU, memory and disk use of this host, and how long it has been up."""

    cpu_percent: float
    memory_percent: float
    disk_percent: float
    uptime_s: float


def sample_host(path: str) -> HostMetrics:
    """Sample the host with psutil (CPU since the previous sample; disk of `path`'s volume)."""
    disk_path = path if os.path.exists(path) else os.path.abspath(os.sep)
    return HostMetrics(
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        memory_percent=float(psutil.virtual_memory().percent),
        disk_percent=float(psutil.disk_usage(disk_path).percent),
        uptime_s=round(time.time() - psutil.boot_time(), 1),
    )
