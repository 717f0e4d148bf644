"""Probes of StockPilot's dependencies, over real connections, each bounded by its own timeout.

Why one module of over 300 lines: the four probes (database, Redis, OpenAI, external APIs)
share one way of bounding, describing and redacting what goes wrong (`bounded`, `_describe`,
`redacted`), so each probe reads as the same pattern next to the others.

A probe never raises: whatever goes wrong becomes an `unhealthy` result with an error a person
understands. A result is redacted before it becomes an event (kept for months, shown by the
routes, copied into alerts and webhooks): no secret of the settings in any form (raw, stripped,
escaped, URL-encoded), no password of any URL or DSN, in its error or its details.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import httpx
import msgspec
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from services.health.contract import Details, Kind, Status
from services.health.settings import ExternalApi, HealthSettings
from shared.redact import (
    Redactor,
    hostport,
    is_conninfo,
    parse_conninfo,
    redact_url,
    registered,
    secrets_of,
)

# What of a server's error body an error shows: enough for "Incorrect API key provided".
BODY_EXCERPT_CHARS = 200


class ProbeResult(msgspec.Struct, kw_only=True):
    """What one probe found."""

    component: str
    kind: Kind
    status: Status
    latency_ms: float | None = None
    details: Details = {}
    error: str | None = None


class ProbeFailed(Exception):
    """A probe's own, already readable, failure reason."""


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def unconfigured(component: str, kind: Kind, setting: str) -> ProbeResult:
    """An `unknown` result for a probe that is switched off, naming what switches it on."""
    return ProbeResult(
        component=component,
        kind=kind,
        status="unknown",
        details={
            "configured": False,
            "enable_with": setting,
            "reason": f"not configured: set {setting} to probe it",
        },
    )


def _describe(exc: BaseException, where: str) -> str:
    if isinstance(exc, ProbeFailed):
        return str(exc)
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where}: nothing listens there"
    if isinstance(exc, OSError) and "Connect call failed" in str(exc):
        return f"connection refused by {where}: nothing listens there"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {where}: {exc or 'the connection failed'}"
    if isinstance(exc, httpx.HTTPError):
        return f"HTTP request to {where} failed: {type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def redactor(settings: HealthSettings) -> Redactor:
    """Hides every secret of the settings (and any the process registered) in a result."""
    return Redactor(secrets_of(settings) | registered().secrets)


def redacted(result: ProbeResult, shown: Redactor) -> ProbeResult:
    """The result with its error and every string of its details redacted."""
    return msgspec.structs.replace(
        result,
        details=shown.value(result.details),
        error=None if result.error is None else shown(result.error),
    )


def excerpt(body: bytes, shown: Redactor) -> str:
    """A server's answer as one short line for an error: OpenAI-style `error.message` if any."""
    try:
        decoded = msgspec.json.decode(body, type=_ErrorBody)
        text = (decoded.error.message if decoded.error else "") or decoded.detail or ""
    except msgspec.DecodeError:  # not a JSON error object: the text itself
        text = body.decode("utf-8", "replace")
    # Redacted before it is cut: a cut could leave half a secret that no longer matches.
    line = " ".join(shown(text).split())
    return line if len(line) <= BODY_EXCERPT_CHARS else line[: BODY_EXCERPT_CHARS - 1] + "…"


class _ErrorMessage(msgspec.Struct):
    message: str = ""


class _ErrorBody(msgspec.Struct):
    error: _ErrorMessage | None = None
    detail: str | None = None


async def bounded(
    component: str,
    kind: Kind,
    target: str,
    timeout: float,
    probe: Callable[[], Awaitable[ProbeResult]],
    shown: Redactor,
) -> ProbeResult:
    """Run `probe` within `timeout`; a hang or an error becomes an unhealthy result. Either
    way the result is redacted."""
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            return redacted(await probe(), shown)
    except (TimeoutError, RedisTimeoutError, httpx.TimeoutException):
        error = f"no answer from {target} within {timeout:g} s"
    except Exception as exc:
        error = _describe(exc, target)
    result = ProbeResult(
        component=component,
        kind=kind,
        status="unhealthy",
        latency_ms=_ms(start),
        details={"target": target},
        error=error,
    )
    return redacted(result, shown)


_CONNINFO_ARGS = {
    "host": "host",
    "hostaddr": "host",
    "port": "port",
    "user": "user",
    "password": "password",
    "dbname": "database",
    "sslmode": "ssl",
}
_CONNINFO_IGNORED = {"connect_timeout", "application_name", "client_encoding"}


def connect_args(url: str) -> dict[str, object]:
    """asyncpg.connect arguments for a URL or a libpq key/value DSN (asyncpg reads URLs only)."""
    if not is_conninfo(url):
        return {"dsn": url}
    args: dict[str, object] = {}
    for key, value in parse_conninfo(url).items():
        if key in _CONNINFO_IGNORED:
            continue
        if key not in _CONNINFO_ARGS:
            raise ProbeFailed(
                f"the key/value DSN's {key!r} is not supported here: use "
                "host, port, user, password, dbname, sslmode, or a postgresql:// URL"
            )
        if key == "hostaddr" and "host" in args:
            continue
        args[_CONNINFO_ARGS[key]] = int(value) if key == "port" and value.isdigit() else value
    return args


