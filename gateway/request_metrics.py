"""Per-route request counts and latency histograms (`stockpilot_gateway_*`), for every request.

A pure ASGI wrapper around the whole application, in place of Litestar's Prometheus
middleware: that one builds a `Request` and a label dict and looks up four metric children
on every request, and measured as most of the gateway's per-request cost on its hottest
routes (docs/profiles/gateway-status-after-81ff654.txt). Here the label children are looked
up once per (method, route, status) and each request costs two clock reads and two updates.

Requests are labelled by route template (`/api/v1/batch/jobs/{job_id:str}/lock/status`, not
every job id); a path no route matched is labelled `unmatched` so scanners cannot grow the
label set. `/metrics` and `/static` are not counted.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from gateway.asgi import ASGIApp, Message, Receive, Scope, Send

PREFIX = "stockpilot_gateway"
APP_NAME = "stockpilot_gateway"
EXCLUDED_PREFIXES = ("/metrics", "/static")
UNMATCHED = "unmatched"


class _Families:
    """The four metric families, created once per process in the global registry."""

    def __init__(self) -> None:
        labels = ["method", "path", "status_code", "app_name"]
        self.requests = Counter(f"{PREFIX}_requests_total", "Total requests", labels)
        self.errors = Counter(f"{PREFIX}_requests_error_total", "Total errors in requests", labels)
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds", "Request duration, in seconds", labels
        )
        self.in_progress = Gauge(
            f"{PREFIX}_requests_in_progress",
            "Requests currently in progress",
            ["method", "app_name"],
            multiprocess_mode="livesum",
        )


_families: _Families | None = None


def _shared_families() -> _Families:
    # Several apps in one process (tests) share the families: the registry refuses a name twice.
    global _families
    if _families is None:
        _families = _Families()
    return _families


class RequestMetrics:
    """ASGI wrapper counting and timing every HTTP request by route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.families = _shared_families()
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any | None]] = {}
        self._in_progress: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(EXCLUDED_PREFIXES):
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        status = 500  # what the server answers when the app raises before responding
        finished: float | None = None

        async def timed_send(message: Message) -> None:
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finished = time.perf_counter()
            await send(message)

        in_progress = self._in_progress.get(method)
        if in_progress is None:
            in_progress = self._in_progress[method] = self.families.in_progress.labels(
                method, APP_NAME
            )
        in_progress.inc()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, timed_send)
        finally:
            in_progress.dec()
            template: str = scope.get("path_template", UNMATCHED)
            elapsed = (finished if finished is not None else time.perf_counter()) - started
            self._observe(method, template, status, elapsed)

    def _observe(self, method: str, template: str, status: int, seconds: float) -> None:
        key = (method, template, status)
        children = self._children.get(key)
        if children is None:
            values = (method, template, str(status), APP_NAME)
            children = (
                self.families.requests.labels(*values),
                self.families.duration.labels(*values),
                self.families.errors.labels(*values) if status >= 500 else None,
            )
            self._children[key] = children
        requests, duration, errors = children
        requests.inc()
        duration.observe(seconds)
        if errors is not None:
            errors.inc()
