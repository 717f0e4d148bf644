"""Health settings from the environment: names, external APIs, `env:` headers, bad values."""

from __future__ import annotations

import json

import pytest

from services.health import settings as health_settings
from services.health.settings import HealthSettings
from shared.settings import SettingsError, load_settings

BASE = {"STOCKPILOT_CONFIG": "tests/empty.toml"}


def load(**env: str) -> HealthSettings:
    return load_settings(HealthSettings, BASE | env)


def test_defaults_follow_the_contract() -> None:
    s = load()
    assert s.database_url is None and s.redis_url is None and s.openai_api_key is None
    assert s.openai_base_url == "https://api.openai.com/v1"
    assert s.external_apis == []
    assert (s.health_interval_s, s.probe_timeout_s) == (30.0, 3.0)
    assert (s.database_slow_ms, s.database_connections_pct) == (1000.0, 80.0)
    assert (s.redis_slow_ms, s.redis_memory_pct, s.openai_slow_ms) == (100.0, 90.0, 5000.0)
    assert (s.external_healthy_pct, s.external_degraded_pct) == (80.0, 50.0)
    assert (s.hysteresis_down, s.hysteresis_up) == (3, 2)
    assert health_settings.Settings is HealthSettings


def test_openai_variables_have_their_own_names() -> None:
    s = load(OPENAI_API_KEY="sk-1", OPENAI_BASE_URL="http://127.0.0.1:1/v1")
    assert (s.openai_api_key, s.openai_base_url) == ("sk-1", "http://127.0.0.1:1/v1")


def test_external_apis_are_read_from_json_with_defaults() -> None:
    apis = [
        {"name": "quotes", "url": "https://quotes.example/status"},
        {
            "name": "news-feed_2",
            "url": "http://news.example/",
            "method": "HEAD",
            "expect_status": 204,
            "timeout_s": 1.5,
            "headers": {"Accept": "application/json"},
        },
    ]
    s = load(STOCKPILOT_EXTERNAL_APIS=json.dumps(apis))
    quotes, news = s.external_apis
    assert (quotes.method, quotes.expect_status, quotes.timeout_s, quotes.headers) == (
        "GET",
        200,
        None,
        {},
    )
    assert (news.name, news.method, news.expect_status, news.timeout_s) == (
        "news-feed_2",
        "HEAD",
        204,
        1.5,
    )


def test_env_headers_are_resolved_when_the_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUOTES_API_KEY", "q-123")
    apis = [{"name": "q", "url": "http://x/", "headers": {"X-Key": "env:QUOTES_API_KEY"}}]
    s = load(STOCKPILOT_EXTERNAL_APIS=json.dumps(apis))
    assert s.external_apis[0].headers == {"X-Key": "q-123"}


@pytest.mark.parametrize(
    ("apis", "says"),
    [
        ([{"name": "q", "url": "http://x/", "headers": {"X": "env:NOT_SET_ANYWHERE"}}], "NOT_SET"),
        ([{"name": "bad name", "url": "http://x/"}], "STOCKPILOT_EXTERNAL_APIS"),
        ([{"name": "q", "url": "ftp://x/"}], "http:// or https://"),
        ([{"name": "q", "url": "http://x/", "surprise": 1}], "surprise"),
        ([{"name": "q", "url": "http://x/", "timeout_s": 120}], "STOCKPILOT_EXTERNAL_APIS"),
        ([{"name": "q", "url": "http://x/"}, {"name": "q", "url": "http://y/"}], "duplicate"),
    ],
)
def test_bad_external_apis_stop_with_a_clear_line(apis: list[object], says: str) -> None:
    with pytest.raises(SettingsError, match=says):
        load(STOCKPILOT_EXTERNAL_APIS=json.dumps(apis))


def test_bad_numbers_name_their_variable() -> None:
    with pytest.raises(SettingsError, match="STOCKPILOT_HEALTH_INTERVAL_S"):
        load(STOCKPILOT_HEALTH_INTERVAL_S="0")
    with pytest.raises(SettingsError, match="STOCKPILOT_HYSTERESIS_DOWN"):
        load(STOCKPILOT_HYSTERESIS_DOWN="0")
    with pytest.raises(SettingsError, match="STOCKPILOT_EXTERNAL_DEGRADED_PCT"):
        load(STOCKPILOT_EXTERNAL_DEGRADED_PCT="90", STOCKPILOT_EXTERNAL_HEALTHY_PCT="80")


def test_repr_shows_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUOTES_API_KEY", "q-secret-9")
    apis = [{"name": "q", "url": "http://x/", "headers": {"X-Key": "env:QUOTES_API_KEY"}}]
    s = load(
        STOCKPILOT_EXTERNAL_APIS=json.dumps(apis),
        OPENAI_API_KEY="sk-secret-8",
        STOCKPILOT_DATABASE_URL="postgresql://app:pw-secret-7@db/app",
    )
    shown = f"{s!r} {s.external_apis!r}"
    assert "secret" not in shown
    assert "'q'" in shown
