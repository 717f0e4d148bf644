"""The one redaction module: every shape of a secret, URL and key/value DSNs, settings."""

from __future__ import annotations

import json
from urllib.parse import quote, quote_plus

import msgspec
import pytest

from services.health.settings import HealthSettings
from shared.redact import (
    REDACTED,
    Redactor,
    dsn_secrets,
    forms,
    hostport,
    parse_conninfo,
    password_of,
    redact_url,
    secrets_of,
)
from shared.settings import load_settings

KEY = "sk-proj-Zq8xT1mN4vB7\n"
PASSWORD = "p@ss w/rd'\"\\x\n"

# (what the secret became on its way into the text, the text)
SHAPES: list[tuple[str, str]] = [
    ("raw", f"failed with {KEY} here"),
    ("stripped", f"failed with {KEY.strip()} here"),
    ("repr", f"Illegal header value {('Bearer ' + KEY).encode()!r}"),
    ("repr str", f"value {KEY!r} refused"),
    ("json", json.dumps({"error": f"key {KEY}"})),
    ("json of repr", json.dumps({"error": f"key {KEY!r}"})),
    ("url-encoded", f"GET /x?k={quote(KEY, safe='')}"),
    ("url-encoded lower hex", f"GET /x?k={quote(KEY, safe='').lower()}"),
    ("form-encoded", f"k={quote_plus(KEY)}"),
    ("whitespace removed", f"got {''.join(KEY.split())}."),
]


@pytest.mark.parametrize(("shape", "text"), SHAPES, ids=[s for s, _ in SHAPES])
def test_a_key_is_hidden_in_every_shape(shape: str, text: str) -> None:
    shown = Redactor([KEY])(text)
    assert REDACTED in shown
    assert "Zq8xT1mN4vB7" not in shown, shape


PASSWORD_SHAPES: list[tuple[str, str]] = [
    ("raw", f"auth failed for {PASSWORD}"),
    ("stripped", f"auth failed for {PASSWORD.strip()}!"),
    ("repr", f"bad value {PASSWORD!r}"),
    ("bytes repr", f"bad value {PASSWORD.encode()!r}"),
    ("json", json.dumps(PASSWORD)),
    ("json twice", json.dumps(json.dumps(PASSWORD))),
    ("percent-encoded", quote(PASSWORD, safe="")),
    ("percent-encoded keeping /", quote(PASSWORD)),
    ("plus-encoded", quote_plus(PASSWORD)),
]


@pytest.mark.parametrize(("shape", "text"), PASSWORD_SHAPES, ids=[s for s, _ in PASSWORD_SHAPES])
def test_a_password_with_quotes_spaces_and_backslashes_is_hidden_in_every_shape(
    shape: str, text: str
) -> None:
    shown = Redactor([PASSWORD])(text)
    for form in forms(PASSWORD):
        assert form not in shown, (shape, form)
    assert "p@ss" not in shown and "p%40ss" not in shown, shape


def test_every_shape_is_among_the_forms() -> None:
    every = forms(PASSWORD)
    assert PASSWORD in every and PASSWORD.strip() in every
    assert repr(PASSWORD)[1:-1] in every
    assert json.dumps(PASSWORD)[1:-1] in every
    assert quote(PASSWORD, safe="") in every and quote_plus(PASSWORD) in every


URLS: list[tuple[str, str]] = [
    (
        "postgresql://app:s3cret-pw@db:5432/app?sslmode=require&password=x9x9",
        "postgresql://app:***@db:5432/app?sslmode=require&password=***",
    ),
    ("redis://:s3cret-pw@cache:6379/0", "redis://:***@cache:6379/0"),
    ("https://api.example.com/x?token=abcd&q=1", "https://api.example.com/x?token=***&q=1"),
    ("https://api.example.com/x?api_key=abcd", "https://api.example.com/x?api_key=***"),
    ("nats://svc:s3cret-pw@127.0.0.1:4222", "nats://svc:***@127.0.0.1:4222"),
    (
        "host=db port=5432 user=app password=s3cret-pw dbname=app",
        "host=db port=5432 user=app password=*** dbname=app",
    ),
    (
        "host=db password='s3cret pw\\'s' user=app",
        "host=db password=*** user=app",
    ),
    ("host = db  password = s3cret-pw", "host=db password=***"),
]


@pytest.mark.parametrize(("url", "shown"), URLS)
def test_urls_and_key_value_dsns_lose_their_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


