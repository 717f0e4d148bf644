"""The /api/v1/batch routes (filled in by the batch service issue)."""

from __future__ import annotations

from litestar import Router

router = Router(path="/api/v1", route_handlers=[])
