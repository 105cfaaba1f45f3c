"""Write (and optionally serve) a static site of named concepts with their top images.

``python scripts/browse.py --sae DIR --shards DIR [--concepts DIR] --out SITE [--serve] [--port N]``;
``--help`` lists every option (defaults in configs/browse.yaml). See docs/naming.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # this checkout's visae first

from visae.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["browse", *sys.argv[1:]]))  # = `visae browse`: one error handler (visae.cli)
