"""Train the project's small CLIP on the toy world: python scripts/train_toy_clip.py --help"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # this checkout's visae first

from visae.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train-toy-clip", *sys.argv[1:]]))  # = `visae train-toy-clip`: one error handler (visae.cli)
