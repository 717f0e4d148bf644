"""No secret leaves the stack, in any form: every secret the settings know is set with a
trailing newline (as `$(cat secret-file)` gives it), real loopback servers answer the probes
with errors that quote the credentials they were sent, an alert is delivered to a webhook and a
Slack-style receiver, and then every GET route, every message of every stream, KV bucket and
snapshot object store, every webhook body and header and every line the processes wrote is
searched for each secret: raw, stripped, repr-escaped (once and twice), JSON-escaped, percent-
and plus-encoded.

The forms come from shared.redact.forms (plus a few of the test's own); the search is a plain
substring search, independent of the redactor's own matching.
"""

from __future__ import annotations

import asyncio
import html
import importlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import msgspec
import nats
import psutil
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from gateway.settings import GatewaySettings
from ops import nats_auth
from ops.hook_delivery import SIGNATURE_HEADER, verify_signature
from ops.hooks import HookSettings
from ops.stack import CHILD_SETTINGS
from shared.connection import inbox_prefix
from shared.projection import decompress_snapshot
from shared.redact import forms
from shared.settings import env_name, load_settings
from tests.harness import free_port
from tests.health.targets import Reply, Target
from tests.ops.receiver import Receiver, receiving
from tests.security.careless import careless_postgres, careless_redis

ROOT = Path(__file__).parents[2]
NL = "\n"  # every secret is set with it, as a secret file read by `$(cat …)` ends

# Distinct values, so a form of one can never be mistaken for another's (or for anything
# the stack writes by itself). Passwords carry characters a URL must percent-encode.
OPENAI_KEY = "sk-sweep-openai-Q7d2Kx9Lm4Vb"
QUOTES_KEY = "quotes-key-sweep-R3t8Wp"  # an external API header given as env:QUOTES_TOKEN
QUOTES_URL_PASSWORD = "quotes-url-pw-sweep-B6"  # userinfo in an external API's URL
NEWS_BEARER = "news-bearer-sweep-H5j2Nc"  # an external API header written inline
NEWS_QUERY_KEY = "news-query-sweep-Z8m1Yq"  # an external API key in the URL's query
PG_URL_PASSWORD = "pg/url@sweep K4"
PG_DSN_PASSWORD = "pg dsn'sweep\\P9"
REDIS_PASSWORD = "redis/sweep@T6"
ADMIN_TOKEN = "admin-token-sweep-A1b2C3"
INGEST_TOKEN = "ingest-token-sweep-D4e5F6"
READ_TOKEN = "read-token-sweep-G7h8I9"
WEBHOOK_SECRET = "webhook-secret-sweep-J1k2"
WEBHOOK_URL_TOKEN = "webhook-url-token-sweep-L3m4"
SLACK_URL_TOKEN = "slack-url-token-sweep-N5o6"

# Every setting that holds a secret (or says where one is), as the stack below sets it; each
# value ends with a newline. `test_the_sweep_sets_every_secret_setting` keeps this complete.
SWEPT_VARIABLES = frozenset(
    {
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "STOCKPILOT_DATABASE_URL",
        "STOCKPILOT_REDIS_URL",
        "STOCKPILOT_EXTERNAL_APIS",
        "QUOTES_TOKEN",
        "STOCKPILOT_ADMIN_TOKEN",
        "STOCKPILOT_INGEST_TOKEN",
        "STOCKPILOT_READ_TOKEN",
        "STOCKPILOT_ALERT_WEBHOOK_URL",
        "STOCKPILOT_ALERT_WEBHOOK_SECRET",
        "STOCKPILOT_SLACK_WEBHOOK_URL",
    }
)
# Set by `stockpilot up` itself for each child: the embedded server's URL (no password in
# it) and the child's role password (the sweep looks for every role's password).
SET_BY_UP = frozenset({"STOCKPILOT_NATS_URL", "STOCKPILOT_NATS_PASSWORD"})
_SECRET_WORDS = {"token", "key", "password", "secret", "url", "dsn", "webhook", "apis"}

