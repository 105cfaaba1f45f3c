"""Train an SAE on a shard set: ``python scripts/train_sae.py --shards DIR --out DIR [--num_epochs 200 ...]``.

Defaults come from configs/train_sae.yaml; ``--help`` lists every option. See docs/training.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # this checkout's visae first

from visae.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))  # = `visae train`: one error handler (visae.cli)
