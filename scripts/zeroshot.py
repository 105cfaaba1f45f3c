"""Zero-shot accuracy of a shard set and of SAE reconstructions: ``python scripts/zeroshot.py --shards DIR [--model NAME] [--sae DIR]``.

See docs/sweeps.md; ``--help`` lists every option.
"""

import sys
from pathlib import Path

# the repo root instead of scripts/ (whose select.py would shadow the standard library's select)
sys.path[0] = str(Path(__file__).resolve().parents[1])

from visae.zeroshot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
