"""`python -m ops` is the `stockpilot` command."""

import sys

from ops.cli import main

sys.exit(main())
