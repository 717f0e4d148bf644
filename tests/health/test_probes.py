"""Probes against real servers: PostgreSQL, Redis, loopback HTTP, closed and silent ports."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest

from services.health import probes
from services.health.host import sample_host
from services.health.settings import HealthSettings
from shared.settings import SettingsError, load_settings
from tests.harness import free_port, wait_for_port
from tests.health.targets import Reply, Target, models_body

TIMEOUT_S = 0.5
# A probe that ignored its timeout would wait on the silent target for ever: this bound
# catches that hang while staying far above any machine's scheduling delay (no test here
# times the machine; the lower bounds check the probe did wait its timeout).
SLACK_S = 5.0
BASE = {"STOCKPILOT_CONFIG": "tests/empty.toml", "STOCKPILOT_PROBE_TIMEOUT_S": str(TIMEOUT_S)}


def settings(**env: str) -> HealthSettings:
    return load_settings(HealthSettings, BASE | env)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with probes.new_http_client() as client:
        yield client


@pytest.fixture
async def silent() -> AsyncIterator[Target]:
    """A server on loopback that accepts connections and never says a word."""
    async with Target(silent=True) as target:
        yield target


async def timed(coro: object) -> tuple[probes.ProbeResult, float]:
    started = time.monotonic()
    result = await coro  # type: ignore[misc]
    return result, time.monotonic() - started


# ----- PostgreSQL ------------------------------------------------------------------------


async def test_database_reports_healthy_with_real_details(postgres_url: str) -> None:
    result = await probes.probe_database(settings(STOCKPILOT_DATABASE_URL=postgres_url))
    assert result.status == "healthy", result.error
    assert result.error is None
    assert result.latency_ms is not None and result.latency_ms > 0
    details = result.details
    assert str(details["server_version"])[:1].isdigit()
    assert isinstance(details["max_connections"], int) and details["max_connections"] > 0
    assert isinstance(details["connections_in_use"], int) and details["connections_in_use"] >= 1
    assert details["connections_pct"] == pytest.approx(
        100 * details["connections_in_use"] / details["max_connections"], abs=0.1
    )


async def test_database_slow_query_threshold_degrades(postgres_url: str) -> None:
    result = await probes.probe_database(
        settings(STOCKPILOT_DATABASE_URL=postgres_url, STOCKPILOT_DATABASE_SLOW_MS="0.0001")
    )
    assert result.status == "degraded"
    assert result.error is not None and "query took" in result.error


async def test_database_connections_threshold_degrades(postgres_url: str) -> None:
    result = await probes.probe_database(
        settings(STOCKPILOT_DATABASE_URL=postgres_url, STOCKPILOT_DATABASE_CONNECTIONS_PCT="0")
    )
    assert result.status == "degraded"
    assert result.error is not None and "max_connections" in result.error


async def test_database_closed_port_is_unhealthy_and_says_so() -> None:
    url = f"postgresql://postgres:hunter22@127.0.0.1:{free_port()}/postgres"
    result, took = await timed(probes.probe_database(settings(STOCKPILOT_DATABASE_URL=url)))
    assert result.status == "unhealthy"
    assert result.error is not None and "connection refused" in result.error
    assert "hunter22" not in result.error and "hunter22" not in str(result.details)
    assert took < TIMEOUT_S + SLACK_S


async def test_database_unknown_role_is_unhealthy_and_says_so(postgres_url: str) -> None:
    url = postgres_url.replace("postgres@", "no_such_role:wrong-pass@", 1)
    result, took = await timed(probes.probe_database(settings(STOCKPILOT_DATABASE_URL=url)))
    assert result.status == "unhealthy"
    assert result.error is not None
    assert 'role "no_such_role" does not exist' in result.error
    assert "wrong-pass" not in result.error
    assert result.details["target"] == url.replace("wrong-pass", "***")
    assert took < TIMEOUT_S + SLACK_S


async def test_database_missing_database_is_unhealthy_and_says_so(postgres_url: str) -> None:
    url = postgres_url.rsplit("/", 1)[0] + "/no_such_database"
    result = await probes.probe_database(settings(STOCKPILOT_DATABASE_URL=url))
    assert result.status == "unhealthy"
    assert result.error is not None
    assert 'database "no_such_database" does not exist' in result.error


async def test_database_silent_server_is_unhealthy_at_the_timeout(silent: Target) -> None:
    url = f"postgresql://postgres@127.0.0.1:{silent.port}/postgres"
    result, took = await timed(probes.probe_database(settings(STOCKPILOT_DATABASE_URL=url)))
    assert result.status == "unhealthy"
    assert result.error == f"no answer from {url} within 0.5 s"
    assert TIMEOUT_S - 0.05 <= took < TIMEOUT_S + SLACK_S


# ----- Redis -----------------------------------------------------------------------------


async def test_redis_reports_healthy_with_real_details(redis_url: str) -> None:
    result = await probes.probe_redis(settings(STOCKPILOT_REDIS_URL=redis_url))
    assert result.status == "healthy", result.error
    assert result.latency_ms is not None and result.latency_ms > 0
    assert str(result.details["version"])[:1].isdigit()
    assert isinstance(result.details["used_memory_bytes"], int)
    assert result.details["used_memory_bytes"] > 0
    assert isinstance(result.details["connected_clients"], int)
    assert result.details["connected_clients"] >= 1


async def test_redis_slow_ping_threshold_degrades(redis_url: str) -> None:
    result = await probes.probe_redis(
        settings(STOCKPILOT_REDIS_URL=redis_url, STOCKPILOT_REDIS_SLOW_MS="0.0001")
    )
    assert result.status == "degraded"
    assert result.error is not None and "PING took" in result.error


async def test_redis_closed_port_is_unhealthy_and_says_so() -> None:
    url = f"redis://:hunter22@127.0.0.1:{free_port()}/0"
    result, took = await timed(probes.probe_redis(settings(STOCKPILOT_REDIS_URL=url)))
    assert result.status == "unhealthy"
    assert result.error is not None and "connection refused" in result.error
    assert "hunter22" not in result.error and "hunter22" not in str(result.details)
    assert took < TIMEOUT_S + SLACK_S


async def test_redis_wrong_credentials_are_unhealthy_and_say_so(redis_url: str) -> None:
    url = redis_url.replace("redis://", "redis://no_such_user:wrong-pass@", 1)
    result = await probes.probe_redis(settings(STOCKPILOT_REDIS_URL=url))
    assert result.status == "unhealthy"
    assert result.error is not None and "refused the credentials" in result.error
    assert "wrong-pass" not in result.error


async def test_redis_silent_server_is_unhealthy_at_the_timeout(silent: Target) -> None:
    url = f"redis://127.0.0.1:{silent.port}/0"
    result, took = await timed(probes.probe_redis(settings(STOCKPILOT_REDIS_URL=url)))
    assert result.status == "unhealthy"
    assert result.error == f"no answer from {url} within 0.5 s"
    assert TIMEOUT_S - 0.05 <= took < TIMEOUT_S + SLACK_S


# ----- OpenAI ----------------------------------------------------------------------------


def openai_settings(target: Target, **env: str) -> HealthSettings:
    return settings(OPENAI_API_KEY="sk-live-secret", OPENAI_BASE_URL=target.url + "/v1", **env)


async def test_openai_lists_models_with_the_key(http: httpx.AsyncClient) -> None:
    async with Target(Reply(body=models_body(7))) as target:
        result = await probes.probe_openai(openai_settings(target), http)
    assert result.status == "healthy", result.error
    assert result.details["models"] == 7
    assert result.details["http_status"] == 200
    [request] = target.seen
    assert (request.method, request.path) == ("GET", "/v1/models")
    assert request.headers["authorization"] == "Bearer sk-live-secret"


@pytest.mark.parametrize(
    ("status", "expected", "says"),
    [
        (401, "unhealthy", "invalid API key"),
        (429, "degraded", "rate limited"),
        (500, "unhealthy", "server error (500)"),
        (503, "unhealthy", "server error (503)"),
        (404, "unhealthy", "unexpected answer 404"),
    ],
)
async def test_openai_error_answers_map_to_statuses(
    http: httpx.AsyncClient, status: int, expected: str, says: str
) -> None:
    async with Target(Reply(status=status, body=b'{"error":{"message":"no"}}')) as target:
        result = await probes.probe_openai(openai_settings(target), http)
    assert result.status == expected
    assert result.error is not None and says in result.error
    assert "sk-live-secret" not in result.error


async def test_openai_slow_answer_is_degraded(http: httpx.AsyncClient) -> None:
    async with Target(Reply(body=models_body(1), delay_s=0.1)) as target:
        result = await probes.probe_openai(
            openai_settings(target, STOCKPILOT_OPENAI_SLOW_MS="50"), http
        )
    assert result.status == "degraded"
    assert result.error is not None and "> 50 ms" in result.error


async def test_openai_answer_that_is_not_a_model_list_is_unhealthy(
    http: httpx.AsyncClient,
) -> None:
    async with Target(Reply(body=b"<html>captive portal</html>")) as target:
        result = await probes.probe_openai(openai_settings(target), http)
    assert result.status == "unhealthy"
    assert result.error is not None and "not with a list of models" in result.error


async def test_openai_hanging_server_is_unhealthy_at_the_timeout(
    http: httpx.AsyncClient,
) -> None:
    async with Target(Reply(hang=True)) as target:
        result, took = await timed(probes.probe_openai(openai_settings(target), http))
    assert result.status == "unhealthy"
    assert result.error is not None and "within 0.5 s" in result.error
    assert TIMEOUT_S - 0.05 <= took < TIMEOUT_S + SLACK_S


async def test_openai_without_a_key_is_unknown_naming_the_setting(
    http: httpx.AsyncClient,
) -> None:
    result = await probes.probe_openai(settings(), http)
    assert result.status == "unknown"
    assert result.details["enable_with"] == "OPENAI_API_KEY"


# ----- external APIs ---------------------------------------------------------------------


async def test_external_api_sends_env_headers_and_checks_the_expected_status(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUOTES_API_KEY", "q-secret-123")
    async with Target(Reply(status=202)) as target:
        apis = [
            {
                "name": "quotes",
                "url": target.url + "/v2/status?apikey=inline-secret",
                "method": "HEAD",
                "expect_status": 202,
                "headers": {"X-Api-Key": "env:QUOTES_API_KEY", "Accept": "text/plain"},
            }
        ]
        s = settings(STOCKPILOT_EXTERNAL_APIS=json.dumps(apis))
        result = await probes.probe_external(s.external_apis[0], s, http)
        target.reply = Reply(status=200)
        wrong = await probes.probe_external(s.external_apis[0], s, http)
    assert result.component == "external.quotes"
    assert result.status == "healthy", result.error
    assert target.seen[0].method == "HEAD"
    assert target.seen[0].headers["x-api-key"] == "q-secret-123"
    assert target.seen[0].headers["accept"] == "text/plain"
    assert "inline-secret" not in str(result.details)
    assert wrong.status == "unhealthy"
    assert wrong.error == "answered 200, expected 202"


async def test_external_api_uses_its_own_timeout(http: httpx.AsyncClient) -> None:
    async with Target(Reply(hang=True)) as target:
        apis = [{"name": "slow", "url": target.url + "/", "timeout_s": 0.2}]
        s = settings(STOCKPILOT_EXTERNAL_APIS=json.dumps(apis))
        result, took = await timed(probes.probe_external(s.external_apis[0], s, http))
    assert result.status == "unhealthy"
    assert result.error is not None and "within 0.2 s" in result.error
    assert 0.15 <= took < 0.2 + SLACK_S


async def test_external_api_closed_port_is_unhealthy(http: httpx.AsyncClient) -> None:
    apis = [{"name": "gone", "url": f"http://127.0.0.1:{free_port()}/"}]
    s = settings(STOCKPILOT_EXTERNAL_APIS=json.dumps(apis))
    result = await probes.probe_external(s.external_apis[0], s, http)
    assert result.status == "unhealthy"
    assert result.error is not None and result.error.startswith("cannot connect to http://127")


# ----- a whole round ---------------------------------------------------------------------


async def test_all_probes_run_at_once_and_a_hang_delays_nothing_else(
    http: httpx.AsyncClient, silent: Target, postgres_url: str, redis_url: str
) -> None:
    async with Target(Reply(body=models_body(2))) as openai, Target(Reply()) as api:
        apis = [
            {"name": "up", "url": api.url + "/"},
            {"name": "mute", "url": silent.url + "/"},
        ]
        s = settings(
            STOCKPILOT_DATABASE_URL=postgres_url,
            STOCKPILOT_REDIS_URL=f"redis://127.0.0.1:{silent.port}/0",
            OPENAI_API_KEY="k",
            OPENAI_BASE_URL=openai.url + "/v1",
            STOCKPILOT_EXTERNAL_APIS=json.dumps(apis),
        )
        results, took = await timed(probes.probe_all(s, http))
    by_name = {r.component: r for r in results}
    assert list(by_name) == ["database", "redis", "openai", "external.up", "external.mute"]
    assert [by_name[n].status for n in by_name] == [
        "healthy",
        "unhealthy",
        "healthy",
        "healthy",
        "unhealthy",
    ]
    # Two silent targets, each with a 0.5 s timeout: the round takes one timeout, not two.
    assert took < TIMEOUT_S + SLACK_S
    fast = [by_name[n].latency_ms for n in ("database", "openai", "external.up")]
    assert all(ms is not None and ms < 250 for ms in fast)


def test_host_sample_is_within_bounds(tmp_path: object) -> None:
    sample = sample_host(str(tmp_path))
    assert 0 <= sample.cpu_percent <= 100
    assert 0 < sample.memory_percent <= 100
    assert 0 < sample.disk_percent <= 100
    assert sample.uptime_s > 0


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[str]:
    """A throwaway redis-server with a 2 MB maxmemory (the shared one has none set)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    child = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--maxmemory", "2mb"]
        + ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        child.terminate()
        child.wait(10)


