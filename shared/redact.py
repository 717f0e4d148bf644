"""Keeping secrets out of everything StockPilot Ops shows: events, answers, alerts, logs.

Why one module of over 300 lines: it is one concern, keeping secrets out of text, from
finding them (URLs, DSNs, settings) to every shape they take and the registry the logs use;
split, a new shape or source of secret could be added in one place and missed in another.

One module for every process. A secret can reach text in many shapes: as configured, with
its trailing newline stripped, escaped by `repr` or JSON (`\\n` as two characters, quotes
escaped), percent-encoded in a URL, inside a URL (`postgresql://user:pass@host`) or a libpq
key/value DSN (`host=… password='a b'`). `Redactor` knows the secrets and replaces each of
them in every one of those shapes; the generic patterns below also hide credentials nobody
registered (a password in any URL or DSN, a Bearer token).

Settings feed the process-wide registry (`register_settings`, called by `load_settings`), and
the log handler of every process redacts with it (shared.logs).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit, urlunsplit

import msgspec

REDACTED = "***"
# Shorter values are not treated as secrets: replacing every "abc" in a log would hide more
# than it protects, and no real key, token or password is that short.
MIN_SECRET_LEN = 4

# Query parameters, DSN keys and setting names whose value is a secret.
_SECRET_WORDS = ("pass", "key", "token", "secret", "auth", "sig", "pwd")
_SETTING_WORDS = {"token", "key", "password", "passwd", "secret", "pwd"}
# Header values that are never secret: not registered, so logs that mention them stay legible.
_PLAIN_HEADERS = {
    "accept",
    "accept-encoding",
    "accept-language",
    "cache-control",
    "content-type",
    "user-agent",
}
_AUTH_SCHEMES = ("bearer", "basic", "token", "apikey", "api-key", "digest")

# ---------------------------------------------------------------- URLs and DSNs

# libpq key/value syntax: `key = value`, the value bare or single-quoted with \' and \\.
_CONNINFO_PAIR = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']*)", re.S)


def is_conninfo(dsn: str) -> bool:
    """Whether `dsn` is a libpq key/value DSN (`host=db user=app`) rather than a URL."""
    return "://" not in dsn and "=" in dsn


def parse_conninfo(dsn: str) -> dict[str, str]:
    """The pairs of a key/value DSN; ValueError (never quoting a value) when malformed."""
    pairs: dict[str, str] = {}
    position = 0
    text = dsn.strip()
    while position < len(text):
        match = _CONNINFO_PAIR.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(
                f"not a key=value DSN after {len(pairs)} pair(s) "
                "(write key=value pairs separated by spaces; quote values with '...')"
            )
        key, raw = match.group(1), match.group(2)
        if raw.startswith("'"):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1], flags=re.S)
        pairs[key] = raw
        position = match.end()
        while position < len(text) and text[position].isspace():
            position += 1
    return pairs


def _conninfo_value(value: str) -> str:
    if value and not any(c.isspace() or c in "'\\" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def redact_url(url: str) -> str:
    """The URL or key/value DSN without its password and secret-looking parameters."""
    if is_conninfo(url):
        try:
            pairs = parse_conninfo(url)
        except ValueError:
            return "<unparseable DSN>"
        return " ".join(
            f"{k}={REDACTED if _secret_name(k) else _conninfo_value(v)}" for k, v in pairs.items()
        )
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, address = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{address}" if ":" in userinfo else f"{user}@{address}"
    query = parts.query
    if query:
        pairs_q = parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{quote(k)}={REDACTED if _secret_name(k) else quote(v)}" for k, v in pairs_q
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def password_of(url: str) -> str | None:
    """The password inside a URL or key/value DSN, if any."""
    if is_conninfo(url):
        try:
            return parse_conninfo(url).get("password")
        except ValueError:
            return None
    try:
        return urlsplit(url.strip()).password
    except ValueError:
        return None


def hostport(url: str, default_port: int) -> str:
    """`host:port` of a URL or DSN (for errors that must not show the whole URL)."""
    try:
        if is_conninfo(url):
            pairs = parse_conninfo(url)
            return f"{pairs.get('host', '127.0.0.1')}:{pairs.get('port', default_port)}"
        parts = urlsplit(url.strip())
        return f"{parts.hostname or '127.0.0.1'}:{parts.port or default_port}"
    except ValueError:
        return "the configured address"


def dsn_secrets(url: str) -> set[str]:
    """The secrets inside a URL or DSN: its password, its secret-looking parameters."""
    found: set[str] = set()
    if is_conninfo(url):
        try:
            pairs = parse_conninfo(url)
        except ValueError:
            return {url}  # cannot tell what is secret in it: all of it is
        return {v for k, v in pairs.items() if _secret_name(k)}
    password = password_of(url)
    if password:
        # As written (`p%40ss`) and as the driver sends it, and may quote it back (`p@ss`).
        found |= {password, unquote(password)}
    try:
        query = urlsplit(url.strip()).query
    except ValueError:
        return {url}
    # Decoded by parse_qsl; the encoded shapes are among its forms.
    found.update(v for k, v in parse_qsl(query, keep_blank_values=True) if _secret_name(k))
    return found


# ---------------------------------------------------------------- the shapes of a secret


def _lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text)


_ESCAPERS: tuple[Callable[[str], str], ...] = (
    lambda s: repr(s)[1:-1],
    lambda s: s.encode("unicode_escape").decode("ascii"),
    lambda s: json.dumps(s)[1:-1],
    lambda s: json.dumps(s, ensure_ascii=False)[1:-1],
    lambda s: repr(s.encode("utf-8", "surrogatepass"))[2:-1],
    lambda s: s.replace("\\", "\\\\").replace("'", "\\'"),
    lambda s: s.replace("\\", "\\\\").replace('"', '\\"'),
)


def forms(secret: str) -> set[str]:
    """Every shape in which an error or an encoder may show `secret`."""
    cores = {secret, secret.strip(), "".join(secret.split())}
    shapes: set[str] = set()
    for core in cores:
        once = {escape(core) for escape in _ESCAPERS}
        # Escaped twice: the repr of an error that quoted a repr, then stored as JSON.
        twice = {escape(e) for e in once for escape in _ESCAPERS}
        shapes |= {core} | once | twice
        for encoded in (quote(core, safe=""), quote(core), quote_plus(core)):
            shapes |= {encoded, _lower_hex(encoded)}
    return {s for s in shapes if len(s) >= MIN_SECRET_LEN}


# Credentials that were never registered still look like credentials.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host (the user stays, it helps and is no secret)
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s/@:'\"]*:)[^\s@/'\"]+@"), rf"\1{REDACTED}@"),
    # password=… in a query string or a key/value DSN, quoted or not
    (
        re.compile(
            r"(?i)(?<![\w.-])((?:password|passwd|pwd|sslpassword|secret|client_secret|api_?key"
            r"|access_token|auth_token|token)\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&;,'\"]+)"
        ),
        rf"\1{REDACTED}",
    ),
    # "password": "…" in JSON text
    (
        re.compile(
            r'(?i)("(?:password|passwd|secret|client_secret|api_?key|access_token|auth_token'
            r'|token|authorization)"\s*:\s*)"(?:[^"\\]|\\.)*"'
        ),
        rf'\1"{REDACTED}"',
    ),
    # Authorization header values
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{4,}"), rf"\1 {REDACTED}"),
    # OpenAI-style keys
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), f"sk-{REDACTED}"),
)


class Redactor:
    """Replaces known secrets, in every form, and credential-shaped text by ***."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self.secrets = frozenset(s for s in secrets if s and len(s.strip()) >= MIN_SECRET_LEN)
        shapes = set().union(*(forms(s) for s in self.secrets)) if self.secrets else set()
        # Longest first: a secret's escaped form must go whole, not leave its `\n` behind.
        ordered = sorted(shapes, key=lambda s: (-len(s), s))
        self._known = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        """`text` without any secret."""
        if self._known is not None:
            text = self._known.sub(REDACTED, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def value(self, value: Any) -> Any:
        """A JSON-shaped value (dicts, lists, strings) with every string redacted."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value

    def __or__(self, other: Redactor) -> Redactor:
        return Redactor(self.secrets | other.secrets)


# ---------------------------------------------------------------- secrets of the settings


def _credential_parts(value: str) -> set[str]:
    """A header value and, for `Bearer xyz`, the credential alone."""
    parts = {value}
    scheme, _, rest = value.strip().partition(" ")
    if rest and scheme.lower() in _AUTH_SCHEMES:
        parts.add(rest.strip())
    return parts


def secrets_of(settings: msgspec.Struct) -> set[str]:
    """Every secret a settings struct holds, found by field name and shape.

    Fields named like a secret (…_token, …_key, …_password, …_secret) are secret whole;
    URL and DSN fields (…_url, …_dsn) hold their password and secret parameters; webhook
    URLs are secret whole (Slack-style URLs carry their token in the path); header values
    of nested structs (external APIs) are secret, but for a few that never are.
    """
    found: set[str] = set()
    for field in msgspec.structs.fields(settings):
        value = getattr(settings, field.name)
        words = set(field.name.lower().split("_"))
        if isinstance(value, str):
            if "webhook" in words:
                found.add(value)
            elif words & _SETTING_WORDS:
                found |= _credential_parts(value)
            elif words & {"url", "dsn"}:
                for url in value.split(","):
                    found |= dsn_secrets(url)
        elif isinstance(value, msgspec.Struct):
            found |= secrets_of(value)
        elif isinstance(value, list | tuple):
            for item in value:
                if isinstance(item, msgspec.Struct):
                    found |= secrets_of(item)
        elif isinstance(value, dict) and field.name == "headers":
            for header, header_value in value.items():
                if str(header).lower() not in _PLAIN_HEADERS and isinstance(header_value, str):
                    found |= _credential_parts(header_value)
    return {s for s in found if s and len(s.strip()) >= MIN_SECRET_LEN}


# ---------------------------------------------------------------- the process-wide registry

_lock = threading.Lock()
_registered = Redactor()


def register(*secrets: str | None) -> None:
    """Add secrets to what this process's logs (and `redact`) hide."""
    global _registered
    with _lock:
        _registered = Redactor(_registered.secrets | {s for s in secrets if s})


def register_settings(settings: msgspec.Struct) -> None:
    """Add every secret of a settings struct to the registry."""
    register(*secrets_of(settings))


def registered() -> Redactor:
    """The redactor of every secret registered in this process."""
    return _registered


def redact(text: str) -> str:
    """`text` without any registered secret or credential-shaped value."""
    return _registered(text)
