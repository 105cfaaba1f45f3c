"""The whole pipeline on the toy world, offline: python scripts/demo.py [--quick] [--out demo_out]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # this checkout's visae first

from visae.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))  # = `visae demo`: one error handler (visae.cli)
