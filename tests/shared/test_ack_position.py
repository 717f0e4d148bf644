"""The runtime reads a JetStream message's position from its reply subject like nats-py does."""

import pytest
from nats.aio.msg import Msg

from shared.runtime import ack_position


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.STOCKPILOT_USAGE.c1.1.42.7.1700000000000000000.99",
        "$JS.ACK._.HASH.STOCKPILOT_USAGE.c1.1.42.7.1700000000000000000.99.rnd",
        "$JS.ACK.hub.HASH.STOCKPILOT_USAGE.c1.1.42.7.1700000000000000000.0",
    ],
)
def test_ack_position_matches_nats_py_metadata(reply: str) -> None:
    msg = Msg(None, subject="stockpilot.usage.recorded", reply=reply)  # type: ignore[arg-type]
    meta = msg.metadata
    assert ack_position(msg) == (meta.sequence.stream, meta.num_pending)
