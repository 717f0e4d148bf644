"""Per-process NATS credentials: services run under theirs; nobody publishes what isn't theirs."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import nats
import pytest

from ops import nats_auth
from services.usage.client import UsageRecorder
from shared.connection import inbox_prefix
from shared.publish import publish_event
from shared.settings import CommonSettings, load_settings
from shared.streams import STREAMS, provision
from tests.clocks import NOON
from tests.harness import free_port, nats_server_binary, running_service, wait_for_port
from tests.shared.toy import Counted, build
from tests.usage.helpers import recorded

# Any past instant does, nothing here depends on the day: three hours before the run's noon
# (tests.clocks.NOON), never a literal date.
T0 = NOON - timedelta(hours=3)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    port = free_port()
    config, passwords = nats_auth.generate(tmp_path, port)
    server = subprocess.Popen(
        [nats_server_binary(), "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port("127.0.0.1", port)
    yield port, passwords
    server.terminate()
    server.wait(timeout=10)


async def connect(port: int, user: str, password: str) -> nats.NATS:
    async def quiet(exc: Exception) -> None:
        pass

    return await nats.connect(
        f"nats://127.0.0.1:{port}",
        user=user,
        password=password,
        error_cb=quiet,
        inbox_prefix=inbox_prefix(user),
    )


def test_config_and_credentials_are_private(tmp_path: Path) -> None:
    config, passwords = nats_auth.generate(tmp_path, 4222)
    assert config.stat().st_mode & 0o077 == 0
    assert (tmp_path / "credentials.json").stat().st_mode & 0o077 == 0
    assert json.loads((tmp_path / "credentials.json").read_text()) == passwords
    assert set(passwords) == {
        "producer",
        "observer",
        "health",
        "usage",
        "batch",
        "gateway",
        "hooks",
        "ops",
    }


async def test_service_runs_under_its_own_credentials(
    secured: tuple[int, dict[str, str]], tmp_path: Path
) -> None:
    port, passwords = secured
    settings = load_settings(
        CommonSettings,
        {
            "STOCKPILOT_NATS_URL": f"nats://127.0.0.1:{port}",
            "STOCKPILOT_NATS_USER": "usage",
            "STOCKPILOT_NATS_PASSWORD": passwords["usage"],
            "STOCKPILOT_CONFIG": str(Path(__file__).parents[1] / "empty.toml"),
        },
    )
    admin = await connect(port, "ops", passwords["ops"])
    await provision(admin.jetstream())  # what `stockpilot up` does before the services
    await admin.close()
    definition, projection = build()  # a service named "usage" on the real runtime
    client = await connect(port, "producer", passwords["producer"])
    async with running_service(definition, settings):
        js = client.jetstream()
        for i in range(5):
            event = Counted(id=f"e{i}", occurred_at=T0, model="m", status_code=200)
            await publish_event(js, "stockpilot.usage.recorded", event)
        for _ in range(100):
            if projection.view.count == 5:
                break
            await asyncio.sleep(0.02)
        assert projection.view.count == 5
        gateway = await connect(port, "gateway", passwords["gateway"])
        answer = await gateway.request("stockpilot.svc.usage.count", b"{}", timeout=2)
        assert json.loads(answer.data)["count"] == 5
        await gateway.close()
    await client.close()


async def test_the_usage_client_publishes_over_its_bare_connection_as_producer(
    secured: tuple[int, dict[str, str]],
) -> None:
    port, passwords = secured
    admin = await connect(port, "ops", passwords["ops"])
    await provision(admin.jetstream())
    nc = await connect(port, "producer", passwords["producer"])
    recorder = UsageRecorder(nc)
    recorder.start()
    for i in range(300):
        recorder.record(recorded(i, T0))
    await asyncio.wait_for(recorder.flush(), timeout=10)
    # The bare connection carried them, under the same user and permissions.
    assert recorder.connection == "bare"
    await recorder.close()
    assert (recorder.published, recorder.dropped) == (300, 0)
    info = await admin.jetstream().stream_info("STOCKPILOT_USAGE")
    assert info.state.messages == 300
    await nc.close()
    await admin.close()


@pytest.mark.parametrize(
    ("user", "subject"),
    [
        ("gateway", "stockpilot.usage.recorded"),
        ("usage", "stockpilot.batch.run.nightly"),
        ("health", "stockpilot.alerts.usage.cost_warning"),
        ("producer", "stockpilot.health.checked.database"),
    ],
)
async def test_publishing_outside_ones_subjects_is_refused(
    secured: tuple[int, dict[str, str]], user: str, subject: str
) -> None:
    port, passwords = secured
    admin = await connect(port, "ops", passwords["ops"])
    await provision(admin.jetstream())
    nc = await connect(port, user, passwords[user])
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await nc.jetstream().publish(subject, b"{}", timeout=0.5)
    await nc.close()
    stream = next(s for s in STREAMS.values() if subject.startswith(s.subjects[0][:-1]))
    info = await admin.jetstream().stream_info(stream.name)
    assert info.state.messages == 0
    await admin.close()


async def test_services_cannot_delete_the_history(secured: tuple[int, dict[str, str]]) -> None:
    port, passwords = secured
    admin = await connect(port, "ops", passwords["ops"])
    await provision(admin.jetstream())
    nc = await connect(port, "usage", passwords["usage"])
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await nc.jetstream().delete_stream("STOCKPILOT_USAGE")
    assert (await admin.jetstream().stream_info("STOCKPILOT_USAGE")).config.name
    await nc.close()
    await admin.close()
