"""The gateway logs through the handler every process installs (shared.logs)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from gateway.app import create_app
from gateway.settings import GatewaySettings
from shared import redact
from shared.logs import configure_logging

TOKEN = "gw-admin-Zr83kQ\n"


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """What configure_logging's handler writes (the root logger restored after)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    configure_logging("gateway", "INFO", stream=out)
    try:
        yield out
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_building_the_app_keeps_the_redacting_escaping_log_handler(lines: io.StringIO) -> None:
    """Litestar's default logging config would put its own root handler in place, through
    which the gateway's lines would show secrets and raw control characters."""
    handlers = logging.getLogger().handlers[:]
    create_app(GatewaySettings(admin_token=TOKEN))
    redact.register(TOKEN)
    assert logging.getLogger().handlers == handlers
    logging.getLogger("stockpilot.gateway").warning("token %s\x1b[31m", TOKEN.strip())
    written = lines.getvalue()
    assert TOKEN.strip() not in written
    assert "token ***\\x1b[31m" in written
