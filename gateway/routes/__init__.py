"""Route modules, one per area."""

from __future__ import annotations

from litestar import Router

from gateway.routes import batch, health, system, usage


def all_routers() -> list[Router]:
    """Every router the app serves."""
    return [system.router, health.router, usage.router, batch.router]