def _degraded(reasons: list[str]) -> tuple[Status, str | None]:
    return ("degraded", "; ".join(reasons)) if reasons else ("healthy", None)


async def probe_database(settings: HealthSettings, timeout: float | None = None) -> ProbeResult:
    """PostgreSQL: connect (timed apart), SELECT 1's round trip, server version, connections in
    use vs max_connections."""
    url = settings.database_url
    if not url:
        return unconfigured("database", "database", "STOCKPILOT_DATABASE_URL")
    limit = timeout or settings.probe_timeout_s
    target = redact_url(url)
    where = hostport(url, 5432)
    shown = redactor(settings)

    async def run() -> ProbeResult:
        start = time.perf_counter()
        try:
            conn = await asyncpg.connect(**connect_args(url), timeout=limit)
        except asyncpg.PostgresError as exc:
            raise ProbeFailed(f"PostgreSQL at {where} refused the connection: {exc}") from None
        connect_ms = _ms(start)
        try:
            # The simple-query protocol: one round trip, no statement to prepare first
            # (a first fetchval prepares, which is several times the query's own time).
            start = time.perf_counter()
            await conn.execute("SELECT 1")
            query_ms = _ms(start)
            row = await conn.fetchrow(
                "SELECT current_setting('server_version') AS version,"
                " current_setting('max_connections')::int AS max_connections,"
                " (SELECT count(*) FROM pg_stat_activity"
                "  WHERE backend_type = 'client backend')::int AS in_use"
            )
        except BaseException:
            conn.terminate()
            raise
        await conn.close(timeout=limit)
        assert row is not None
        in_use, max_conn = int(row["in_use"]), int(row["max_connections"])
        used_pct = round(100.0 * in_use / max_conn, 1) if max_conn else 0.0
        reasons = []
        if query_ms > settings.database_slow_ms:
            reasons.append(f"query took {query_ms:.0f} ms (> {settings.database_slow_ms:g} ms)")
        if used_pct > settings.database_connections_pct:
            reasons.append(
                f"{used_pct:g} % of max_connections in use "
                f"(> {settings.database_connections_pct:g} %)"
            )
        status, error = _degraded(reasons)
        return ProbeResult(
            component="database",
            kind="database",
            status=status,
            latency_ms=query_ms,
            details={
                "target": target,
                "server_version": str(row["version"]),
                "connect_ms": connect_ms,
                "connections_in_use": in_use,
                "max_connections": max_conn,
                "connections_pct": used_pct,
            },
            error=error,
        )

    return await bounded("database", "database", target, limit, run, shown)


async def probe_redis(settings: HealthSettings, timeout: float | None = None) -> ProbeResult:
    """Redis: PING latency on an open connection (connect time apart), INFO memory used vs
    maxmemory, connected clients, version."""
    url = settings.redis_url
    if not url:
        return unconfigured("redis", "redis", "STOCKPILOT_REDIS_URL")
    limit = timeout or settings.probe_timeout_s
    target = redact_url(url)
    where = hostport(url, 6379)
    shown = redactor(settings)

    async def run() -> ProbeResult:
        client = Redis.from_url(
            url,
            socket_connect_timeout=limit,
            socket_timeout=limit,
            retry=Retry(NoBackoff(), 0),
            single_connection_client=True,
        )
        try:
            # Connect (and AUTH/HELLO) first, timed on its own: PING latency is then the
            # server's answer on an open connection, not the set-up (0.1 ms against ~100 ms
            # for a first connection, which read `degraded` on an idle local Redis).
            start = time.perf_counter()
            try:
                await client.initialize()
                connect_ms = _ms(start)
                start = time.perf_counter()
                await client.ping()
            except AuthenticationError as exc:
                raise ProbeFailed(f"Redis at {where} refused the credentials: {exc}") from None
            except ResponseError as exc:
                raise ProbeFailed(f"Redis at {where} refused PING: {exc}") from None
            except RedisConnectionError as exc:
                if "Connect call failed" in str(exc) or "refused" in str(exc):
                    raise ProbeFailed(
                        f"connection refused by {where}: is Redis running there?"
                    ) from None
                raise ProbeFailed(f"cannot connect to Redis at {where}: {exc}") from None
            ping_ms = _ms(start)
            try:
                info = await client.info()
            except ResponseError:  # INFO renamed away or not allowed by an ACL
                info = {}
        finally:
            await client.aclose()
        used = int(info.get("used_memory", 0))
        maxmemory = int(info.get("maxmemory", 0))
        memory_pct = round(100.0 * used / maxmemory, 1) if maxmemory else None
        reasons = []
        if ping_ms > settings.redis_slow_ms:
            reasons.append(f"PING took {ping_ms:.0f} ms (> {settings.redis_slow_ms:g} ms)")
        if memory_pct is not None and memory_pct > settings.redis_memory_pct:
            reasons.append(
                f"{memory_pct:g} % of maxmemory used (> {settings.redis_memory_pct:g} %)"
            )
        status, error = _degraded(reasons)
        return ProbeResult(
            component="redis",
            kind="redis",
            status=status,
            latency_ms=ping_ms,
            details={
                "target": target,
                "connect_ms": connect_ms,
                "version": str(info.get("redis_version", "unknown (INFO not allowed)")),
                "used_memory_bytes": used,
                "maxmemory_bytes": maxmemory,
                "memory_pct": memory_pct,
                "connected_clients": int(info.get("connected_clients", 0)),
            },
            error=error,
        )

    return await bounded("redis", "redis", target, limit, run, shown)