async def test_redis_memory_near_maxmemory_is_degraded(small_redis: str) -> None:
    result = await probes.probe_redis(
        settings(STOCKPILOT_REDIS_URL=small_redis, STOCKPILOT_REDIS_MEMORY_PCT="10")
    )
    assert result.details["maxmemory_bytes"] == 2 * 1024 * 1024
    used = result.details["used_memory_bytes"]
    assert result.details["memory_pct"] == pytest.approx(100 * used / (2 * 1024 * 1024), abs=0.1)
    assert result.status == "degraded"
    assert result.error is not None and "of maxmemory used (> 10 %)" in result.error
    relaxed = await probes.probe_redis(settings(STOCKPILOT_REDIS_URL=small_redis))
    assert relaxed.status == "healthy"  # ~1 MB of 2 MB is under the default 90 %


# ----- Redaction -------------------------------------------------------------------------

LEAKY_KEY = "sk-leaky-Hq4Wz81v"


def no_form_of(secret: str, result: probes.ProbeResult) -> None:
    """Fails when any shape of `secret` is in the result's error or details."""
    shown = str(result.error) + json.dumps(result.details) + repr(result)
    for form in (secret, secret.strip(), repr(secret)[1:-1], quote(secret, safe="")):
        assert form not in shown, (form, shown)


