"""``python -m visae.train``: the same as ``visae train``."""

import sys

from visae.train import main

sys.exit(main())
