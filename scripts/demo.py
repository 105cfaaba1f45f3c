"""The whole pipeline on the toy world, offline: python scripts/demo.py [--quick true] [--out demo_out]"""
import os
import sys

# Python puts this folder first on sys.path; keep it off, so sibling scripts named like
# standard modules (e.g. select.py) cannot shadow them.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from visae.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
