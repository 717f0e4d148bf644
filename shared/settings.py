"""Settings: frozen structs built once from the environment (and an optional stockpilot.toml).

Every process reads its settings here and nowhere else. Each field `foo_bar` of a settings
struct is read from `STOCKPILOT_FOO_BAR` unless the struct names another variable in
`__env_names__` (OPENAI_API_KEY, for instance). The environment wins over the TOML file.
A bad value stops the process with one line naming the variable.
"""

from __future__ import annotations

import contextlib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from shared import redact

PREFIX = "STOCKPILOT_"
CONFIG_FILE_VARIABLE = "STOCKPILOT_CONFIG"
DEFAULT_CONFIG_FILE = "stockpilot.toml"

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable."""


class NoStackError(SettingsError):
    """Neither STOCKPILOT_NATS_URL nor the data dir names a StockPilot NATS."""


# What `stockpilot up` keeps under the data dir for everyone else to find its NATS (written
# by ops.embedded_nats and ops.nats_auth, all 0600): the URL with the operator's
# credentials, the client port, and the per-role passwords.
NATS_URL_FILE = "nats.url"
NATS_PORT_FILE = "nats.port"
CREDENTIALS_FILE = "credentials.json"
# The role the ops tools connect as (the only one that may read every stream and subject).
OPERATOR_ROLE = "ops"


def recorded_nats_url(data_dir: Path) -> str | None:
    """The embedded server's URL with the operator's credentials, as `stockpilot up`
    recorded it under `data_dir` (its kept port and passwords), or None."""
    with contextlib.suppress(OSError, ValueError):
        port = int((data_dir / NATS_PORT_FILE).read_text(encoding="utf-8").strip())
        passwords = json.loads((data_dir / CREDENTIALS_FILE).read_text(encoding="utf-8"))
        password = passwords.get(OPERATOR_ROLE) if isinstance(passwords, dict) else None
        if 0 < port < 65536 and isinstance(password, str) and password:
            return f"nats://{OPERATOR_ROLE}:{quote(password, safe='')}@127.0.0.1:{port}"
    with contextlib.suppress(OSError):
        url = (data_dir / NATS_URL_FILE).read_text(encoding="utf-8").strip()
        if url:
            return url
    return None


def find_data_dir(data_dir: str) -> Path | None:
    """The data dir holding a recorded embedded server: `data_dir` itself or, when it is a
    relative path (the default `./.data`), the same path under the nearest parent folder
    that has one, so the ops commands work from any folder of the checkout."""
    path = Path(data_dir).expanduser()
    if recorded_nats_url(path) is not None:
        return path.absolute()
    if path.is_absolute():
        return None
    for parent in Path.cwd().parents:
        candidate = parent / path
        if recorded_nats_url(candidate) is not None:
            return candidate
    return None


def no_stack_message(data_dir: str) -> str:
    """The one line said when no StockPilot NATS is configured or recorded."""
    return (
        "no StockPilot stack found: STOCKPILOT_NATS_URL is not set and no embedded NATS is "
        f"recorded in {Path(data_dir).expanduser().absolute()} (nats.port, credentials.json); "
        "start one with `stockpilot up`, or set STOCKPILOT_DATA_DIR to the running stack's "
        "data dir or STOCKPILOT_NATS_URL to its NATS"
    )


class CommonSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What every StockPilot Ops process needs: where NATS is and how days are counted."""

    __env_names__: ClassVar[dict[str, str]] = {}

    nats_url: str | None = None
    data_dir: str = "./.data"
    tz: str = "UTC"
    log_level: str = "INFO"
    # The embedded server's client port; 0 picks a free one (see ops.embedded_nats).
    nats_port: Port = 0
    # Optional NATS credentials for this process (user/password, see docs/operations.md).
    nats_user: str | None = None
    nats_password: str | None = None
    # How often a service snapshots its projection: every N events or T seconds, and on exit.
    snapshot_every_events: PositiveInt = 50_000
    snapshot_every_s: PositiveFloat = 30.0
    # Streams are created with this many replicas (3 on a NATS cluster).
    stream_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    # STOCKPILOT_NATS_ACCELERATOR: projection reads and usage publishes over our own NATS
    # protocol code where it works ("on"), or over nats-py only ("off"); shared.transport.
    nats_accelerator: Literal["on", "off"] = "on"

    def __post_init__(self) -> None:
        strip_whitespace(self, "nats_password")
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise SettingsError(f"STOCKPILOT_TZ: unknown time zone {self.tz!r}") from None
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(
                "STOCKPILOT_LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR, "
                f"got {self.log_level!r}"
            )

    @property
    def zone(self) -> ZoneInfo:
        """The time zone days and months are counted in."""
        return ZoneInfo(self.tz)

    @property
    def nats_servers(self) -> list[str]:
        """The NATS URLs to connect to (a cluster is comma-separated): STOCKPILOT_NATS_URL,
        or the embedded server `stockpilot up` recorded under the data dir.

        Never a guess: a NATS that happens to answer at 127.0.0.1:4222 is not StockPilot's
        (CONTRACT §2), so with neither this raises NoStackError, whose message says what to
        set or run.
        """
        if self.nats_url:
            return [u.strip() for u in self.nats_url.split(",") if u.strip()]
        found = find_data_dir(self.data_dir)
        url = recorded_nats_url(found) if found is not None else None
        if url is None:
            raise NoStackError(no_stack_message(self.data_dir))
        return [url]

    @property
    def nats_source(self) -> str:
        """Where `nats_servers` comes from, for messages: the variable or the data dir."""
        if self.nats_url:
            return "STOCKPILOT_NATS_URL"
        found = find_data_dir(self.data_dir)
        shown = found if found is not None else Path(self.data_dir).absolute()
        return f"the embedded server recorded in {shown}"


