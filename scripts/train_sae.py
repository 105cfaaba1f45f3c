"""Train an SAE on a shard set: ``python scripts/train_sae.py --shards DIR --out DIR [--num_epochs 200 ...]``.

Defaults come from configs/train_sae.yaml; ``--help`` lists every option. See docs/training.md.
"""

import sys
from pathlib import Path

# Put the repo root in place of scripts/ on the path: scripts/ holds files named like
# stdlib modules (select.py) that would otherwise shadow them.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from visae.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
