"""Zero-shot accuracy of a shard set and of SAE reconstructions: ``python scripts/zeroshot.py --shards DIR [--model NAME] [--sae DIR]``.

See docs/sweeps.md; ``--help`` lists every option.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # this checkout's visae first

from visae.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["zeroshot", *sys.argv[1:]]))  # = `visae zeroshot`: one error handler (visae.cli)
