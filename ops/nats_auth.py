"""Per-process NATS credentials with subject permissions, for the embedded server.

`stockpilot up` writes a nats-server config with one user per process and fresh random
passwords on every start: a service may publish only its own subjects (its stream, its
alerts, its dead letters) plus the JetStream API it needs, and may not delete or purge the
event streams; the gateway may not publish events at all (it asks the services); the
`client` user is for StockPilot's own code (usage records, batch runs and locks); `ops` is
for the operator tools. docs/operations.md shows the same permissions for a cluster.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from shared.bus import STREAMS

EVENT_STREAMS = [spec.name for spec in STREAMS.values()]

# What every process needs to use JetStream as a client: the API (streams, consumers,
# direct gets), acks and flow-control replies of its consumers, the state buckets.
_JETSTREAM_CLIENT = [
    "$JS.API.>",
    "$JS.ACK.>",
    "$JS.FC.>",
    "$O.STOCKPILOT_SNAPSHOTS.>",
    "$KV.STOCKPILOT_STATE.>",
    "$KV.STOCKPILOT_HOOK_MARKS.>",
]
# Nobody but the operator may delete or purge the history.
_PROTECT_HISTORY = [
    *(f"$JS.API.STREAM.DELETE.{name}" for name in EVENT_STREAMS),
    *(f"$JS.API.STREAM.PURGE.{name}" for name in EVENT_STREAMS),
    *(f"$JS.API.STREAM.MSG.DELETE.{name}" for name in EVENT_STREAMS),
]


def _service(name: str) -> list[str]:
    return [
        f"stockpilot.{name}.>",
        f"stockpilot.alerts.{name}.>",
        f"stockpilot.deadletter.{name}",
        f"stockpilot.changed.{name}",
        *_JETSTREAM_CLIENT,
    ]


PUBLISH_ALLOW: dict[str, list[str]] = {
    "health": _service("health"),
    "usage": _service("usage"),
    "batch": _service("batch"),
    "gateway": ["stockpilot.svc.>", "$SRV.>", *_JETSTREAM_CLIENT],
    "hooks": ["stockpilot.deadletter.hooks", *_JETSTREAM_CLIENT],  # alerts it parks
    "client": ["stockpilot.usage.recorded", "stockpilot.batch.>", *_JETSTREAM_CLIENT],
    "ops": [">"],
}


def permissions(user: str) -> dict[str, object]:
    """The nats-server permissions block of one user."""
    publish: dict[str, list[str]] = {"allow": PUBLISH_ALLOW[user]}
    if user != "ops":
        publish["deny"] = _PROTECT_HISTORY
    return {
        "publish": publish,
        "subscribe": {"allow": [">"]},
        # Replies to requests (micro endpoints, pings) go to the requester's inbox.
        "allow_responses": True,
    }


def generate(data_dir: Path, port: int) -> tuple[Path, dict[str, str]]:
    """Write the server config and the credentials file; the config path and passwords."""
    passwords = {user: secrets.token_urlsafe(24) for user in PUBLISH_ALLOW}
    users = [
        {"user": user, "password": password, "permissions": permissions(user)}
        for user, password in passwords.items()
    ]
    store = data_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    # nats-server's config format accepts JSON.
    config = {
        "listen": f"127.0.0.1:{port}",
        "server_name": "stockpilot-embedded",
        "jetstream": {"store_dir": str(store)},
        "authorization": {"users": users},
    }
    config_path = data_dir / "nats-server.conf"
    write_private(config_path, json.dumps(config, indent=2))
    write_private(data_dir / "credentials.json", json.dumps(passwords, indent=2))
    return config_path, passwords


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)
