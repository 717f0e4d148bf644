"""`python -m services.batch`: run the batch service until SIGINT/SIGTERM."""

from __future__ import annotations

import sys

from services.batch.service import build
from services.batch.settings import BatchSettings
from shared.runtime import service_main
from shared.settings import settings_or_exit


def main() -> int:
    """Load the settings (a bad one stops here with one line) and run the service."""
    settings = settings_or_exit(BatchSettings)
    return service_main(build, settings)


if __name__ == "__main__":
    sys.exit(main())
