"""`python -m model.flops ...` is `ministack flops ...`."""

import sys

from model.flops.cli import main

sys.exit(main())
