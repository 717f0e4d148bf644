"""The published OpenAPI schema says what the gateway accepts: bodies, patterns, formats.

Pure: the schema is built without NATS and checked with a JSON Schema validator
(jsonschema-rs, what schemathesis validates with) against the same inputs the server takes
or refuses. The live sweep is tests/faults/test_bad_input.py.
"""

from __future__ import annotations

import re
import sys
from datetime import timedelta
from typing import Any

import jsonschema_rs
import msgspec
import pytest

from gateway.app import create_app
from gateway.openapi import printable_pattern
from gateway.routes.usage import LAST_YEAR
from gateway.settings import GatewaySettings
from services.usage.contract import IngestParams
from services.usage.decide import records_to_events
from shared.events import EARLIEST, JOB_ID_RE, rfc3339
from shared.settings import load_settings
from tests.clocks import NOON


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    settings = load_settings(GatewaySettings, {"STOCKPILOT_NATS_URL": "nats://127.0.0.1:1"})
    document: dict[str, Any] = create_app(settings).openapi_schema.to_schema()
    return document


def validator(schema: dict[str, Any], sub: dict[str, Any]) -> Any:
    """A validator of `sub` that resolves `#/components/...` in the whole document."""
    return jsonschema_rs.validator_for(
        {**sub, "components": schema["components"]}, validate_formats=True
    )


