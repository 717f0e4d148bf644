"""The alert ledger: which alert ids a service has already raised, folded from STOCKPILOT_ALERTS.

Alerts have deterministic ids, so JetStream's duplicate window stores a repeat once; the
ledger covers what the window cannot: a replica or a restart that derives an alert hours
after it was first raised checks here and stays quiet.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from shared.events import Alert
from shared.projection import NOTHING_FIRED, Projection, View
from shared.streams import STREAMS

LEDGER_LIMIT = 100_000
# Bumped when the fold's meaning or the view's layout changes (see Projection.version).
# 2: an id's value is the stream sequence of its alert (it was the ledger's last_seq + 1,
# which differs once other sources' alerts interleave on the stream).
LEDGER_VERSION = "2"

decode_alert = msgspec.json.Decoder(Alert).decode


class AlertLedger(View, kw_only=True):
    """Alert ids seen, oldest first (bounded), each with the stream sequence it was stored at."""

    ids: dict[str, int] = {}


def apply_alert(ledger: AlertLedger, alert: Alert, seq: int) -> Sequence[Alert]:
    """Remember an alert id, forgetting the oldest past the bound; fires nothing."""
    if alert.id not in ledger.ids:
        ledger.ids[alert.id] = seq
        if len(ledger.ids) > LEDGER_LIMIT:
            del ledger.ids[next(iter(ledger.ids))]
    return NOTHING_FIRED


def alert_ledger(source: str) -> Projection[AlertLedger, Alert]:
    """The ledger of one source's alerts (`stockpilot.alerts.<source>.>`)."""
    return Projection(
        name=f"{source}-alert-ledger",
        stream=STREAMS["alerts"],
        view_type=AlertLedger,
        decode=decode_alert,
        apply=apply_alert,
        filter_subject=f"stockpilot.alerts.{source}.>",
        version=LEDGER_VERSION,
    )
