"""Train a grid of SAEs and select the best: ``python scripts/sweep.py --config configs/sweep_dncbm.yaml --shards DIR``.

See docs/sweeps.md; ``--help`` lists every option.
"""

import os
import sys

# This checkout's visae first, scripts/ off the path (its select.py would shadow the stdlib's select).
_here = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.realpath(p or ".") != _here]

from visae.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
