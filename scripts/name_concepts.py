"""Name each SAE latent by matching its decoder direction to text embeddings.

``python scripts/name_concepts.py --sae DIR [--model NAME] [--vocab FILE] --out DIR``; ``--help`` lists every
option (defaults in configs/naming.yaml). See docs/naming.md.
"""

import os
import sys

# This checkout's visae first, scripts/ off the path (its select.py would shadow the stdlib's select).
_here = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.realpath(p or ".") != _here]

from visae.naming import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
