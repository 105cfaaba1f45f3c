"""Name each SAE latent by matching its decoder direction to text embeddings.

``python scripts/name_concepts.py --sae DIR [--model NAME] [--vocab FILE] --out DIR``; ``--help`` lists every
option (defaults in configs/naming.yaml). See docs/naming.md.
"""

import sys
from pathlib import Path

# the repo root instead of scripts/ (whose select.py would shadow the standard library's select)
sys.path[0] = str(Path(__file__).resolve().parents[1])

from visae.naming import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
