"""Train an SAE on a shard set: ``python scripts/train_sae.py --shards DIR --out DIR [--num_epochs 200 ...]``.

Defaults come from configs/train_sae.yaml; ``--help`` lists every option. See docs/training.md.
"""

import os
import sys

# This checkout's visae first, scripts/ off the path (its select.py would shadow the stdlib's select).
_here = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.realpath(p or ".") != _here]

from visae.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
