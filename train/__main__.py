"""`python -m train ...` is `ministack train ...` (and what `accelerate launch -m train` runs)."""

import sys

from profiling.threads import configure_openmp

configure_openmp()  # before torch loads: the OpenMP runtime reads its wait policy once

from train.cli import main  # noqa: E402

sys.exit(main())
