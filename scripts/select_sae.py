"""Re-select the best SAE of a sweep: ``python scripts/select_sae.py --sweep DIR [--max_l0 N] [--max_dead F]``.

Scores are cached per trial, so this never retrains; see docs/sweeps.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # this checkout's visae first

from visae.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))  # = `visae select`: one error handler (visae.cli)
