"""What the generated OpenAPI schema leaves out: the gateway's real error answers.

Litestar documents a 400 "Validation Exception" on routes with parameters, but the gateway
answers invalid input with 422 (contract §4) and every route can also answer 401/403 (tokens),
404, 409, 413 or 503 (a service not answering), all as `{"status_code", "detail"}`. Clients
generated from the schema, and schema-driven fuzzers, must see those.
"""

from __future__ import annotations

from litestar.openapi.spec import (
    OpenAPI,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    RequestBody,
    Schema,
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
