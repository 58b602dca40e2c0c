"""`python -m corematching`: the `corematching` command (the demo without arguments: what `make demo` runs)."""

import sys

from .apps.cli import main

sys.exit(main())
