"""Train the project's small CLIP on the toy world: python scripts/train_toy_clip.py --help"""
import os
import sys

# This checkout's visae first, scripts/ off the path (its select.py would shadow the stdlib's select).
_here = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.realpath(p or ".") != _here]

from visae.toyclip import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
