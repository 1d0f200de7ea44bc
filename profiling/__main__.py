"""`python -m profiling ...` is `ministack flops ...`."""

import sys

from profiling.cli import main

sys.exit(main())
