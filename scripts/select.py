"""Re-select the best SAE of a sweep: ``python scripts/select.py --sweep DIR [--max_l0 N] [--max_dead F]``.

Scores are cached per trial, so this never retrains; see docs/sweeps.md.
"""

import sys
from pathlib import Path

# the repo root instead of scripts/: this file's name would shadow the standard library's
# `select` module (imported by subprocess, hence by torch)
sys.path[0] = str(Path(__file__).resolve().parents[1])

from visae.select import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
