"""Name each SAE latent by matching its decoder direction to text embeddings.

``python scripts/name_concepts.py --sae DIR [--model NAME] [--vocab FILE] --out DIR``; ``--help`` lists every
option (defaults in configs/naming.yaml). See docs/naming.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # this checkout's visae first

from visae.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["name", *sys.argv[1:]]))  # = `visae name`: one error handler (visae.cli)
