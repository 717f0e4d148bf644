"""What the generated OpenAPI schema leaves out: the gateway's real error answers.

Why one module of over 300 lines: it is everything the generated schema needs added (errors,
exact inputs, tokens), applied to one document by `gateway.app`; the inputs part is most of
it, and split, the three passes over the same document would live apart.

Litestar documents a 400 "Validation Exception" on routes with parameters, but the gateway
answers invalid input with 422 (contract §4) and every route can also answer 401/403 (tokens),
404, 409, 413 or 503 (a service not answering), all as `{"status_code", "detail"}`. Clients
generated from the schema, and schema-driven fuzzers, must see those.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import msgspec
from litestar import Litestar
from litestar.openapi.spec import (
    OpenAPI,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Parameter,
    RequestBody,
    Schema,
    SecurityScheme,
)

ERROR_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    required=["status_code", "detail"],
    properties={
        "status_code": Schema(type=OpenAPIType.INTEGER),
        "detail": Schema(type=OpenAPIType.STRING),
        "extra": Schema(one_of=[Schema(type=OpenAPIType.ARRAY), Schema(type=OpenAPIType.NULL)]),
    },
    description="An error: the HTTP status and what was wrong",
)
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _error(description: str) -> OpenAPIResponse:
    return OpenAPIResponse(
        description=description,
        content={"application/json": OpenAPIMediaType(schema=ERROR_SCHEMA)},
    )


def _allows_null(body: RequestBody) -> bool:
    for media in (body.content or {}).values():
        schema = media.schema
        if isinstance(schema, Schema) and any(
            isinstance(s, Schema) and s.type == OpenAPIType.NULL for s in schema.one_of or []
        ):
            return True
    return False


def document_errors(openapi: OpenAPI) -> None:
    """Document 422 instead of 400 and every other error status as `default`, in place."""
    for path_item in (openapi.paths or {}).values():
        for method in _METHODS:
            operation = getattr(path_item, method, None)
            if operation is None or operation.responses is None:
                continue
            if operation.responses.pop("400", None) is not None:
                operation.responses["422"] = _error("Invalid parameters or body")
            operation.responses.setdefault(
                "default",
                _error("Any other error: 401/403 tokens, 404, 409, 413, 503 service unavailable"),
            )
            body = operation.request_body
            # `data: JSONBody[X | None] = None` is optional, though Litestar marks it required.
            if isinstance(body, RequestBody) and body.required and _allows_null(body):
                body.required = False


# ----- inputs: what the gateway accepts, exactly ------------------------------------------

# Python's str.isprintable(), which usage names must pass (services.usage.contract), as a
# pattern: the printable characters listed as ranges of literal characters, computed from
# this Python's own Unicode tables so schema and server agree to the code point (a `\p{C}`
# class would follow the regex engine's Unicode version instead).
PRINTABLE_NAME = "PrintableText"


def printable_pattern() -> str:
    """`^[...]*$` over exactly the characters for which str.isprintable() is true."""
    ranges: list[tuple[int, int]] = []
    start: int | None = None
    for code in range(sys.maxunicode + 2):
        printable = code <= sys.maxunicode and chr(code).isprintable()
        if printable and start is None:
            start = code
        elif not printable and start is not None:
            ranges.append((start, code - 1))
            start = None
    parts = [chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in ranges]
    return "^[" + "".join(parts) + "]*$"


# Days and times the usage routes take (gateway.routes.usage): years 2000 to 2999.
DATE_PATTERN = r"^2[0-9]{3}-[0-9]{2}-[0-9]{2}$"
DATE_TIME_PATTERN = r"^2[0-9]{3}-[0-9]{2}-[0-9]{2}[Tt ]"
_PRINTABLE_FIELDS = (
    "id",
    "model",
    "request_id",
    "endpoint",
    "user_id",
    "error_code",
    "task_type",
)
_RECORDS_PATH = "/api/v1/usage/records"
_RESET_PATH = "/api/v1/usage/reset"
_RELEASE_PATH = "/api/v1/batch/jobs/{job_id}/lock/release"
_BATCH_BODIES = (
    ("/api/v1/batch/jobs/{job_id}/runs", "RunBody", "One report of a run"),
    ("/api/v1/batch/jobs/{job_id}/lock/acquire", "LockBody", "Who takes the lock, how long"),
    ("/api/v1/batch/jobs/{job_id}/lock/renew", "LockTokenBody", "Whose lock, its token, how long"),
    ("/api/v1/batch/jobs/{job_id}/lock/release-mine", "LockTokenBody", "Whose lock, its token"),
)


def _printable(schema: dict[str, Any]) -> None:
    """Make a string schema, or the string branch of a union, refer to PrintableText."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "string":
            branch["allOf"] = [{"$ref": REF_TEMPLATE.format(name=PRINTABLE_NAME)}]


