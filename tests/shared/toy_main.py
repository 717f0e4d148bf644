"""The toy service as its own OS process (for kill -9 tests): python -m tests.shared.toy_main."""

from __future__ import annotations

import sys
from typing import Any

from shared.runtime import ServiceDefinition, service_main
from shared.settings import CommonSettings, settings_or_exit
from tests.shared.toy import build


def _build(settings: Any) -> ServiceDefinition:
    del settings
    return build()[0]


if __name__ == "__main__":
    sys.exit(service_main(_build, settings_or_exit(CommonSettings)))
