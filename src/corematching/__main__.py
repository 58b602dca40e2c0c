"""`python -m corematching`: the demo without arguments (what `make demo` runs) or after the word `demo`; anything
else is the `corematching` command."""

import sys

from .cli import main
from .demo import main as demo_main
from .demo import wants_demo

sys.exit(demo_main(sys.argv[1:]) if wants_demo(sys.argv[1:]) else main())
