"""`python -m services.health`: the health service process."""

from __future__ import annotations

import sys

from services.health.service import build
from services.health.settings import HealthSettings
from shared.runtime import service_main
from shared.settings import settings_or_exit


def main() -> int:
    """Run the health service until SIGINT/SIGTERM; the exit status."""
    return service_main(build, settings_or_exit(HealthSettings))


if __name__ == "__main__":
    sys.exit(main())
