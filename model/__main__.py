"""`python -m model ...` is `ministack sample ...`."""

import sys

from model.sample import main

sys.exit(main())
