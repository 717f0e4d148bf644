"""The one NATS transport seam: following a stream, and pipelined JetStream publishes.

nats-py is the reference path. Our own wire protocol code (`shared.bare_nats`,
`shared.stream_reader`, `shared.bare_publisher`) is an accelerator behind this seam, several
times cheaper per message (BENCHMARKS.md), used when STOCKPILOT_NATS_ACCELERATOR is `on`
(the default) and it works: a follower or publisher whose accelerator cannot run here (TLS,
NKey or JWT credentials, a server that refuses it) goes on with nats-py and tries the
accelerator again after ACCELERATOR_RETRY_S, saying so in the log each time. `path` says
which one carries the traffic now; /status and /metrics show it per projection.

Both paths hold to one contract, tests/transport/ (every test runs against both): ordered
delivery from a start sequence, caught-up signalling, split frames, deleted messages and
lost consumers, server errors, a small `max_payload`, lame duck mode, restarts.
"""

from shared.bare_publisher import Published
from shared.transport.follow import OnEvent, StreamFollower, ack_metadata
from shared.transport.paths import ACCELERATED, ACCELERATOR_RETRY_S, NATS_PY, TransportPath
from shared.transport.publish import JetStreamPublisher

__all__ = [
    "ACCELERATED",
    "ACCELERATOR_RETRY_S",
    "NATS_PY",
    "JetStreamPublisher",
    "OnEvent",
    "Published",
    "StreamFollower",
    "TransportPath",
    "ack_metadata",
]