# A health.status_changed alert (with the probe's error) for each of these.
FAILING = ("database", "redis", "openai", "external.quotes", "external.news")


def dsn_value(value: str) -> str:
    """A libpq key/value DSN value, quoted."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def shapes(secret: str) -> set[str]:
    """What the sweep looks for: shared.redact's forms and a few of the test's own."""
    found = forms(secret) | forms(secret + NL)
    for core in (secret, secret.strip()):
        found |= {html.escape(core), html.escape(core, quote=False), quote(core, safe="@/")}
    return {s for s in found if len(s.strip()) >= 4}


@dataclass
class Sweep:
    """Every text the stack showed, by where it was seen."""

    texts: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.texts.append((where, text))

    def leaks(self, secrets: dict[str, str]) -> list[str]:
        """One line per form of a secret found, with how often and the first place."""
        found = []
        for name, secret in secrets.items():
            for shape in sorted(shapes(secret), key=len, reverse=True):
                places = [(where, text) for where, text in self.texts if shape in text]
                if places:
                    where, text = places[0]
                    at = text.index(shape)
                    around = text[max(0, at - 160) : at + len(shape) + 80]
                    found.append(
                        f"{name} as {shape!r} in {len(places)} place(s), first {where}: {around!r}"
                    )
        return found

    def joined(self, prefix: str) -> str:
        """Every text seen at a place starting with `prefix`, one after the other."""
        return "\n".join(text for where, text in self.texts if where.startswith(prefix))


# ----- the stack -------------------------------------------------------------------------


def start_stack(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ops", "up"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


async def stop_stack(up: subprocess.Popen[bytes]) -> None:
    children = psutil.Process(up.pid).children(recursive=True) if up.poll() is None else []
    if up.poll() is None:
        up.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(up.wait, 15)
        except subprocess.TimeoutExpired:
            up.kill()
            await asyncio.to_thread(up.wait)
    for child in children:
        if child.is_running():
            child.kill()


async def wait_until(what: str, check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Poll `check()` until it is true (sleeping on the loop, so the loopback servers keep
    serving the stack meanwhile)."""
    try:
        async with asyncio.timeout(timeout):
            # Processes outside this loop: nothing to wait on but their answers.
            while not await check():  # noqa: ASYNC110
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:g} s: {what}") from None


@dataclass
class Stack:
    """One `stockpilot up` and everything around it."""

    up: subprocess.Popen[bytes]
    env: dict[str, str]
    log: Path
    http: httpx.AsyncClient
    hook: Receiver
    slack: Receiver
    secrets: dict[str, str]

    @property
    def data(self) -> Path:
        return Path(self.env["STOCKPILOT_DATA_DIR"])


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for `token`."""
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(params=["url", "conninfo"])
def dsn_form(request: pytest.FixtureRequest) -> str:
    """How STOCKPILOT_DATABASE_URL is written: a postgresql:// URL or a key/value DSN."""
    form: str = request.param
    return form


