"""Extract activations of a vision model over images into a shard set (see docs/extraction.md).

    python scripts/extract_features.py --model ViT-B-32 --pretrained laion2b_s34b_b79k --images DIR --out DIR
    torchrun --nproc_per_node 2 scripts/extract_features.py ...
"""
import os
import sys

# scripts/ must not shadow standard modules (e.g. a scripts/select.py hides stdlib `select`)
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from visae.extract import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
