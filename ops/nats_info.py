"""`stockpilot nats-info`: how an outside program reaches the running stack's NATS.

Without `--role`: the URL, the roles an outside program may connect as and what each may
do, and where their passwords are (no password is printed). With `--role ROLE` (CONTRACT
§2): that role's URL, user, password and permissions, checked by logging in as it, and
written for programs under the data dir (0600): `clients/<role>.env` (NATS_URL, NATS_USER,
NATS_PASSWORD, what the `nats` CLI and the Node.js example read) and a `nats` CLI context,
`clients/stockpilot-<role>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from ops import locate, nats_auth
from shared.connection import inbox_prefix
from shared.settings import (
    CREDENTIALS_FILE,
    CommonSettings,
    find_data_dir,
    no_stack_message,
    settings_or_exit,
)

ROLES = tuple(nats_auth.OUTSIDE_ROLES)
LOGIN_TIMEOUT_S = 5.0


class NatsInfoSettings(CommonSettings, frozen=True, kw_only=True):
    """The common settings, and the roles' passwords of a NATS of one's own (compose's
    STOCKPILOT_NATS_<ROLE>_PASSWORD); the embedded server's are in the data dir."""

    __env_names__: ClassVar[dict[str, str]] = {
        f"{role}_password": nats_auth.password_variable(role) for role in ROLES
    }

    observer_password: str | None = None
    producer_password: str | None = None
    ops_password: str | None = None


class RoleInfo(msgspec.Struct, kw_only=True):
    """One role as an outside program uses it."""

    role: str
    user: str
    inbox_prefix: str
    may: str
    publish: list[str]
    subscribe: list[str]
    password: str | None = None


class NatsInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What `nats-info` prints (`--json`)."""

    url: str
    source: str
    passwords: str
    roles: list[RoleInfo]
    data_dir: str | None = None
    env_file: str | None = None
    context_file: str | None = None


class Stack(msgspec.Struct, kw_only=True):
    """Where the stack's NATS is and where its roles' passwords come from."""

    servers: list[str]  # without credentials
    source: str
    data_dir: Path | None  # the embedded server's, None for STOCKPILOT_NATS_URL
    passwords: dict[str, str]
    passwords_from: str


def _plain(url: str) -> str:
    """A server URL without its credentials (the user and password are given apart)."""
    host, port = locate.addresses([url])[0]
    scheme = url.partition("://")[0] if "://" in url else "nats"
    return f"{scheme}://{host}:{port}"


def find_stack(settings: NatsInfoSettings) -> Stack:
    """The stack's NATS and its roles' passwords, or StackError."""
    if settings.nats_url:
        servers = locate.servers_or_raise(settings)
        passwords = {
            role: value
            for role in ROLES
            if (value := getattr(settings, f"{role}_password")) is not None
        }
        return Stack(
            servers=[_plain(url) for url in servers],
            source="STOCKPILOT_NATS_URL",
            data_dir=None,
            passwords=passwords,
            passwords_from="the environment variables "
            + ", ".join(nats_auth.password_variable(role) for role in ROLES)
            + " (compose: its .env)",
        )
    data_dir = find_data_dir(settings.data_dir)
    if data_dir is None:
        raise locate.StackError(no_stack_message(settings.data_dir))
    servers = locate.servers_or_raise(settings)
    credentials = data_dir / CREDENTIALS_FILE
    return Stack(
        servers=[_plain(url) for url in servers],
        source=settings.nats_source,
        data_dir=data_dir,
        passwords=nats_auth.kept_passwords(data_dir),
        passwords_from=f"{credentials} (0600, readable by its owner only)",
    )


def role_info(role: str, password: str | None = None) -> RoleInfo:
    """A role's user, inbox prefix and permissions (ops.nats_auth decides them)."""
    block = nats_auth.permissions(role)
    return RoleInfo(
        role=role,
        user=role,
        inbox_prefix=inbox_prefix(role),
        may=nats_auth.OUTSIDE_ROLES[role],
        publish=list(block["publish"]["allow"]),
        subscribe=list(block["subscribe"]["allow"]),
        password=password,
    )


async def _can_log_in(settings: CommonSettings, stack: Stack, role: str, password: str) -> None:
    """StackError unless the role's credentials open a connection."""
    as_role = msgspec.structs.replace(
        settings, nats_url=",".join(stack.servers), nats_user=role, nats_password=password
    )
    try:
        async with locate.connected(as_role, f"stockpilot-nats-info-{role}", stockpilot_only=False):
            pass
    except locate.StackError:
        raise locate.StackError(
            f"the NATS at {','.join(stack.servers)} ({stack.source}) refuses the {role} "
            f"password from {stack.passwords_from}: is it the stack that wrote them?"
        ) from None


def clients_dir(stack: Stack, settings: CommonSettings) -> Path:
    """Where the role files go: `clients/` under the stack's data dir (or this shell's)."""
    return (stack.data_dir or Path(settings.data_dir).absolute()) / "clients"