async def test_a_key_with_a_trailing_newline_is_sent_stripped_and_never_shown() -> None:
    """The echoing server says the key back; the result shows it as ***."""
    async with Target(Reply(status=401, echo_header="Authorization")) as target:
        s = settings(OPENAI_API_KEY=LEAKY_KEY + "\n", OPENAI_BASE_URL=target.url + "/v1")
        async with probes.new_http_client() as http:  # closed before the server stops
            result = await probes.probe_openai(s, http)
    assert target.seen[0].headers["authorization"] == f"Bearer {LEAKY_KEY}"
    assert result.status == "unhealthy"
    assert result.error == "invalid API key (401): Incorrect API key provided: Bearer ***"
    no_form_of(LEAKY_KEY + "\n", result)


async def test_a_key_http_refuses_to_send_is_not_shown_in_the_error() -> None:
    """A control character inside the key: httpx quotes the header's bytes in its error."""
    key = "sk-inner-\n-Vb3x9Lk2"
    async with Target(Reply(status=200, body=models_body(1))) as target:
        s = settings(OPENAI_API_KEY=key, OPENAI_BASE_URL=target.url + "/v1")
        async with probes.new_http_client() as http:  # closed before the server stops
            result = await probes.probe_openai(s, http)
    assert result.status == "unhealthy"
    assert result.error is not None and "***" in result.error
    assert target.seen == []
    no_form_of(key, result)
    no_form_of("-Vb3x9Lk2", result)


