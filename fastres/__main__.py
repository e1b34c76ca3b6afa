"""`python -m fastres`: the same command line as the `fastres` console script."""

import sys

from .cli import main

sys.exit(main())
