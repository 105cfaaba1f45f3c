"""Write (and optionally serve) a static site of named concepts with their top images.

``python scripts/browse.py --sae DIR --shards DIR [--concepts DIR] --out SITE [--serve true] [--port N]``;
``--help`` lists every option (defaults in configs/browse.yaml). See docs/naming.md.
"""

import os
import sys

# This checkout's visae first, scripts/ off the path (its select.py would shadow the stdlib's select).
_here = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.realpath(p or ".") != _here]

from visae.browse import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
