"""`GET /asyncapi.json`: the event side's description, next to the HTTP side's `/schema`.

Built once from the event structs (gateway.asyncapi) when the gateway starts; public like the
OpenAPI document, since it says what may be sent, not what was.
"""

from __future__ import annotations

from functools import cache

from litestar import MediaType, Response, Router, get

from gateway.asyncapi import render


@cache
def _document() -> bytes:
    return render()


@get("/asyncapi.json", include_in_schema=False, media_type=MediaType.JSON)
async def asyncapi_document() -> Response[bytes]:
    """The AsyncAPI 3 document of every subject, event, header and role."""
    return Response(_document(), media_type=MediaType.JSON)


router = Router(path="/", route_handlers=[asyncapi_document])
