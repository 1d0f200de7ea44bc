"""`python -m scaling ...` is `ministack scaling ...`."""

import sys

from profiling.threads import configure_openmp

configure_openmp()  # before torch loads: the OpenMP runtime reads its wait policy once

from scaling.cli import main  # noqa: E402

sys.exit(main())
