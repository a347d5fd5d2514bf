"""`python -m server.cli ARGS`: the `hmem` command, for a checkout without the console script."""

import sys

from server.cli import main

sys.exit(main())
