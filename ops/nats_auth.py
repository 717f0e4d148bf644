"""NATS roles: one user per process kind, each allowed exactly the subjects its job needs.

Why one module of over 300 lines: it is the single source of truth for NATS permissions (see
below), so every role and both renderings of it (`generate`, `compose_config`) stay in one
place where a reviewer can see who may do what.

The single source of truth for who may do what on NATS (CONTRACT §4, docs/operations.md
"Security model"). `stockpilot up` writes the embedded server's config from it with fresh
passwords (`generate`); compose.yaml's servers read deploy/nats.conf, which is the same users
rendered with passwords taken from the environment (`compose_config`; a test checks the
shipped file equals it).

- `producer` — StockPilot AI's code: publish `stockpilot.usage.recorded` and the batch run and
  lock subjects, read the last event of a lock subject, and receive the answers (PubAcks) to
  those publishes on its own inboxes. Nothing else.
- `observer` — outside readers: the four streams through their own ephemeral consumers, and
  core subscriptions to `stockpilot.alerts.>`.
- `health`, `usage`, `batch` — one per service: publish their own events, alerts, dead letters
  and change notices; read their own stream and the alerts stream; their own snapshot bucket
  and KV keys; answer only `stockpilot.svc.<service>.*` and their own `$SRV` discovery.
- `gateway` — ask the services, follow the alerts stream for SSE, read the hooks' status key,
  and read STOCKPILOT_USAGE's and the account's info (whether usage events can be stored).
- `hooks` — its durable consumers on STOCKPILOT_ALERTS, its status key, its marks bucket.
- `ops` — the operator tools: the only user that may create, update or delete streams,
  consumers and buckets.

Subjects are named exactly: no user gets `>` or `$JS.API.>`. Every user's reply inboxes are
`_INBOX.<user>.…` (shared.connection.inbox_prefix), so nobody can read another's answers. A
consumer's name is a single subject token, so the hooks' durable consumers are protected by
name from everyone else (deny), whatever wildcard a role's own consumers need.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from ops.hook_runner import consumer_name
from shared.change_notices import changed_subject
from shared.connection import inbox_prefix
from shared.endpoints import endpoint_subject, micro_name
from shared.hook_status import STATUS_KEY
from shared.streams import HOOK_MARKS_BUCKET, SERVICES, STATE_BUCKET, STREAMS, snapshot_bucket

EVENT_STREAMS = [spec.name for spec in STREAMS.values()]
ALERTS = STREAMS["alerts"].name
BATCH = STREAMS["batch"].name
USAGE = STREAMS["usage"].name
ROLES = ("producer", "observer", *SERVICES, "gateway", "hooks", "ops")
# The hooks' durable consumers (ops.hooks builds at most these three hooks).
HOOK_NAMES = ("webhook", "slack", "log")
HOOK_CONSUMERS = tuple(consumer_name(hook) for hook in HOOK_NAMES)
# The KV keys of the shared state bucket, by owner (services.health.service.ROUND_KEY).
STATE_KEYS = {"health": ("health.round",), "hooks": (STATUS_KEY,)}


def _inbox(user: str) -> str:
    return f"{inbox_prefix(user)}.>"


def _stream_info(stream: str) -> list[str]:
    return [f"$JS.API.STREAM.INFO.{stream}"]


def _read_stream(stream: str) -> list[str]:
    """Read a stream: its info, single messages, and ephemeral consumers of one's own.

    `CONSUMER.CREATE.<stream>` without a name creates only ephemeral consumers (the server
    refuses a durable name there), so nobody can take over a named consumer through it.
    """
    return [
        *_stream_info(stream),
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.FC.{stream}.>",
        f"$JS.ACK.{stream}.>",
    ]


def _drop_own_consumers(stream: str) -> list[str]:
    """Delete the ephemeral consumers one made (the hooks' are denied to all but hooks)."""
    return [f"$JS.API.CONSUMER.DELETE.{stream}.*"]


def _kv_keys(bucket: str, keys: tuple[str, ...]) -> list[str]:
    """Read and write some keys of a KV bucket.

    A get goes to `STREAM.MSG.GET` (the key in its body, so any key of the bucket can be
    read: nothing in these buckets is secret) or, on a bucket with direct gets, to the key's
    own `DIRECT.GET` subject; a write is a publish to the key's own subject.
    """
    stream = f"KV_{bucket}"
    return [
        *_stream_info(stream),
        f"$JS.API.STREAM.MSG.GET.{stream}",
        *(f"$KV.{bucket}.{key}" for key in keys),
        *(f"$JS.API.DIRECT.GET.{stream}.$KV.{bucket}.{key}" for key in keys),
    ]


def _kv_bucket(bucket: str) -> list[str]:
    """Read and write every key of a KV bucket (not purge or delete the bucket)."""
    stream = f"KV_{bucket}"
    return [
        *_stream_info(stream),
        f"$KV.{bucket}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
    ]


def _object_store(bucket: str) -> list[str]:
    """Own an object store: put (which purges the replaced chunks), get, delete."""
    stream = f"OBJ_{bucket}"
    return [
        f"$O.{bucket}.>",
        # nats-py's get finds the bucket's stream by the chunk subject (stream names only).
        "$JS.API.STREAM.NAMES",
        *_read_stream(stream),
        *_drop_own_consumers(stream),
        f"$JS.API.STREAM.PURGE.{stream}",
    ]


def _hooks_consumers() -> list[str]:
    """Everything about the hooks' named durable consumers (fetch, ack, create, info, delete)."""
    subjects: list[str] = []
    for name in HOOK_CONSUMERS:
        subjects += [
            f"$JS.API.CONSUMER.*.{ALERTS}.{name}",
            f"$JS.API.CONSUMER.*.{ALERTS}.{name}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{ALERTS}.{name}",
            f"$JS.API.CONSUMER.MSG.NEXT.{ALERTS}.{name}",
            f"$JS.ACK.{ALERTS}.{name}.>",
        ]
    return subjects


def _service(name: str) -> tuple[list[str], list[str]]:
    """What one service publishes and subscribes to."""
    own = STREAMS[name].name
    publish = [
        f"stockpilot.{name}.>",
        f"stockpilot.alerts.{name}.>",
        f"stockpilot.deadletter.{name}",
        changed_subject(name),
        *_read_stream(own),
        *_drop_own_consumers(own),
        *_read_stream(ALERTS),  # its alert ledger
        *_drop_own_consumers(ALERTS),
        *_object_store(snapshot_bucket(name)),
        *_kv_keys(STATE_BUCKET, STATE_KEYS.get(name, ())),
    ]
    micro = micro_name(name)
    subscribe = [
        _inbox(name),
        endpoint_subject(name, "*"),
        # nats.micro discovery: $SRV.<verb>, $SRV.<verb>.<name>, $SRV.<verb>.<name>.<id>.
        *(f"$SRV.{verb}" for verb in ("PING", "INFO", "STATS")),
        *(f"$SRV.{verb}.{micro}" for verb in ("PING", "INFO", "STATS")),
        *(f"$SRV.{verb}.{micro}.*" for verb in ("PING", "INFO", "STATS")),
    ]
    return publish, subscribe


def _roles() -> dict[str, tuple[list[str], list[str]]]:
    roles: dict[str, tuple[list[str], list[str]]] = {
        "producer": (
            [
                "stockpilot.usage.recorded",
                "stockpilot.batch.run.*",
                "stockpilot.batch.lock.*",
                # The batch client folds every event of a lock subject by the one lock rule
                # (services.batch.locks: batched direct gets, `next_by_subj` the lock subject),
                # which the server only answers on the stream's plain DIRECT.GET subject: so
                # the producer may read single STOCKPILOT_BATCH messages (the batch events
                # producers write), still no stream info, consumer, KV or object store.
                f"$JS.API.DIRECT.GET.{BATCH}",
                f"$JS.API.DIRECT.GET.{BATCH}.stockpilot.batch.lock.*",
            ],
            [_inbox("producer")],
        ),
        "observer": (
            [
                "$JS.API.STREAM.NAMES",  # a subscribe without the stream's name looks it up
                *(subject for stream in EVENT_STREAMS for subject in _read_stream(stream)),
            ],
            [_inbox("observer"), "stockpilot.alerts.>"],
        ),
        "gateway": (
            [
                *(endpoint_subject(service, "*") for service in SERVICES),
                *_read_stream(ALERTS),  # the SSE alert stream
                *_drop_own_consumers(ALERTS),
                # /ready and /status: whether STOCKPILOT_USAGE takes writes (its info and
                # the account's storage).
                *_stream_info(USAGE),
                "$JS.API.INFO",
                # The hooks' status key, read only.
                *_kv_keys(STATE_BUCKET, ()),
                f"$JS.API.DIRECT.GET.KV_{STATE_BUCKET}.$KV.{STATE_BUCKET}.{STATUS_KEY}",
            ],
            [_inbox("gateway"), changed_subject("*")],
        ),
        "hooks": (
            [
                "stockpilot.deadletter.hooks",
                *_stream_info(ALERTS),
                *_hooks_consumers(),
                *_kv_keys(STATE_BUCKET, STATE_KEYS["hooks"]),
                *_kv_bucket(HOOK_MARKS_BUCKET),
            ],
            [_inbox("hooks")],
        ),
        "ops": (
            [
                "stockpilot.>",
                "$JS.API.INFO",
                "$JS.API.STREAM.>",
                "$JS.API.CONSUMER.>",
                "$JS.API.DIRECT.GET.>",
                "$JS.ACK.>",
                "$JS.FC.>",
                "$KV.>",
                "$O.>",
                "$SRV.>",
            ],
            [_inbox("ops"), "stockpilot.>"],
        ),
    }
    for service in SERVICES:
        roles[service] = _service(service)
    return roles


ROLE_SUBJECTS = _roles()

# The roles an outside program connects as (`stockpilot nats-info --role`), and what each
# may do, said for people; the subjects themselves are ROLE_SUBJECTS.
OUTSIDE_ROLES: dict[str, str] = {
    "observer": (
        "read the four streams (STOCKPILOT_USAGE, _HEALTH, _BATCH, _ALERTS) through its own "
        "ephemeral consumers, and subscribe to stockpilot.alerts.>; nothing else "
        "(dashboards, exporters, alert subscribers)"
    ),
    "producer": (
        "publish stockpilot.usage.recorded, stockpilot.batch.run.<job_id> and "
        "stockpilot.batch.lock.<job_id>, read a lock subject's last event, and receive "
        "the JetStream answers to its publishes; nothing else (StockPilot AI's code)"
    ),
    "ops": (
        "read and publish every stockpilot.> subject and administer the streams, consumers "
        "and buckets (backups, restores), but never answer the services' requests (the "
        "operator's tools)"
    ),
}


def permissions(user: str) -> dict[str, Any]:
    """The nats-server permissions block of one user."""
    publish, subscribe = ROLE_SUBJECTS[user]
    block: dict[str, Any] = {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}
    if user not in ("hooks", "ops"):
        # The hooks' delivery state is theirs: no other user may fetch, ack, change or
        # delete their durable consumers (the wildcards above would otherwise reach them).
        block["publish"]["deny"] = _hooks_consumers()
    if user == "ops":
        # The operator may follow any event subject, never take the services' requests.
        block["subscribe"]["deny"] = ["stockpilot.svc.>"]
    if user in SERVICES:
        # Only a service answers requests: one reply per request, to the requester's inbox.
        block["allow_responses"] = True
    return block


def users(passwords: dict[str, str]) -> list[dict[str, Any]]:
    """The `authorization.users` list for these passwords (one per role)."""
    return [
        {"user": user, "password": passwords[user], "permissions": permissions(user)}
        for user in ROLES
    ]


def credentials_file(data_dir: Path) -> Path:
    """Where the embedded server's per-role passwords are kept (0600)."""
    return data_dir / "credentials.json"


def kept_passwords(data_dir: Path) -> dict[str, str]:
    """The passwords of the last start, for the roles that still exist (CONTRACT §2: an
    outside program configured once keeps working across restarts of `stockpilot up`)."""
    try:
        kept = json.loads(credentials_file(data_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(kept, dict):
        return {}
    return {
        user: password
        for user, password in kept.items()
        if user in ROLES and isinstance(password, str) and len(password) >= 16
    }


def generate(data_dir: Path, port: int) -> tuple[Path, dict[str, str]]:
    """Write the embedded server's config and the credentials file (both 0600); the config
    path and the passwords (those of the last start, a new random one for a role without)."""
    kept = kept_passwords(data_dir)
    passwords = {user: kept.get(user) or secrets.token_urlsafe(24) for user in ROLES}
    store = data_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    # nats-server's config format accepts JSON.
    config = {
        "listen": f"127.0.0.1:{port}",
        "server_name": "stockpilot-embedded",
        "jetstream": {"store_dir": str(store)},
        "authorization": {"users": users(passwords)},
    }
    config_path = data_dir / "nats-server.conf"
    write_private(config_path, json.dumps(config, indent=2))
    write_private(credentials_file(data_dir), json.dumps(passwords, indent=2))
    return config_path, passwords


def password_variable(user: str) -> str:
    """The environment variable compose passes a role's password in."""
    return f"STOCKPILOT_NATS_{user.upper()}_PASSWORD"


COMPOSE_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "nats.conf"


def compose_config() -> str:
    """deploy/nats.conf: the same users, each password read from its environment variable
    (`$STOCKPILOT_NATS_<ROLE>_PASSWORD`, resolved by nats-server when it starts)."""
    # JSON with the passwords as bare `$VARIABLE` references, which nats-server's config
    # parser resolves from the environment (a quoted "$X" would be taken literally).
    marker = "@@VARIABLE@@"
    text = json.dumps(
        {"authorization": {"users": users({u: marker + password_variable(u) for u in ROLES})}},
        indent=2,
    )
    text = text.replace(f'"{marker}', "$").replace('_PASSWORD"', "_PASSWORD")
    return (
        "# Generated from ops/nats_auth.py (the NATS roles' single source of truth): do not\n"
        "# edit by hand; `python -m ops.nats_auth > deploy/nats.conf` writes it again.\n"
        "# Each password comes from the environment variable named beside it.\n" + text + "\n"
    )


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


if __name__ == "__main__":
    print(compose_config(), end="")
