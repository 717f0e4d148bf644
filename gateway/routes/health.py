"""The /api/v1/health routes (filled in by the health service issue)."""

from __future__ import annotations

from litestar import Router

router = Router(path="/api/v1", route_handlers=[])