async def test_an_env_header_with_a_trailing_newline_is_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QUOTES_TOKEN", "qt-Np27vXc5\n")
    async with Target(Reply(status=401, echo_header="X-Token")) as target:
        apis = [{"name": "quotes", "url": target.url, "headers": {"X-Token": "env:QUOTES_TOKEN"}}]
        s = settings(STOCKPILOT_EXTERNAL_APIS=json.dumps(apis))
        async with probes.new_http_client() as http:  # closed before the server stops
            result = await probes.probe_external(s.external_apis[0], s, http)
    assert target.seen[0].headers["x-token"] == "qt-Np27vXc5"
    assert result.error == "answered 401, expected 200: Incorrect API key provided: ***"
    no_form_of("qt-Np27vXc5\n", result)


async def test_a_key_value_dsn_is_probed_and_shown_without_its_password(
    postgres_url: str,
) -> None:
    parts = urlsplit(postgres_url)
    password = "pg-Wr0ng pass\n"
    dsn = (
        f"host={parts.hostname} port={parts.port or 5432} user={parts.username} "
        f"password='{password}' dbname={parts.path.lstrip('/') or 'postgres'}"
    )
    result = await probes.probe_database(settings(STOCKPILOT_DATABASE_URL=dsn))
    # The test servers trust loopback, so the wrong password still connects: what matters
    # is that the key/value DSN works at all and that its password is never shown.
    assert result.status in ("healthy", "unhealthy"), result.error
    if result.status == "unhealthy":
        assert result.error is not None and "password" in result.error
    assert result.details["target"].endswith(
        "password=*** dbname=" + (parts.path.lstrip("/") or "postgres")
    )
    no_form_of(password, result)


async def test_a_key_value_dsn_with_an_unsupported_key_says_which(postgres_url: str) -> None:
    result = await probes.probe_database(
        settings(STOCKPILOT_DATABASE_URL="host=127.0.0.1 password=Zx81-pw service=x")
    )
    assert result.status == "unhealthy"
    assert result.error is not None and "'service'" in result.error
    no_form_of("Zx81-pw", result)


def test_a_malformed_key_value_dsn_stops_at_start_without_showing_it() -> None:
    with pytest.raises(SettingsError) as refused:
        settings(STOCKPILOT_DATABASE_URL="host=127.0.0.1 password='Zx81-unclosed")
    assert "STOCKPILOT_DATABASE_URL" in str(refused.value)
    assert "Zx81" not in str(refused.value)
