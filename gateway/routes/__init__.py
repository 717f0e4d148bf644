"""Route modules, one per area."""

from __future__ import annotations

from litestar import Router

from gateway.routes import alerts, batch, dashboard, docs, health, metrics, system, usage


def all_routers() -> list[Router]:
    """Every router the app serves."""
    return [
        system.router,
        health.router,
        usage.router,
        batch.router,
        alerts.router,
        metrics.router,
        dashboard.router,
        docs.router,
    ]