def write_client_files(directory: Path, info: RoleInfo, url: str) -> tuple[Path, Path]:
    """The role's env file and `nats` CLI context under `directory` (0700, files 0600)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    env_file = directory / f"{info.role}.env"
    nats_auth.write_private(
        env_file,
        "# Written by `stockpilot nats-info --role "
        f"{info.role}`: `set -a; . {env_file}; set +a`\n"
        f"NATS_URL={url}\nNATS_USER={info.user}\nNATS_PASSWORD={info.password}\n"
        f"NATS_INBOX_PREFIX={info.inbox_prefix}\n",
    )
    context_file = directory / f"stockpilot-{info.role}.json"
    context = {
        "description": f"StockPilot Ops, role {info.role}",
        "url": url,
        "user": info.user,
        "password": info.password,
        "inbox_prefix": info.inbox_prefix,
    }
    nats_auth.write_private(context_file, json.dumps(context, indent=2) + "\n")
    return env_file, context_file


async def nats_info(settings: NatsInfoSettings, role: str | None) -> NatsInfo:
    """The answer of `nats-info` (files written for `role`), or StackError."""
    stack = find_stack(settings)
    url = ",".join(stack.servers)
    await locate.require_running(settings, locate.servers_or_raise(settings))
    if role is None:
        return NatsInfo(
            url=url,
            source=stack.source,
            passwords=stack.passwords_from,
            roles=[role_info(r) for r in ROLES],
            data_dir=str(stack.data_dir) if stack.data_dir else None,
        )
    password = stack.passwords.get(role)
    if password is None:
        raise locate.StackError(
            f"the {role} password of the NATS at {url} is not known here: it comes from "
            f"{stack.passwords_from}"
            + (
                f"; set {nats_auth.password_variable(role)}"
                if stack.data_dir is None
                else "; start the stack once with `stockpilot up` to create it"
            )
        )
    await _can_log_in(settings, stack, role, password)
    info = role_info(role, password)
    env_file, context_file = await asyncio.to_thread(
        write_client_files, clients_dir(stack, settings), info, url
    )
    return NatsInfo(
        url=url,
        source=stack.source,
        passwords=stack.passwords_from,
        roles=[info],
        data_dir=str(stack.data_dir) if stack.data_dir else None,
        env_file=str(env_file),
        context_file=str(context_file),
    )


def render(info: NatsInfo) -> str:
    """`nats-info` for people."""
    lines = [f"StockPilot NATS: {info.url}  ({info.source})"]
    if info.data_dir is not None:
        lines.append(
            "Its port and the roles' passwords stay the same across `stockpilot up` restarts."
        )
    if info.env_file is None:
        width = max(len(r.role) for r in info.roles)
        lines += ["", "Connect as one of these roles (user = the role's name):", ""]
        lines += [f"  {r.role:<{width}}  may {r.may}" for r in info.roles]
        lines += [
            "",
            "Each role must use its own reply inboxes: inbox prefix _INBOX.<role> "
            "(nats-py: inbox_prefix=; nats CLI: --inbox-prefix).",
            f"Passwords: {info.passwords}.",
            "`stockpilot nats-info --role ROLE` prints one role's password and writes a file "
            "of NATS_* variables and a nats CLI context for it.",
        ]
        return "\n".join(lines) + "\n"
    role = info.roles[0]
    lines += [
        "",
        f"user:          {role.user}",
        f"password:      {role.password}",
        f"inbox prefix:  {role.inbox_prefix}",
        f"may:           {role.may}",
        "               (--json lists the exact publish and subscribe permissions)",
        "",
        f"NATS_* file:   {info.env_file}",
        f"               (NATS_URL, NATS_USER, NATS_PASSWORD: `set -a; . {info.env_file}; set +a`)",
        f"nats context:  {info.context_file}",
        "               (copy it to ~/.config/nats/context/, then "
        f"`nats --context stockpilot-{role.role} ...`)",
    ]
    return "\n".join(lines) + "\n"


def _command(args: argparse.Namespace) -> int:
    settings = settings_or_exit(NatsInfoSettings)
    try:
        info = asyncio.run(nats_info(settings, args.role))
    except locate.StackError as exc:
        print(f"stockpilot: {exc}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(msgspec.json.encode(info).decode() + "\n")
    else:
        sys.stdout.write(render(info))
    return 0


def register(subparsers: Any) -> None:
    """Add `nats-info`."""
    parser = subparsers.add_parser(
        "nats-info",
        help="how an outside program connects to the running stack's NATS",
        description=(
            "Print how an outside program reaches the running stack's NATS "
            "(STOCKPILOT_NATS_URL, or the embedded server recorded under STOCKPILOT_DATA_DIR): "
            "the URL, the roles it may connect as and what each may do, and where their "
            "passwords are. No password is printed unless --role asks for one: then that "
            "role's user and password (checked by logging in as it) and its permissions, "
            "and it writes DATA_DIR/clients/ROLE.env (NATS_URL, NATS_USER, NATS_PASSWORD) "
            "and a nats CLI context DATA_DIR/clients/stockpilot-ROLE.json, both 0600."
        ),
    )
    parser.add_argument(
        "--role",
        choices=ROLES,
        help="print this role's credentials and write its files (observer: readers and "
        "alert subscribers; producer: StockPilot AI's code; ops: operators)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.set_defaults(handler=_command)
