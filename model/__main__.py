"""`python -m model ...` is `ministack sample ...`."""

import sys

from profiling.threads import configure_openmp

configure_openmp()  # before torch loads: the OpenMP runtime reads its wait policy once

from model.sample import main  # noqa: E402

sys.exit(main())