@pytest.fixture
def redis_address(redis_url: str) -> tuple[str, int]:
    """Where the real Redis listens (it refuses the credentials of the conninfo variant)."""
    parts = urlsplit(redis_url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def alert_components(receiver: Receiver) -> set[str]:
    """The components whose `… is unhealthy` alert the receiver accepted."""
    seen = set()
    for request in receiver.accepted:
        for component in FAILING:
            if f"{component} is unhealthy".encode() in request.body:
                seen.add(component)
    return seen


@pytest.fixture
async def stack(
    tmp_path: Path, dsn_form: str, redis_address: tuple[str, int]
) -> AsyncIterator[Stack]:
    """`stockpilot up` with every secret set (each with a trailing newline), pointed at
    loopback servers that refuse the credentials and quote them back, once it serves."""
    openai = Target(Reply(status=401, echo_header="authorization"))
    quotes = Target(Reply(status=401, echo_header="x-api-key"))
    news = Target(Reply(status=403, echo_header="authorization"))
    async with (
        openai,
        quotes,
        news,
        careless_postgres() as pg_port,
        careless_redis() as careless_redis_port,
        receiving() as hook,
        receiving() as slack,
    ):
        redis_password = quote(REDIS_PASSWORD, safe="")
        if dsn_form == "url":
            database = (
                f"postgresql://sweeper:{quote(PG_URL_PASSWORD, safe='')}@127.0.0.1:{pg_port}/app"
            )
            pg_password = PG_URL_PASSWORD
            # The careless Redis quotes what it was sent; the other variant meets a real one.
            redis = f"redis://sweeper:{redis_password}@127.0.0.1:{careless_redis_port}/0"
        else:
            database = (
                f"host=127.0.0.1 port={pg_port} user=sweeper "
                f"password={dsn_value(PG_DSN_PASSWORD)} dbname=app"
            )
            pg_password = PG_DSN_PASSWORD
            host, port = redis_address
            redis = f"redis://sweeper:{redis_password}@{host}:{port}/0"
        apis = [
            {
                "name": "quotes",
                "url": f"http://quotes:{QUOTES_URL_PASSWORD}@127.0.0.1:{quotes.port}/v1/quotes",
                "headers": {"X-Api-Key": "env:QUOTES_TOKEN"},
            },
            {
                "name": "news",
                "url": f"{news.url}/v1/news?api_key={NEWS_QUERY_KEY}&lang=en",
                "headers": {"Authorization": f"Bearer {NEWS_BEARER}"},
            },
        ]
        webhook_url = f"http://127.0.0.1:{hook.port}/hook?token={WEBHOOK_URL_TOKEN}"
        slack_url = f"http://127.0.0.1:{slack.port}/services/T0SWEEP/B0SWEEP/{SLACK_URL_TOKEN}"
        settings = {
            "OPENAI_API_KEY": OPENAI_KEY + NL,
            "OPENAI_BASE_URL": f"{openai.url}/v1" + NL,
            "STOCKPILOT_DATABASE_URL": database + NL,
            "STOCKPILOT_REDIS_URL": redis + NL,
            "STOCKPILOT_EXTERNAL_APIS": json.dumps(apis) + NL,
            "QUOTES_TOKEN": QUOTES_KEY + NL,
            "STOCKPILOT_ADMIN_TOKEN": ADMIN_TOKEN + NL,
            "STOCKPILOT_INGEST_TOKEN": INGEST_TOKEN + NL,
            "STOCKPILOT_READ_TOKEN": READ_TOKEN + NL,
            "STOCKPILOT_ALERT_WEBHOOK_URL": webhook_url + NL,
            "STOCKPILOT_ALERT_WEBHOOK_SECRET": WEBHOOK_SECRET + NL,
            "STOCKPILOT_SLACK_WEBHOOK_URL": slack_url + NL,
        }
        assert set(settings) == SWEPT_VARIABLES
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("STOCKPILOT_", "OPENAI_"))
        } | {
            "STOCKPILOT_DATA_DIR": str(tmp_path / "data"),
            "STOCKPILOT_HTTP_PORT": str(free_port()),
            "STOCKPILOT_CONFIG": str(ROOT / "tests" / "empty.toml"),
            # Short rounds and snapshots, so one stack shows everything within seconds.
            "STOCKPILOT_HEALTH_INTERVAL_S": "1",
            "STOCKPILOT_SNAPSHOT_EVERY_S": "1",
            "STOCKPILOT_HOOK_RETRY_INITIAL_S": "0.1",
            **settings,
        }
        secrets = {
            "OPENAI_API_KEY": OPENAI_KEY,
            "database password": pg_password,
            "redis password": REDIS_PASSWORD,
            "QUOTES_TOKEN (env: header)": QUOTES_KEY,
            "quotes URL password": QUOTES_URL_PASSWORD,
            "news Authorization header": NEWS_BEARER,
            "news api_key query parameter": NEWS_QUERY_KEY,
            "STOCKPILOT_ADMIN_TOKEN": ADMIN_TOKEN,
            "STOCKPILOT_INGEST_TOKEN": INGEST_TOKEN,
            "STOCKPILOT_READ_TOKEN": READ_TOKEN,
            "STOCKPILOT_ALERT_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "STOCKPILOT_ALERT_WEBHOOK_URL": webhook_url,
            "webhook URL token": WEBHOOK_URL_TOKEN,
            "STOCKPILOT_SLACK_WEBHOOK_URL": slack_url,
            "Slack URL token": SLACK_URL_TOKEN,
        }
        log = tmp_path / "up.log"
        up = start_stack(env, log)
        base = f"http://127.0.0.1:{env['STOCKPILOT_HTTP_PORT']}"
        try:
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:

                async def serving() -> bool:
                    assert up.poll() is None, log.read_text(errors="replace")[-3000:]
                    try:
                        answer = await http.get("/api/v1/status", headers=bearer(READ_TOKEN))
                        services = answer.json()["services"]
                    except (httpx.HTTPError, KeyError, ValueError):
                        return False
                    return all(s["status"] == "up" for s in services.values())

                await wait_until("the stack serves", serving, timeout=60)
                passwords = json.loads((tmp_path / "data" / "credentials.json").read_text())
                secrets |= {f"NATS password of {role}": pw for role, pw in passwords.items()}
                yield Stack(up, env, log, http, hook, slack, secrets)
        finally:
            await stop_stack(up)