def _input_schemas() -> dict[str, Any]:
    """The request body schemas, from the very structs that decode the bodies."""
    from gateway.routes.batch import ReleaseBody
    from gateway.routes.usage import ResetBody
    from services.batch.contract import LockBody, RunBody
    from services.usage.contract import UsageRecordedIn

    _, components = msgspec.json.schema_components(
        (UsageRecordedIn, ResetBody, ReleaseBody, RunBody, LockBody), ref_template=REF_TEMPLATE
    )
    record = components["UsageRecordedIn"]
    record["title"] = "UsageRecord"
    record["description"] = (
        "One LLM call (contract §4, usage.recorded). `type` may be left out; `id` defaults "
        "to `request_id` (the gateway assigns one when both are missing: such a record is "
        "not protected against duplicates); `occurred_at` defaults to when the gateway "
        "received it and must not be more than 5 minutes after that, nor before 2000-01-01. "
        "Names must not contain control or other non-printable characters. Other fields are "
        "ignored (a newer client may post to an older gateway)."
    )
    for name in _PRINTABLE_FIELDS:
        _printable(record["properties"][name])
    _printable(record["properties"]["tags"]["items"])  # each tag is a name too
    for branch in record["properties"]["occurred_at"]["anyOf"]:
        if branch.get("type") == "string":
            branch["pattern"] = DATE_TIME_PATTERN
    components[PRINTABLE_NAME] = {
        "type": "string",
        # A name for generators that cannot afford the long pattern (tests/faults'
        # schemathesis hooks register one); validators ignore a format they do not know.
        "format": "printable",
        "pattern": printable_pattern(),
        "description": (
            "Text without control or other non-printable characters: what Python's "
            "str.isprintable() accepts (no character of the Unicode categories Other or "
            "Separator but the ASCII space)"
        ),
    }
    # Renew and release-mine name the lock: its fencing token is required there (not null).
    token_body = msgspec.json.decode(msgspec.json.encode(components["LockBody"]))
    token_body["title"] = "LockTokenBody"
    token_body["required"] = sorted({*token_body.get("required", []), "fencing_token"})
    token_body["properties"]["fencing_token"] = {"type": "integer", "minimum": 1}
    components["LockTokenBody"] = token_body
    reset = components["ResetBody"]
    reset["properties"]["scope"] = {"enum": ["all"], "default": "all"}
    return components


REF_TEMPLATE = "#/components/schemas/{name}"


def _json_body(schema: dict[str, Any], description: str, required: bool) -> RequestBody:
    return RequestBody(
        content={"application/json": OpenAPIMediaType(schema=schema)},  # type: ignore[arg-type]
        description=description,
        required=required,
    )


def _string_parameter(parameter: Parameter, schema: dict[str, Any]) -> None:
    """Replace a string parameter's schema, keeping `null` where it was optional."""
    parameter.schema = schema if parameter.required else {"anyOf": [schema, {"type": "null"}]}  # type: ignore[assignment]


