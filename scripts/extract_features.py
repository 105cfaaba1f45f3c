"""Extract activations of a vision model over images into a shard set (see docs/extraction.md).

    python scripts/extract_features.py --model ViT-B-32 --pretrained laion2b_s34b_b79k --images DIR --out DIR
    torchrun --nproc_per_node 2 scripts/extract_features.py ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # this checkout's visae first

from visae.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))  # = `visae extract`: one error handler (visae.cli)