# ----- the sweep -------------------------------------------------------------------------

# Pages outside the OpenAPI document.
OTHER_PAGES = ("/", "/asyncapi.json", "/schema/openapi.json")


async def sweep_routes(stack: Stack, sweep: Sweep) -> None:
    """Every GET route of the OpenAPI document (and the pages outside it), with the read
    token; the health routes also with `?fresh=true` and the admin token."""
    http = stack.http
    schema = (await http.get("/schema/openapi.json", headers=bearer(READ_TOKEN))).json()
    gets = [path for path, item in schema["paths"].items() if "get" in item]
    assert "/api/v1/health/comprehensive" in gets and len(gets) > 15
    for path in [*gets, *OTHER_PAGES]:
        url = re.sub(r"\{[^}]+\}", "nightly-report", path)  # {job_id}, any later one
        if path == "/api/v1/alerts/stream":
            await sweep_sse(stack, url, sweep)
            continue
        answer = await http.get(url, headers=bearer(READ_TOKEN))
        assert answer.status_code < 500, (url, answer.text)
        sweep.add(f"GET {url} ({answer.status_code})", f"{answer.headers}\n{answer.text}")
        params = {
            p["name"] for p in schema["paths"].get(path, {}).get("get", {}).get("parameters", [])
        }
        if "fresh" in params:
            answer = await http.get(url, params={"fresh": "true"}, headers=bearer(ADMIN_TOKEN))
            assert answer.status_code < 500, (url, answer.text)
            sweep.add(f"GET {url}?fresh=true ({answer.status_code})", answer.text)


async def sweep_sse(stack: Stack, url: str, sweep: Sweep) -> None:
    """The alert stream from its start, until it has sent every alert stored so far."""
    stored = len(
        (
            await stack.http.get(
                "/api/v1/usage/alerts", params={"limit": 1000}, headers=bearer(READ_TOKEN)
            )
        ).json()["alerts"]
    )
    lines: list[str] = []
    events = 0
    async with asyncio.timeout(10):
        async with stack.http.stream(
            "GET", url, params={"since": "0"}, headers=bearer(READ_TOKEN)
        ) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append(line)
                events += line.startswith("data:")
                if events >= stored:
                    break
    sweep.add(f"GET {url}?since=0 (SSE, {events} events)", "\n".join(lines))


