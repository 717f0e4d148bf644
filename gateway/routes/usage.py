"""The /api/v1/usage routes (filled in by the usage service issue)."""

from __future__ import annotations

from litestar import Router

router = Router(path="/api/v1", route_handlers=[])
