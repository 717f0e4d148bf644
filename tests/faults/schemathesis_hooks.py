"""Schemathesis hooks for the sweep (tests/faults/test_bad_input.py): the rules no schema states.

OpenAPI describes each parameter and body on its own. Two rules of the gateway are beyond
it: a usage record's `occurred_at` may not be after now (+ 5 minutes), which moves, and the
usage ranges (`?date=` or `?start=&end=`, start before end, at most 90 days) tie parameters
together. A schema-valid request that breaks one is rightly refused with 422, so the
positive cases (those that claim "this must be accepted") are moved inside these rules; a
case that already keeps them, and every negative case, is sent as generated.

Also the generator of the `printable` string format. Loaded by the schemathesis process
through SCHEMATHESIS_HOOKS.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import jsonschema_rs
import msgspec
import schemathesis
from hypothesis import strategies as st

from services.usage import queries, spend_log
from services.usage.contract import SpendLogParams, StatsParams, TimeseriesParams
from services.usage.settings import UsageSettings
from services.usage.view import UsageView
from shared.errors import InvalidRequestError
from shared.events import EARLIEST

# The schema's PrintableText carries `format: printable` beside its pattern (every character
# str.isprintable() accepts, listed): drawn from the character categories, as the pattern
# says, it costs a fraction of generating from a class of 700 ranges.
schemathesis.openapi.format(
    "printable",
    st.text(
        st.characters(
            exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"),
            include_characters=" ",
        )
    ),
)

SETTINGS = UsageSettings()  # the sweep's gateway runs in UTC, like these defaults


def _moment(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _record_in_time(record: object, now: datetime) -> None:
    """A single record dated outside [2000-01-01, now] is dated a day ago instead."""
    if not isinstance(record, dict):
        return
    at = _moment(record.get("occurred_at"))
    if at is not None and not EARLIEST <= at <= now:
        record["occurred_at"] = (now - timedelta(days=1)).isoformat()


def _stats_in_range(query: dict[str, Any], now: datetime) -> None:
    params = StatsParams(date=query.get("date"), start=query.get("start"), end=query.get("end"))
    try:
        queries.day_range(params, now.date())
    except InvalidRequestError:
        for name in ("date", "start", "end"):
            query.pop(name, None)
        query["date"] = (now - timedelta(days=1)).date().isoformat()


def _timeseries_in_range(query: dict[str, Any], now: datetime) -> None:
    params = TimeseriesParams(
        bucket=query.get("bucket", "hour"), start=query.get("start"), end=query.get("end")
    )
    try:
        queries.timeseries(UsageView(), params, now, SETTINGS)
    except InvalidRequestError:
        query.pop("start", None)
        query.pop("end", None)


def _spend_log_in_rules(query: dict[str, Any]) -> None:
    """The spend log's window must be a real date or time with start before end, and a
    cursor is one the log handed out (any other is refused, as the contract says)."""
    query.pop("cursor", None)
    try:
        spend_log.read_query(
            SpendLogParams(start=query.get("start"), end=query.get("end")), ZoneInfo("UTC")
        )
    except (InvalidRequestError, msgspec.ValidationError):
        query.pop("start", None)
        query.pop("end", None)


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """Positive cases kept inside the rules above (see the module's docstring)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    now = datetime.now(UTC)
    path = case.operation.path
    if path == "/api/v1/usage/records" and case.method.upper() == "GET":
        if isinstance(case.query, dict):
            _spend_log_in_rules(case.query)
    elif path == "/api/v1/usage/records" and isinstance(case.body, dict):
        _record_in_time(case.body, now)
    elif path == "/api/v1/usage/stats" and isinstance(case.query, dict):
        _stats_in_range(case.query, now)
    elif path == "/api/v1/usage/timeseries" and isinstance(case.query, dict):
        _timeseries_in_range(case.query, now)
    return case


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    """Drop a "negative" ingest body that the schema in fact accepts.

    Negating `format: printable` cannot be generated (the format is ours), so the negative
    phase sometimes sends a printable name as if it broke the pattern ("¤0"), and reports the
    server's 202 as a schema violation accepted. Such a case is checked against the
    operation's own body schema (patterns included; formats are annotations): only a body the
    schema really refuses stays a negative case.
    """
    meta = case.meta
    if meta is None or meta.generation.mode.is_positive:
        return True
    if case.operation.path != "/api/v1/usage/records" or not isinstance(case.body, dict):
        return True
    spec = case.operation.schema.raw_schema
    body = spec["paths"][case.operation.path]["post"]["requestBody"]["content"]
    root = {"components": spec["components"], "allOf": [body["application/json"]["schema"]]}
    return not jsonschema_rs.Draft202012Validator(root).is_valid(case.body)
