"""`python -m train ...` is `ministack train ...` (and what `accelerate launch -m train` runs)."""

import sys

from train.cli import main

sys.exit(main())
