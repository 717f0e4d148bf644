"""`/metrics` parses with prometheus-client's own parser and agrees with the REST answers."""

from __future__ import annotations

from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.settings import GatewaySettings
from shared.settings import CommonSettings, load_settings
from shared.testing import running_service
from tests.gateway.test_system_routes import wait_connected
from tests.shared.toy import build


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_parse_and_match_status(env: dict[str, str]) -> None:
    definition, _ = build()  # the runtime's toy service, registered as "usage"
    async with AsyncTestClient(create_app(load_settings(GatewaySettings, env))) as client:
        await wait_connected(client)
        async with running_service(definition, load_settings(CommonSettings, env)):
            await client.get("/api/v1/status")
            response = await client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            found = samples(response.text)
            assert found[("stockpilot_service_up", (("service", "usage"),))] == 1.0
            assert found[("stockpilot_service_up", (("service", "batch"),))] == 0.0
            lag_key = (
                "stockpilot_projection_lag_events",
                (("projection", "toy"), ("service", "usage")),
            )
            assert found[lag_key] == 0.0
            requests = [
                value
                for (name, labels), value in found.items()
                if name == "stockpilot_gateway_requests_total"
                and ("path", "/api/v1/status") in labels
            ]
            assert requests and sum(requests) >= 1
