"""Which path carries a transport's traffic, and how long a refused accelerator waits."""

from __future__ import annotations

from typing import Literal

TransportPath = Literal["accelerated", "nats-py"]
ACCELERATED: TransportPath = "accelerated"
NATS_PY: TransportPath = "nats-py"
# After the accelerator could not run, nats-py carries the traffic this long before the
# accelerator is tried again (a server restarted without TLS, a changed permission).
ACCELERATOR_RETRY_S = 60.0
# Accelerated reads in a row that ended without folding anything before the follower treats
# the accelerator as not working here (rather than reading again at once, for ever).
MAX_IDLE_READS = 3
