"""Train a grid of SAEs and select the best: ``python scripts/sweep.py --config configs/sweep_dncbm.yaml --shards DIR``.

See docs/sweeps.md; ``--help`` lists every option.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # this checkout's visae first

from visae.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))  # = `visae sweep`: one error handler (visae.cli)