async def ops_connection(stack: Stack) -> NATS:
    """A connection to the stack's NATS as the ops user (who may read everything)."""
    passwords = json.loads((stack.data / "credentials.json").read_text())
    port = (stack.data / "nats.port").read_text().strip()
    return await nats.connect(
        f"nats://127.0.0.1:{port}",
        user="ops",
        password=passwords["ops"],
        inbox_prefix=inbox_prefix("ops"),
    )


async def sweep_nats(nc: NATS, sweep: Sweep) -> None:
    """Every message of every stream (the four, the KV buckets' and the object stores'),
    read as the ops user; and every snapshot object, decompressed."""
    js = nc.jetstream()
    names = []
    for info in await js.streams_info():
        name = info.config.name
        assert name is not None
        names.append(name)
        state = info.state
        for seq in range(max(state.first_seq, 1), state.last_seq + 1 if state.messages else 1):
            try:
                msg = await js.get_msg(name, seq)
            except NotFoundError:  # deleted or replaced (KV updates, object chunks)
                continue
            sweep.add(
                f"stream {name} #{seq} {msg.subject}",
                f"{msg.headers}\n{(msg.data or b'').decode('utf-8', 'replace')}",
            )
    assert set(nats_auth.EVENT_STREAMS) <= set(names)
    # The snapshots (every second here) of the services whose streams have events.
    objects: dict[str, bytes] = {}

    async def snapshotted() -> bool:
        for name in names:
            if name.startswith("OBJ_"):
                store = await js.object_store(name.removeprefix("OBJ_"))
                try:
                    listed = await store.list()
                except NotFoundError:  # no object yet
                    continue
                for entry in listed:
                    data = (await store.get(entry.name)).data or b""
                    objects[f"{name}/{entry.name}"] = decompress_snapshot(data)
        return {"health.health", "usage.usage"} <= {k.split("/")[1] for k in objects}

    await wait_until("the health and usage services took snapshots", snapshotted, 20)
    for where, data in objects.items():
        sweep.add(f"object {where}", data)


async def sweep_receivers(stack: Stack, sweep: Sweep) -> None:
    for name, receiver in (("webhook", stack.hook), ("slack", stack.slack)):
        for i, request in enumerate(receiver.requests):
            sweep.add(f"{name} request {i} headers", json.dumps(request.headers))
            sweep.add(f"{name} request {i} body", request.body)


async def provoke_and_sweep(stack: Stack, nc: NATS) -> Sweep:
    """Alerts delivered, then the routes, receivers, streams and dead letters swept."""
    http = stack.http
    # Dead letters are core NATS, stored nowhere: whatever is dead-lettered from now on.
    dead_letters: list[Msg] = []

    async def keep(msg: Msg) -> None:
        dead_letters.append(msg)

    await nc.subscribe("stockpilot.deadletter.>", cb=keep)
    # The ingest token (which ended with a newline) is the one a client sends without it.
    record = {
        "request_id": "sweep-1",
        "model": "gpt-4o-mini",
        "status_code": 401,
        "error_code": "invalid_api_key",
    }
    answer = await http.post("/api/v1/usage/records", json=record, headers=bearer(INGEST_TOKEN))
    assert answer.status_code == 202, answer.text

    async def alerted() -> bool:
        assert stack.up.poll() is None, stack.log.read_text(errors="replace")[-3000:]
        hooked, slacked = alert_components(stack.hook), alert_components(stack.slack)
        return hooked == slacked == set(FAILING)

    await wait_until("five alerts reached both receivers", alerted, timeout=60)

    sweep = Sweep()
    await sweep_routes(stack, sweep)
    # The probes met servers that refused the credentials and quoted them back: the sweep
    # looks at errors that did hold the secrets.
    shown = sweep.joined("GET /api/v1/health/comprehensive")
    for refusal in (
        "Incorrect API key provided: ",  # OpenAI and both external APIs
        "password authentication failed",  # PostgreSQL
        "invalid username-password pair",  # Redis
    ):
        assert refusal in shown, refusal
    await sweep_receivers(stack, sweep)
    assert "Incorrect API key provided: " in sweep.joined("webhook")
    # Signed with the secret as meant, without the file's newline.
    for request in stack.hook.accepted:
        signature = request.headers[SIGNATURE_HEADER.lower()]
        assert verify_signature(WEBHOOK_SECRET, request.body, signature)
    await sweep_nats(nc, sweep)
    for msg in dead_letters:
        sweep.add(f"dead letter on {msg.subject}", msg.data)
    return sweep


