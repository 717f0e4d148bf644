"""`python -m services.usage`: the usage service process."""

from __future__ import annotations

import sys

from services.usage.service import build
from services.usage.settings import UsageSettings
from shared.runtime import service_main
from shared.settings import settings_or_exit


def main() -> int:
    """Run the usage service until SIGINT/SIGTERM."""
    settings = settings_or_exit(UsageSettings)
    return service_main(build, settings)


if __name__ == "__main__":
    sys.exit(main())
