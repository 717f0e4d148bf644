"""`stockpilot hooks`: the process that delivers every alert to the configured hooks.

Hooks come from settings: a JSON webhook (STOCKPILOT_ALERT_WEBHOOK_URL, signed with
STOCKPILOT_ALERT_WEBHOOK_SECRET when set), a Slack-compatible webhook
(STOCKPILOT_SLACK_WEBHOOK_URL) and the log (STOCKPILOT_ALERT_LOG, on by default). The delivery
logic lives in `ops.hook_delivery` (the hooks) and `ops.hook_runner` (the delivery).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import msgspec

from ops.hook_delivery import AlertHook, LogHook, SlackHook, WebhookHook
from ops.hook_runner import HookRunner, RetryPolicy
from shared.connection import connect_unless_stopped, drain_or_close
from shared.settings import (
    CommonSettings,
    PositiveFloat,
    PositiveInt,
    SettingsError,
    require_nats,
    settings_or_exit,
    strip_whitespace,
)
from shared.streams import (
    HOOK_BACKFILL_MAX_S,
    HOOK_MARKS_BUCKET,
    STATE_BUCKET,
    STREAMS,
    NotProvisionedError,
    provision_or_check,
)

log = logging.getLogger("stockpilot.hooks")


class HookSettings(CommonSettings, frozen=True, kw_only=True):
    """Which hooks run and how hard they retry."""

    alert_webhook_url: str | None = None
    alert_webhook_secret: str | None = None
    slack_webhook_url: str | None = None
    alert_log: bool = True
    # Seconds an HTTP hook waits for the receiver per attempt.
    hook_timeout_s: PositiveFloat = 10.0
    # Exponential back-off between attempts at one alert: first wait, longest wait.
    hook_retry_initial_s: PositiveFloat = 0.5
    hook_retry_max_s: PositiveFloat = 60.0
    # Attempts at one alert before it is parked on stockpilot.deadletter.hooks and the hook
    # goes on with the next one (with the defaults, about 4 minutes of retrying).
    hook_max_attempts: PositiveInt = 10
    # A hook seen for the first time starts with the alerts of this many seconds back (at
    # most 30 days: its delivery marks, which keep it from repeating one, expire after 35).
    hook_backfill_s: Annotated[float, msgspec.Meta(ge=0, le=HOOK_BACKFILL_MAX_S)] = 86_400.0

    def __post_init__(self) -> None:
        super().__post_init__()
        # A trailing newline (a secret file) would make every delivery fail (shared.settings).
        strip_whitespace(self, "alert_webhook_url", "alert_webhook_secret", "slack_webhook_url")
        for variable, url in (
            ("STOCKPILOT_ALERT_WEBHOOK_URL", self.alert_webhook_url),
            ("STOCKPILOT_SLACK_WEBHOOK_URL", self.slack_webhook_url),
        ):
            if url is not None and not url.startswith(("http://", "https://")):
                # The URL itself is not shown: Slack-style URLs carry their token.
                raise SettingsError(f"{variable}: expected an http:// or https:// URL")
        if self.alert_webhook_secret is not None and self.alert_webhook_url is None:
            raise SettingsError(
                "STOCKPILOT_ALERT_WEBHOOK_SECRET is set but STOCKPILOT_ALERT_WEBHOOK_URL is not"
            )

    @property
    def retry(self) -> RetryPolicy:
        """The back-off policy these settings describe."""
        return RetryPolicy(
            initial_s=self.hook_retry_initial_s,
            max_s=self.hook_retry_max_s,
            max_attempts=self.hook_max_attempts,
        )


def build_hooks(settings: HookSettings, client: httpx.AsyncClient) -> list[AlertHook]:
    """The hooks these settings configure, in a stable order."""
    hooks: list[AlertHook] = []
    if settings.alert_webhook_url:
        hooks.append(
            WebhookHook(
                settings.alert_webhook_url, secret=settings.alert_webhook_secret, client=client
            )
        )
    if settings.slack_webhook_url:
        hooks.append(SlackHook(settings.slack_webhook_url, client=client))
    if settings.alert_log:
        hooks.append(LogHook())
    return hooks


@contextlib.asynccontextmanager
async def http_client(settings: HookSettings) -> AsyncIterator[httpx.AsyncClient]:
    """The one HTTP client the hooks share."""
    async with httpx.AsyncClient(
        timeout=settings.hook_timeout_s,
        headers={"User-Agent": "stockpilot-hooks"},
        follow_redirects=False,
    ) as client:
        yield client


async def run_hooks(settings: HookSettings, stop: asyncio.Event | None = None) -> int:
    """Run the hook process until `stop` (or a signal); 1 if NATS closed for good, 70 if a
    delivery or status loop failed (shared.supervise)."""
    stop = stop or asyncio.Event()
    closed_for_good = False

    async def on_closed() -> None:
        nonlocal closed_for_good
        if not stop.is_set():
            log.error("NATS connection closed for good; exiting")
            closed_for_good = True
            stop.set()

    nc = await connect_unless_stopped(stop, settings, "stockpilot-hooks", on_closed=on_closed)
    if nc is None:
        return 0
    runner: HookRunner | None = None
    try:
        js = nc.jetstream()
        try:
            await provision_or_check(
                js,
                settings,
                (
                    STREAMS["alerts"].name,
                    f"KV_{STATE_BUCKET}",
                    f"KV_{HOOK_MARKS_BUCKET}",
                ),
            )
        except NotProvisionedError as exc:
            log.error("hooks: %s", exc)
            return 1
        async with http_client(settings) as client:
            hooks = build_hooks(settings, client)
            if not hooks:
                log.warning("no hook configured: alerts are not delivered anywhere")
            runner = HookRunner(
                js,
                hooks,
                retry=settings.retry,
                backfill_s=settings.hook_backfill_s,
                stop=stop,
                nc=nc,
            )
            await runner.run()
    finally:
        # After the runner stopped (STOP_TIMEOUT_S), the drain or close takes 4 s at most:
        # whatever a hook or NATS does, a SIGTERM ends the process within 8 s, well inside a
        # supervisor's grace period (~1 s idle).
        await drain_or_close(nc)
    status = 1 if closed_for_good else 0
    return runner.supervisor.exit_status(status) if runner is not None else status


async def _main(settings: HookSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return await run_hooks(settings, stop)


def _command(args: argparse.Namespace) -> int:
    from shared.logs import configure_logging

    settings = settings_or_exit(HookSettings)
    require_nats(settings)
    configure_logging("hooks", settings.log_level)
    # httpx logs every request with its URL at INFO; webhook URLs often carry a token.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return asyncio.run(_main(settings))


def register(subparsers: Any) -> None:
    """Add `stockpilot hooks`."""
    parser = subparsers.add_parser(
        "hooks",
        help="deliver alerts to webhooks, Slack and the log",
        description=(
            "Follow STOCKPILOT_ALERTS and deliver every alert to each configured hook: a JSON "
            "webhook (STOCKPILOT_ALERT_WEBHOOK_URL, HMAC-SHA256-signed in X-StockPilot-Signature "
            "when STOCKPILOT_ALERT_WEBHOOK_SECRET is set), a Slack-compatible webhook "
            "(STOCKPILOT_SLACK_WEBHOOK_URL) and the log (STOCKPILOT_ALERT_LOG, default true). "
            "At least once, with an idempotency key (the alert id, in Idempotency-Key): "
            "exponential back-off, and an alert a hook still cannot deliver after "
            "STOCKPILOT_HOOK_MAX_ATTEMPTS tries is parked on stockpilot.deadletter.hooks with "
            "the reason while delivery goes on. A crash between a receiver's 2xx and the "
            "delivery mark can repeat that one alert. Runs until SIGINT/SIGTERM."
        ),
    )
    parser.set_defaults(handler=_command)