@pytest.mark.timeout(150)
async def test_no_secret_shows_anywhere_in_any_form(stack: Stack) -> None:
    nc = await ops_connection(stack)
    try:
        sweep = await provoke_and_sweep(stack, nc)
    finally:
        await nc.close()
    await stop_stack(stack.up)
    assert stack.up.returncode == 0, stack.log.read_text(errors="replace")[-3000:]
    # Every process's stdout and stderr, through the supervisor's output (read after the
    # stop, so the lines written on the way out are in).
    log = stack.log.read_text(errors="replace")
    for process in ("nats", "health", "usage", "batch", "hooks", "gateway"):
        assert f"{process:<8} | " in log, process
    sweep.add("log", log)

    leaks = sweep.leaks(stack.secrets)
    assert leaks == [], "\n".join(leaks)


def test_the_sweep_sets_every_secret_setting() -> None:
    """A secret setting added to any process's settings must be added to the sweep."""
    secret_settings = set()
    for module, name in CHILD_SETTINGS.values():
        cls = getattr(importlib.import_module(module), name)
        for item in msgspec.structs.fields(cls):
            if set(item.name.split("_")) & _SECRET_WORDS:
                secret_settings.add(env_name(cls, item.name))
    assert "STOCKPILOT_ALERT_WEBHOOK_SECRET" in secret_settings
    assert secret_settings - SET_BY_UP <= SWEPT_VARIABLES


def test_secrets_read_from_files_lose_their_trailing_newline() -> None:
    """The token a client sends, the URL a hook posts to, the password NATS checks: none
    of them has the newline a secret file ends with."""
    env = {
        "STOCKPILOT_CONFIG": str(ROOT / "tests" / "empty.toml"),
        "STOCKPILOT_ADMIN_TOKEN": ADMIN_TOKEN + NL,
        "STOCKPILOT_INGEST_TOKEN": " " + INGEST_TOKEN + "\r\n",
        "STOCKPILOT_READ_TOKEN": READ_TOKEN + NL,
        "STOCKPILOT_NATS_PASSWORD": "nats-pw-sweep" + NL,
        "STOCKPILOT_ALERT_WEBHOOK_URL": "https://hooks.example/x?token=t" + NL,
        "STOCKPILOT_ALERT_WEBHOOK_SECRET": WEBHOOK_SECRET + NL,
        "STOCKPILOT_SLACK_WEBHOOK_URL": "https://hooks.slack.example/T/B/x" + NL,
    }
    gateway = load_settings(GatewaySettings, env)
    assert (gateway.admin_token, gateway.ingest_token, gateway.read_token) == (
        ADMIN_TOKEN,
        INGEST_TOKEN,
        READ_TOKEN,
    )
    assert gateway.nats_password == "nats-pw-sweep"
    hooks = load_settings(HookSettings, env)
    assert hooks.alert_webhook_url == "https://hooks.example/x?token=t"
    assert hooks.alert_webhook_secret == WEBHOOK_SECRET
    assert hooks.slack_webhook_url == "https://hooks.slack.example/T/B/x"
