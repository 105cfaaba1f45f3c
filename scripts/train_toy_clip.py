"""Train the project's small CLIP on the toy world: python scripts/train_toy_clip.py --help"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # this checkout's visae first

from visae.toyclip import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
