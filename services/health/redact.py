"""Keeping secrets out of what the health service shows: URLs, errors, details."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SECRET_WORDS = ("pass", "key", "token", "secret", "auth", "sig")


def redact_url(url: str) -> str:
    """The URL without its password and without secret-looking query parameters."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, address = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{address}" if ":" in userinfo else f"{user}@{address}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in pairs]
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub(text: str, *secrets: str | None) -> str:
    """`text` with every occurrence of each secret replaced by ***."""
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def password_of(url: str) -> str | None:
    """The password inside a URL, if any."""
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def hostport(url: str, default_port: int) -> str:
    """`host:port` of a URL (for errors that must not show the whole URL)."""
    try:
        parts = urlsplit(url)
        return f"{parts.hostname or '127.0.0.1'}:{parts.port or default_port}"
    except ValueError:
        return "the configured address"