S = TypeVar("S", bound=msgspec.Struct)


def strip_whitespace(settings: msgspec.Struct, *names: str) -> None:
    """Drop the surrounding whitespace of these optional string fields (in `__post_init__`).

    A secret read from a file (`$(cat key)`, a mounted Kubernetes secret) ends with a newline
    that is never meant: kept, a token would never match what clients send, a URL would be
    invalid, and the error saying so would quote the secret in an escaped form.
    """
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, str) and value != value.strip():
            msgspec.structs.force_setattr(settings, name, value.strip() or None)


def env_name(cls: type[msgspec.Struct], field: str) -> str:
    """The environment variable a settings field is read from."""
    names: dict[str, str] = getattr(cls, "__env_names__", {})
    return names.get(field, PREFIX + field.upper())


def _read_toml(env: Mapping[str, str]) -> dict[str, Any]:
    path = Path(env.get(CONFIG_FILE_VARIABLE, DEFAULT_CONFIG_FILE))
    if not path.exists():
        if CONFIG_FILE_VARIABLE in env:
            raise SettingsError(f"{CONFIG_FILE_VARIABLE}: no such file {str(path)!r}")
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML ({exc})") from None


def _is_structured(annotation: Any) -> bool:
    text = str(annotation)
    return any(marker in text for marker in ("list", "dict", "Struct", "tuple"))


def load_settings(cls: type[S], env: Mapping[str, str] | None = None) -> S:
    """Build `cls` from the environment and stockpilot.toml, or raise SettingsError."""
    env = os.environ if env is None else env
    file_values = _read_toml(env)
    values: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        variable = env_name(cls, field.name)
        raw: Any
        if variable in env:
            raw = env[variable]
            if raw == "" and field.default is None:
                continue  # an empty variable means unset
            if _is_structured(field.type):
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise SettingsError(f"{variable}: not valid JSON ({exc.msg})") from None
        elif field.name in file_values:
            raw = file_values[field.name]
        else:
            continue
        try:
            values[field.name] = msgspec.convert(raw, field.type, strict=False)
        except msgspec.ValidationError as exc:
            raise SettingsError(f"{variable}: {exc} (got {_shown(variable, raw)})") from None
    try:
        settings = msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(str(exc)) from None
    # Whatever a process loads as a secret, its logs must never show (shared.logs).
    redact.register_settings(settings)
    return settings


def _shown(variable: str, raw: Any) -> str:
    """The bad value for the error line, unless it may be a secret."""
    # Tokens, keys and passwords; URLs may carry a password; external API configs, headers.
    if any(
        word in variable
        for word in ("TOKEN", "KEY", "PASSWORD", "SECRET", "URL", "EXTERNAL_APIS", "PRICES")
    ):
        return "a value that is not shown because it may be a secret"
    return repr(raw)


def settings_or_exit(cls: type[S], env: Mapping[str, str] | None = None) -> S:
    """Load settings for an entry point; a bad value stops the process with one clear line."""
    import sys

    try:
        return load_settings(cls, env)
    except SettingsError as exc:
        print(f"stockpilot: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def require_nats(settings: CommonSettings) -> None:
    """For an entry point: stop with one line when no StockPilot NATS is configured or
    recorded (instead of a traceback from the first connection)."""
    import sys

    try:
        settings.nats_servers  # noqa: B018 (resolving it is the check)
    except SettingsError as exc:
        print(f"stockpilot: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