def describe_inputs(openapi: OpenAPI) -> None:
    """Request bodies, patterns, formats and `additionalProperties` as the server enforces
    them, in place: Litestar cannot see bodies read from the raw request, nor the checks
    that routes make themselves (job ids, dates)."""
    from shared.events import JOB_ID_PATTERN

    schemas = _input_schemas()
    components = openapi.components
    if components.schemas is None:
        components.schemas = {}
    for name, schema in schemas.items():
        components.schemas[name if name != "UsageRecordedIn" else "UsageRecord"] = schema
    record_ref = {"$ref": REF_TEMPLATE.format(name="UsageRecord")}
    paths = openapi.paths or {}

    records = paths[_RECORDS_PATH].post
    assert records is not None
    records.request_body = _json_body(
        {
            "oneOf": [
                record_ref,
                {
                    "type": "array",
                    "maxItems": 1000,
                    "items": {},
                    "description": (
                        "Up to 1,000 records, each validated on its own: the answer (202) "
                        "lists every item that is not a valid UsageRecord in `rejected`"
                    ),
                },
            ]
        },
        "One record (refused: 422 with the reason) or a list of records (202)",
        required=True,
    )
    reset = paths[_RESET_PATH].post
    assert reset is not None
    reset.request_body = _json_body(
        {"$ref": REF_TEMPLATE.format(name="ResetBody")},
        "Optional; an empty body resets everything",
        required=False,
    )
    release = paths[_RELEASE_PATH].post
    assert release is not None
    release.request_body = _json_body(
        {"anyOf": [{"$ref": REF_TEMPLATE.format(name="ReleaseBody")}, {"type": "null"}]},
        "Optional: why the lock is forced open",
        required=False,
    )

    # The runs and locks of jobs in any language: their bounds (ttl_s > 0, an execution id's
    # characters) as the structs that decode them state them.
    for path, name, what in _BATCH_BODIES:
        operation = paths[path].post
        assert operation is not None
        operation.request_body = _json_body(
            {"$ref": REF_TEMPLATE.format(name=name)}, what, required=True
        )

    job_id = {"type": "string", "pattern": JOB_ID_PATTERN, "minLength": 1, "maxLength": 64}
    day = {
        "type": "string",
        "format": "date",
        "pattern": DATE_PATTERN,
        "description": (
            "A day YYYY-MM-DD (years 2000-2999); `date` or `start`/`end`, not both; start "
            "not after end, at most 90 days"
        ),
    }
    moment = {
        "anyOf": [
            day,
            {"type": "string", "format": "date-time", "pattern": DATE_TIME_PATTERN},
        ],
        "description": (
            "A date YYYY-MM-DD or an RFC 3339 time (years 2000-2999); start before end, "
            "at most 90 days"
        ),
    }
    # The spend log's window: no 90-day bound (a page reads a bounded part of the stream).
    window = {
        "anyOf": moment["anyOf"],
        "description": (
            "A date YYYY-MM-DD (a whole day in STOCKPILOT_TZ; `end` inclusive) or an RFC 3339 "
            "time (`end` exclusive), years 2000-2999, on each call's occurred_at; start before "
            "end"
        ),
    }
    for path, item in paths.items():
        for method in _METHODS:
            operation = getattr(item, method, None)
            if operation is None:
                continue
            for parameter in operation.parameters or []:
                if not isinstance(parameter, Parameter):
                    continue
                if parameter.name == "job_id":
                    _string_parameter(parameter, job_id)
                elif path == "/api/v1/usage/stats" and parameter.name in ("date", "start", "end"):
                    _string_parameter(parameter, day)
                elif path == "/api/v1/usage/timeseries" and parameter.name in ("start", "end"):
                    _string_parameter(parameter, moment)
                elif (
                    path == _RECORDS_PATH
                    and method == "get"
                    and parameter.name
                    in (
                        "start",
                        "end",
                    )
                ):
                    _string_parameter(parameter, window)
                elif path == "/api/v1/usage/timeseries" and parameter.name == "bucket":
                    parameter.schema = Schema(
                        enum=["hour", "day"], default="hour", type=OpenAPIType.STRING
                    )


# ----- tokens ------------------------------------------------------------------------------

SECURITY_SCHEMES = {
    "adminToken": "STOCKPILOT_ADMIN_TOKEN: every mutating route (and every other one)",
    "ingestToken": "STOCKPILOT_INGEST_TOKEN: POST /api/v1/usage/records",
    "readToken": "STOCKPILOT_READ_TOKEN: GET routes, only when the gateway sets one",
}
# Which tokens each guard takes; `{}` (no token) where the guard lets anyone through by default.
_GUARD_SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "admin_guard": [{"adminToken": []}],
    "ingest_guard": [{"ingestToken": []}, {"adminToken": []}],
    "read_guard": [{}, {"readToken": []}, {"adminToken": []}],
}
_PATH_TYPES = re.compile(r"\{(\w+):\w+\}")


def document_security(app: Litestar) -> None:
    """Bearer-token requirements of each operation, from the guards its handler runs."""
    openapi = app.openapi_schema
    components = openapi.components
    components.security_schemes = {
        name: SecurityScheme(type="http", scheme="bearer", description=description)
        for name, description in SECURITY_SCHEMES.items()
    }
    paths = openapi.paths or {}
    for route in app.routes:
        item = paths.get(_PATH_TYPES.sub(r"{\1}", route.path))
        if item is None:
            continue
        for handler in getattr(route, "route_handlers", []):
            guards = {guard.__name__ for guard in handler.resolve_guards()}
            security = next((_GUARD_SECURITY[g] for g in _GUARD_SECURITY if g in guards), None)
            for method in handler.http_methods:
                operation = getattr(item, method.lower(), None)
                if operation is not None and security is not None:
                    operation.security = security
