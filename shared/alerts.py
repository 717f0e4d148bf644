"""The alert ledger: which alert ids a service has already raised, folded from STOCKPILOT_ALERTS.

Alerts have deterministic ids, so JetStream's duplicate window stores a repeat once; the
ledger covers what the window cannot: a replica or a restart that derives an alert hours
after it was first raised checks here and stays quiet.
"""

from __future__ import annotations

import msgspec

from shared.events import Alert
from shared.projection import Projection, View
from shared.streams import STREAMS

LEDGER_LIMIT = 100_000

decode_alert = msgspec.json.Decoder(Alert).decode


class AlertLedger(View, kw_only=True):
    """Alert ids seen, oldest first (bounded)."""

    ids: dict[str, int] = {}


def apply_alert(ledger: AlertLedger, alert: Alert) -> AlertLedger:
    """Remember an alert id, forgetting the oldest past the bound."""
    if alert.id not in ledger.ids:
        ledger.ids[alert.id] = ledger.last_seq + 1
        if len(ledger.ids) > LEDGER_LIMIT:
            del ledger.ids[next(iter(ledger.ids))]
    return ledger


def alert_ledger(source: str) -> Projection[AlertLedger, Alert]:
    """The ledger of one source's alerts (`stockpilot.alerts.<source>.>`)."""
    return Projection(
        name=f"{source}-alert-ledger",
        stream=STREAMS["alerts"],
        view_type=AlertLedger,
        decode=decode_alert,
        apply=apply_alert,
        filter_subject=f"stockpilot.alerts.{source}.>",
    )
