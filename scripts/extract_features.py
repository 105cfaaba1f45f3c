"""Extract activations of a vision model over images into a shard set (see docs/extraction.md).

    python scripts/extract_features.py --model ViT-B-32 --pretrained laion2b_s34b_b79k --images DIR --out DIR
    torchrun --nproc_per_node 2 scripts/extract_features.py ...
"""
import os
import sys

# This checkout's visae first, scripts/ off the path (its select.py would shadow the stdlib's select).
_here = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.realpath(p or ".") != _here]

from visae.extract import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