def test_key_value_dsn_is_parsed_like_libpq() -> None:
    pairs = parse_conninfo("host=127.0.0.1 port = 5432 password='a b\\'c\\\\\n' dbname=x")
    assert pairs == {"host": "127.0.0.1", "port": "5432", "password": "a b'c\\\n", "dbname": "x"}
    assert password_of("host=h password='a b'") == "a b"
    assert hostport("host=db port=6543 password=x", 5432) == "db:6543"
    assert dsn_secrets("host=h password=pw1234 sslpassword=pw5678") == {"pw1234", "pw5678"}
    # A URL holds its password percent-encoded; the driver decodes it, and a server may quote
    # the decoded one back: both are secrets.
    assert dsn_secrets("postgresql://u:p%2Fw%40x%20y@h/db") == {"p%2Fw%40x%20y", "p/w@x y"}
    assert dsn_secrets("redis://h/0?token=a%2Fb+c") == {"a/b c"}
    assert "a%2Fb+c" in forms("a/b c")
    with pytest.raises(ValueError) as refused:
        parse_conninfo("host=h password='never closed")
    assert "never closed" not in str(refused.value)


CREDENTIAL_SHAPED: list[tuple[str, str]] = [
    ("connect to postgres://u:hunter22@h/db failed", "postgres://u:***@h/db"),
    ("dsn host=h password=hunter22 user=u", "password=*** user=u"),
    ("dsn host=h password='hunter 22' user=u", "password=*** user=u"),
    ('{"password": "hunter22"}', '{"password": "***"}'),
    ("Authorization: Bearer abc.def-ghi", "Bearer ***"),
    ("key sk-abcdefghijklmnopqrstu leaked", "sk-***"),
]


@pytest.mark.parametrize(("text", "expected"), CREDENTIAL_SHAPED)
def test_credential_shaped_text_is_hidden_even_when_nobody_registered_it(
    text: str, expected: str
) -> None:
    shown = Redactor()(text)
    assert expected in shown
    assert "hunter" not in shown and "abcdefghij" not in shown and "abc.def" not in shown


def test_ordinary_text_is_left_alone() -> None:
    text = "lock nightly fencing_token=42 released; 3 events; key=health.round"
    assert Redactor(["abc"])(text) == text  # "abc" is too short to be a secret


def test_secrets_of_settings_finds_every_secret_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUOTES_TOKEN", "quotes-token-1\n")
    apis = [
        {
            "name": "quotes",
            "url": "https://q.example/v1?apikey=qkey-2",
            "headers": {"X-Api-Key": "env:QUOTES_TOKEN", "Accept": "application/json"},
        },
        {"name": "news", "url": "https://n.example", "headers": {"Authorization": "Bearer nt-3"}},
    ]
    settings = load_settings(
        HealthSettings,
        {
            "STOCKPILOT_CONFIG": "tests/empty.toml",
            "OPENAI_API_KEY": "sk-open-4\n",
            "STOCKPILOT_DATABASE_URL": "host=db user=app password='pg pass 5'",
            "STOCKPILOT_REDIS_URL": "redis://:redis-6@cache:6379/0",
            "STOCKPILOT_NATS_URL": "nats://svc:nats-7@127.0.0.1:4222",
            "STOCKPILOT_NATS_PASSWORD": "nats-8",
            "STOCKPILOT_EXTERNAL_APIS": json.dumps(apis),
        },
    )
    found = secrets_of(settings)
    for secret in (
        "quotes-token-1",
        "qkey-2",
        "Bearer nt-3",
        "nt-3",
        "sk-open-4",
        "pg pass 5",
        "redis-6",
        "nats-7",
        "nats-8",
    ):
        assert secret in found, secret
    assert "application/json" not in found  # a header that is never secret
    assert "db" not in found and "cache" not in found


def test_secrets_of_finds_tokens_and_webhook_urls_by_field_name() -> None:
    class Tokens(msgspec.Struct):
        admin_token: str | None = "admin-tok-1"
        alert_webhook_url: str | None = "https://hooks.slack.example/T0/B0/slacktoken"
        alert_webhook_secret: str | None = "hook-secret-2"
        http_host: str = "127.0.0.1"

    assert secrets_of(Tokens()) == {
        "admin-tok-1",
        "https://hooks.slack.example/T0/B0/slacktoken",
        "hook-secret-2",
    }
