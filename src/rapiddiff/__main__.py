"""`python -m rapiddiff ...`: the `rapiddiff` command (so `torchrun -m rapiddiff generate ...` works too)."""

import sys

from rapiddiff.cli import main

sys.exit(main())
