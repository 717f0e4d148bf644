"""Alert hooks: the plugin interface (`AlertHook`) and the built-in hooks.

A hook takes one alert and returns once it was accepted, or raises. Retries, back-off,
parking what cannot be delivered, the delivery marks and status reporting are the runner's
(`ops.hook_runner`), so a hook stays a few lines: the JSON webhook (optionally
HMAC-SHA256-signed), a Slack-compatible webhook, and the log. Error messages never carry a URL
or a secret (webhook URLs often embed a token).

Alert fields come from event payloads, which any producer shapes: nothing of them reaches an
HTTP header unescaped (`header_value`), and Slack text escapes `&`, `<` and `>` so a model name
cannot mention `<!channel>` or hide a link (`slack_escape`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import string
from typing import Protocol, runtime_checkable
from urllib.parse import quote

import httpx
import msgspec

from shared.events import Alert, rfc3339

SIGNATURE_HEADER = "X-StockPilot-Signature"
ALERT_ID_HEADER = "X-StockPilot-Alert-Id"
# The alert id again, under the name receivers' idempotency middleware looks for
# (draft-ietf-httpapi-idempotency-key-header): delivery is at least once, and a redelivery
# (after a crash between the receiver's 2xx and the delivery mark) carries the same key.
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"

# Visible ASCII but `%`, which escapes everything else (the mapping stays reversible), and
# no space (a receiver trims it from the ends of a header value).
_HEADER_SAFE = "".join(c for c in string.printable if c.isprintable() and c not in "% ")

_encode = msgspec.json.Encoder().encode


class HookError(Exception):
    """A hook could not deliver an alert (the message never carries a secret)."""


class UndeliverableError(HookError):
    """This alert can never be delivered by this hook; retrying cannot help (it is parked)."""


def header_value(text: str) -> str:
    """`text` as an HTTP header value: printable ASCII as is, anything else %-encoded (UTF-8).

    A control character would split the header (or make the HTTP library refuse the request
    on every attempt); non-ASCII is not valid in a header value at all.
    """
    return quote(text, safe=_HEADER_SAFE)


def slack_escape(text: str) -> str:
    """`text` as literal Slack text: `&`, `<`, `>` escaped, as Slack documents.

    Slack's control sequences (`<!channel>`, `<!here>`, `<@U…>`, `<http://…|label>`) all
    start with `<`; escaped, they show as typed and notify or link nobody.
    """
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@runtime_checkable
class AlertHook(Protocol):
    """Something alerts are delivered to; `deliver` raises when the alert was not taken."""

    @property
    def name(self) -> str:
        """Unique among the configured hooks; `[A-Za-z0-9_-]`, it names consumers and keys."""
        ...

    async def deliver(self, alert: Alert) -> None:
        """Hand one alert over; return only once it was accepted."""
        ...


def sign(secret: str, body: bytes) -> str:
    """The signature header value: `sha256=<hex HMAC-SHA256 of the body>`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str) -> bool:
    """Whether `header` is the signature of `body` under `secret` (constant-time)."""
    return hmac.compare_digest(sign(secret, body), header)


def _post_error(hook: str, url: str, exc: Exception) -> HookError:
    # httpx messages may quote the URL, and webhook URLs often embed a token: never show it.
    text = str(exc).replace(url, "<url>") or type(exc).__name__
    return HookError(f"{hook}: {type(exc).__name__}: {text}"[:300])


async def _post(
    client: httpx.AsyncClient, hook: str, url: str, body: bytes, headers: dict[str, str]
) -> None:
    try:
        # Streamed: the status line decides, and the runner records the delivery as soon as
        # it arrives, not after a slow receiver finally ends its body (a crash in between
        # would deliver the alert again). The body is never read.
        async with client.stream("POST", url, content=body, headers=headers) as response:
            status = response.status_code
    except httpx.HTTPError as exc:
        raise _post_error(hook, url, exc) from None
    except (UnicodeError, ValueError, TypeError) as exc:
        # The request could not even be built from this alert: the same on every attempt.
        raise UndeliverableError(
            f"{hook}: the alert cannot be sent as an HTTP request ({type(exc).__name__})"
        ) from None
    if status >= 300:
        raise HookError(f"{hook}: the receiver answered HTTP {status}")


class WebhookHook:
    """POSTs the alert JSON; with a secret, signs the body (`X-StockPilot-Signature`)."""

    def __init__(
        self,
        url: str,
        *,
        secret: str | None = None,
        client: httpx.AsyncClient,
        name: str = "webhook",
    ) -> None:
        self._name = name
        self._url = url
        self._secret = secret
        self._client = client

    @property
    def name(self) -> str:
        """The hook's name."""
        return self._name

    def __repr__(self) -> str:  # no URL, no secret
        return f"WebhookHook(name={self._name!r}, signed={self._secret is not None})"

    async def deliver(self, alert: Alert) -> None:
        """POST the alert; raises HookError unless the receiver answers 2xx."""
        body = _encode(alert)
        key = header_value(alert.id)
        headers = {
            "Content-Type": "application/json",
            ALERT_ID_HEADER: key,
            IDEMPOTENCY_KEY_HEADER: key,
        }
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        await _post(self._client, self._name, self._url, body, headers)


class SlackMessage(msgspec.Struct, kw_only=True):
    """What a Slack-compatible incoming webhook takes."""

    text: str


_SEVERITY_MARK = {
    "info": ":information_source:",
    "warning": ":warning:",
    "critical": ":rotating_light:",
}


def slack_text(alert: Alert) -> str:
    """One readable message for a chat channel; nothing in it mentions anyone or links."""
    mark = _SEVERITY_MARK.get(alert.severity, "")
    # The template itself holds no `&`, `<` or `>`: escaping the whole text escapes exactly
    # what the alert brought.
    return slack_escape(
        f"{mark} *[{alert.severity.upper()}] {alert.title}*\n{alert.message}\n"
        f"`{alert.kind}` {alert.metric}={alert.value:g} (threshold {alert.threshold:g}) "
        f"at {rfc3339(alert.occurred_at)} · id `{alert.id}`"
    )


class SlackHook:
    """POSTs `{"text": …}` to a Slack-compatible incoming webhook."""

    def __init__(self, url: str, *, client: httpx.AsyncClient, name: str = "slack") -> None:
        self._name = name
        self._url = url
        self._client = client

    @property
    def name(self) -> str:
        """The hook's name."""
        return self._name

    def __repr__(self) -> str:
        return f"SlackHook(name={self._name!r})"

    async def deliver(self, alert: Alert) -> None:
        """POST the message; raises HookError unless the receiver answers 2xx."""
        body = _encode(SlackMessage(text=slack_text(alert)))  # no header carries alert data
        await _post(self._client, self._name, self._url, body, {"Content-Type": "application/json"})


class LogHook:
    """Writes each alert to the process log (one line, at the alert's severity)."""

    _LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.CRITICAL}

    def __init__(self, name: str = "log", logger: logging.Logger | None = None) -> None:
        self._name = name
        self._log = logger or logging.getLogger("stockpilot.alerts")

    @property
    def name(self) -> str:
        """The hook's name."""
        return self._name

    async def deliver(self, alert: Alert) -> None:
        """Log the alert."""
        self._log.log(
            self._LEVELS.get(alert.severity, logging.WARNING),
            "alert %s [%s] %s: %s (%s=%g, threshold %g)",
            alert.id,
            alert.kind,
            alert.title,
            alert.message,
            alert.metric,
            alert.value,
            alert.threshold,
        )