async def probe_openai(
    settings: HealthSettings, http: httpx.AsyncClient, timeout: float | None = None
) -> ProbeResult:
    """OpenAI: GET {base}/models with the key; 401 unhealthy, 429 degraded, 5xx unhealthy."""
    key = settings.openai_api_key
    if not key:
        return unconfigured("openai", "openai", "OPENAI_API_KEY")
    limit = timeout or settings.probe_timeout_s
    base = settings.openai_base_url.rstrip("/")
    target = redact_url(base)
    shown = redactor(settings)

    async def run() -> ProbeResult:
        start = time.perf_counter()
        response = await http.get(
            f"{base}/models", headers={"Authorization": f"Bearer {key}"}, timeout=limit
        )
        latency = _ms(start)
        code = response.status_code
        details: Details = {"target": target, "http_status": code}
        status: Status
        error: str | None
        if code == 200:
            try:
                models = msgspec.json.decode(response.content, type=_ModelList)
            except msgspec.DecodeError:
                raise ProbeFailed(
                    f"{target}/models answered 200 but not with a list of models"
                ) from None
            details["models"] = len(models.data)
            status, error = _degraded(
                [f"answered in {latency:.0f} ms (> {settings.openai_slow_ms:g} ms)"]
                if latency > settings.openai_slow_ms
                else []
            )
        else:
            if code == 401:
                status, error = "unhealthy", "invalid API key (401)"
            elif code == 403:
                status, error = "unhealthy", "the API key is not allowed to list models (403)"
            elif code == 429:
                status, error = "degraded", "rate limited (429)"
            elif code >= 500:
                status, error = "unhealthy", f"OpenAI server error ({code})"
            else:
                status, error = "unhealthy", f"unexpected answer {code} from {target}/models"
            said = excerpt(response.content, shown)
            if said:
                error = f"{error}: {said}"
        return ProbeResult(
            component="openai",
            kind="openai",
            status=status,
            latency_ms=latency,
            details=details,
            error=error,
        )

    return await bounded("openai", "openai", target, limit, run, shown)


class _ModelList(msgspec.Struct):
    data: list[msgspec.Raw]


async def probe_external(
    api: ExternalApi, settings: HealthSettings, http: httpx.AsyncClient
) -> ProbeResult:
    """One external API: its method and headers, its expected status, its own timeout."""
    component = f"external.{api.name}"
    limit = api.timeout_s or settings.probe_timeout_s
    target = redact_url(api.url)
    shown = redactor(settings) | Redactor(secrets_of(api))

    async def run() -> ProbeResult:
        start = time.perf_counter()
        response = await http.request(api.method, api.url, headers=api.headers, timeout=limit)
        latency = _ms(start)
        code = response.status_code
        if code != api.expect_status:
            status: Status = "unhealthy"
            error: str | None = f"answered {code}, expected {api.expect_status}"
            said = excerpt(response.content, shown)
            if said:
                error = f"{error}: {said}"
        else:
            status, error = _degraded(
                [f"answered in {latency:.0f} ms (> {settings.external_slow_ms:g} ms)"]
                if latency > settings.external_slow_ms
                else []
            )
        return ProbeResult(
            component=component,
            kind="external_api",
            status=status,
            latency_ms=latency,
            details={
                "target": target,
                "method": api.method,
                "http_status": code,
                "expect_status": api.expect_status,
            },
            error=error,
        )

    return await bounded(component, "external_api", target, limit, run, shown)


async def probe_all(settings: HealthSettings, http: httpx.AsyncClient) -> list[ProbeResult]:
    """Every probe at once; each is bounded by its own timeout, so none delays another."""
    return list(
        await asyncio.gather(
            probe_database(settings),
            probe_redis(settings),
            probe_openai(settings, http),
            *(probe_external(api, settings, http) for api in settings.external_apis),
        )
    )


def new_http_client() -> httpx.AsyncClient:
    """The HTTP client the probes share (no proxies from the environment; no redirects)."""
    # httpx logs every request's full URL at INFO; a probed URL may carry a key in its query.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return httpx.AsyncClient(trust_env=False, follow_redirects=False)
