"""`python -m vlmkit ...`: the same as the `vlmkit` command."""

import sys

from vlmkit.cli import main

sys.exit(main())