def operation(schema: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    found: dict[str, Any] = schema["paths"][path][method]
    return found


def body_schema(schema: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    body = operation(schema, method, path)["requestBody"]
    found: dict[str, Any] = body["content"]["application/json"]["schema"]
    return found


def accepted_by_ingest(record: Any) -> bool:
    """Whether the usage service's own validation takes the record (one posted alone)."""
    events, rejected = records_to_events(
        IngestParams(records=msgspec.Raw(msgspec.json.encode([record])), received_at=NOON),
        lambda: "assigned",
    )
    return bool(events) and not rejected


RECORDS: list[tuple[Any, bool]] = [
    ({"model": "gpt-4o", "status_code": 200}, True),
    ({"model": "gpt-4o-mini", "status_code": 200, "prompt_tokens": 12.0}, True),  # 12.0 is 12
    ({"model": "모델 é", "status_code": 0, "user_id": "u-42", "extra": [1]}, True),
    ({"model": "gpt\r\nX: 1", "status_code": 200}, False),
    ({"model": "gpt-4o", "status_code": 200, "user_id": "a\u00a0b"}, False),
    ({"model": "", "status_code": 200}, False),
    ({"model": "m", "status_code": 1000}, False),
    ({"model": "m", "status_code": 200, "prompt_tokens": 1.5}, False),
    ({"model": "m", "status_code": 200, "prompt_tokens": 10**9}, False),
    ({"model": "m", "status_code": 200, "cost_usd": -0.01}, False),
    (
        {"model": "m", "status_code": 200, "occurred_at": rfc3339(EARLIEST - timedelta(hours=1))},
        False,
    ),
    ({"model": "m", "status_code": 200, "occurred_at": "yesterday"}, False),
    ({"status_code": 200}, False),
    ({"model": "m", "status_code": 200, "type": "usage.reset"}, False),
]


@pytest.mark.parametrize(("record", "accepted"), RECORDS)
def test_the_record_schema_and_the_ingest_validation_agree(
    schema: dict[str, Any], record: Any, accepted: bool
) -> None:
    body = validator(schema, body_schema(schema, "post", "/api/v1/usage/records"))
    assert body.is_valid(record) is accepted
    assert accepted_by_ingest(record) is accepted


def test_a_list_of_records_is_any_list_of_up_to_a_thousand(schema: dict[str, Any]) -> None:
    """A list answers 202 and names each refused item: the schema does not refuse items."""
    body = validator(schema, body_schema(schema, "post", "/api/v1/usage/records"))
    assert body.is_valid([{"model": "m", "status_code": 200}, "not a record", None])
    assert not body.is_valid([{}] * 1001)
    assert not body.is_valid("a string")
    assert operation(schema, "post", "/api/v1/usage/records")["requestBody"]["required"]


def test_bodies_that_refuse_extra_fields_say_so(schema: dict[str, Any]) -> None:
    reset = validator(schema, body_schema(schema, "post", "/api/v1/usage/reset"))
    assert reset.is_valid({"scope": "all", "reason": "month end"})
    assert not reset.is_valid({"scope": "some"})
    assert not reset.is_valid({"scope": "all", "force": True})
    assert not operation(schema, "post", "/api/v1/usage/reset")["requestBody"]["required"]
    path = "/api/v1/batch/jobs/{job_id}/lock/release"
    release = validator(schema, body_schema(schema, "post", path))
    assert release.is_valid({"reason": "stuck"}) and release.is_valid(None)
    assert not release.is_valid({"reason": "stuck", "owner": "me"})
    assert not release.is_valid({"reason": "r" * 501})


def test_every_job_id_parameter_has_the_subject_token_pattern(schema: dict[str, Any]) -> None:
    found = []
    for item in schema["paths"].values():
        for op in item.values():
            for parameter in op.get("parameters", []):
                if parameter["name"] == "job_id":
                    found.append(parameter)
                    check = validator(schema, parameter["schema"])
                    for job_id in ("nightly_sync-2", "a" * 64, "a.b", "a" * 65, "", "x y"):
                        assert check.is_valid(job_id) is bool(JOB_ID_RE.fullmatch(job_id))
    assert len(found) >= 4  # lock status, release, recent and stats


def test_usage_days_and_times_have_formats(schema: dict[str, Any]) -> None:
    stats = {
        p["name"]: validator(schema, p["schema"])
        for p in operation(schema, "get", "/api/v1/usage/stats")["parameters"]
    }
    day = NOON.date().isoformat()
    assert stats["date"].is_valid(day)
    year = NOON.year
    before = (EARLIEST - timedelta(days=1)).date().isoformat()
    for bad in (f"{year}-02-30", before, f"{LAST_YEAR + 1}-01-01", "26-1-1", rfc3339(NOON)):
        assert not stats["date"].is_valid(bad), bad
    series = {
        p["name"]: (p["schema"], validator(schema, p["schema"]))
        for p in operation(schema, "get", "/api/v1/usage/timeseries")["parameters"]
    }
    start = series["start"][1]
    assert start.is_valid(day) and start.is_valid(f"{day}T09:00:00+09:00")
    assert not start.is_valid("noon") and not start.is_valid("0999-01-01T00:00:00Z")
    assert series["bucket"][0]["enum"] == ["hour", "day"]


def test_the_printable_pattern_is_str_isprintable_to_the_code_point() -> None:
    pattern = re.compile(printable_pattern())
    differ = [
        code
        for code in range(sys.maxunicode + 1)
        if (pattern.fullmatch(chr(code)) is not None) is not chr(code).isprintable()
    ]
    assert differ == []
    # The same pattern in the JSON Schema engine schemathesis validates with.
    check = jsonschema_rs.validator_for({"type": "string", "pattern": printable_pattern()})
    assert check.is_valid("gpt-4o-mini 모델 ü")
    for bad in ("a\x00", "a\u2028b", "\u202eevil", chr(0xDC7BC)):
        assert not check.is_valid(bad)


def test_the_schema_is_json_and_every_reference_resolves(schema: dict[str, Any]) -> None:
    text = msgspec.json.encode(schema).decode()
    names = set(schema["components"]["schemas"])
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', text))
    assert refs and refs <= names, refs - names


def test_token_requirements_follow_the_guards(schema: dict[str, Any]) -> None:
    schemes = schema["components"]["securitySchemes"]
    assert {s["scheme"] for s in schemes.values()} == {"bearer"}
    assert operation(schema, "post", "/api/v1/usage/reset")["security"] == [{"adminToken": []}]
    ingest = operation(schema, "post", "/api/v1/usage/records")["security"]
    assert ingest == [{"ingestToken": []}, {"adminToken": []}]
    # GET routes are open unless STOCKPILOT_READ_TOKEN is set: no token is one alternative.
    assert {} in operation(schema, "get", "/api/v1/usage/stats")["security"]
    assert "security" not in operation(schema, "get", "/api/v1/health/live")
