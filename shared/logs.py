"""Log set-up shared by every process: one line per record, prefixed by the process name."""

from __future__ import annotations

import logging
import sys


def configure_logging(process: str, level: str = "INFO") -> None:
    """Send logs to stderr as `time level process: message`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s %(levelname)s {process}: %(message)s", datefmt="%Y-%m-%dT%H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # nats-py logs every reconnect attempt at ERROR with a traceback; our callbacks say it once.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
