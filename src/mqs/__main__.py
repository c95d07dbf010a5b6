"""Run the `mqs` command line tool as ``python -m mqs``."""

import sys

from mqs.cli import main

sys.exit(main())
