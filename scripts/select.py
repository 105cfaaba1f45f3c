"""Re-select the best SAE of a sweep: ``python scripts/select.py --sweep DIR [--max_l0 N] [--max_dead F]``.

Scores are cached per trial, so this never retrains; see docs/sweeps.md.
"""

import os
import sys

# This checkout's visae first, scripts/ off the path (its select.py would shadow the stdlib's select).
_here = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.realpath(p or ".") != _here]

from visae.select import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
