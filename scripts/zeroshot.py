"""Zero-shot accuracy of a shard set and of SAE reconstructions: ``python scripts/zeroshot.py --shards DIR [--model NAME] [--sae DIR]``.

See docs/sweeps.md; ``--help`` lists every option.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # this checkout's visae first

from visae.zeroshot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
