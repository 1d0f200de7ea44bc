"""`python -m scaling ...` is `ministack scaling ...`."""

import sys

from scaling.cli import main

sys.exit(main())
