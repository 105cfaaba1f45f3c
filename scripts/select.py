"""Re-select the best SAE of a sweep: ``python scripts/select.py --sweep DIR [--max_l0 N] [--max_dead F]``.

Scores are cached per trial, so this never retrains; see docs/sweeps.md.
"""

import sys
from pathlib import Path

# This file's name would shadow the standard library's `select` module (imported by
# subprocess, hence by torch): drop the scripts/ directory from the import path first.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

from visae.select import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
