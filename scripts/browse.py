"""Write (and optionally serve) a static site of named concepts with their top images.

``python scripts/browse.py --sae DIR --shards DIR [--concepts DIR] --out SITE [--serve true] [--port N]``;
``--help`` lists every option (defaults in configs/browse.yaml). See docs/naming.md.
"""

import sys
from pathlib import Path

# the repo root instead of scripts/ (whose select.py would shadow the standard library's select)
sys.path[0] = str(Path(__file__).resolve().parents[1])

from visae.browse import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
