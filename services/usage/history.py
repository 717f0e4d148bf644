"""Alert history: every alert on STOCKPILOT_ALERTS (all sources), newest kept, deduplicated."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from shared.events import Alert
from shared.projection import NOTHING_FIRED, View

HISTORY_LIMIT = 1_000

decode_alert = msgspec.json.Decoder(Alert).decode


class AlertHistory(View, kw_only=True):
    """Alerts by id in arrival order, at most HISTORY_LIMIT (plus slack before trimming)."""

    alerts: dict[str, Alert] = {}
    seen_total: int = 0


def apply_alert(view: AlertHistory, alert: Alert, seq: int) -> Sequence[Alert]:
    """Keep the alert unless its id is already held; trim the oldest past the bound. Fires
    nothing (the alerts are what it folds)."""
    if alert.id in view.alerts:
        return NOTHING_FIRED
    view.alerts[alert.id] = alert
    view.seen_total += 1
    # Trimming in batches keeps this O(1) amortised (dict deletes from the front are not).
    if len(view.alerts) > HISTORY_LIMIT + HISTORY_LIMIT // 10:
        kept = list(view.alerts.items())[-HISTORY_LIMIT:]
        view.alerts = dict(kept)
    return NOTHING_FIRED
