"""Upper bound for a single patch latent on the toy world: the best linear direction, image score = max over
patches of (w . x + b) (an SAE latent is a ReLU of one), fitted to the image labels by logistic regression
(multiple-instance: BCE on the max), AUROC on held-out images (the last 30 %).

    python benchmarks/probe_patch_concepts.py SHARDS [factors, default shape,colour,size,background]

SHARDS: a toy-world patch-token shard set (`visae extract --source toyworld --layer L --token patch`). Positives of
shape / colour: any object (main or second) has the value. Measured in BENCHMARKS.md, "Patch heatmaps on the toy
world (issue 14)".
"""

import sys

import numpy as np
import torch

from visae import toyworld as tw
from visae.recovery import sparse_auroc
from visae.shards import ShardSet
from visae.topimages import patch_layout


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact AUROC (mid-ranks for ties) through visae.recovery.sparse_auroc, scores shifted to be > 0."""
    v = scores.astype(np.float64) - scores.min() + 1.0
    return float(sparse_auroc(np.arange(len(v)), np.zeros(len(v), np.int64), v, labels[:, None], 1)[0, 0])


def main() -> None:
    torch.manual_seed(0)
    ss = ShardSet(sys.argv[1])
    facs = (sys.argv[2] if len(sys.argv) > 2 else "shape,colour,size,background").split(",")
    meta = ss.metadata()
    img, patch = patch_layout(meta["id"])
    first = np.flatnonzero(patch == 0)
    n, P = len(first), int(patch.max()) + 1
    X = torch.from_numpy(np.concatenate([b.acts for b in ss.sequential_batches(65536)]).astype(np.float32)).reshape(n, P, -1)
    fr = np.stack([np.asarray(meta[f])[first] for f in tw.FACTORS], 1)
    tr = np.arange(n) < int(0.7 * n)
    for fac in facs:
        res = []
        for v, vn in enumerate(tw.FACTORS[fac]):
            lab = fr[:, tw.FACTOR_INDEX[fac]] == v
            if fac + "2" in tw.FACTOR_INDEX and fac != "position":
                lab = lab | (fr[:, tw.FACTOR_INDEX[fac + "2"]] == v)
            y = torch.from_numpy(lab.astype(np.float32))
            w = (0.01 * torch.randn(X.shape[2])).requires_grad_()
            b = torch.zeros(1, requires_grad=True)
            opt = torch.optim.Adam([w, b], lr=0.02)
            for _ in range(600):
                opt.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits((X[tr] @ w + b).amax(1), y[tr])
                loss.backward()
                opt.step()
            with torch.no_grad():
                s = (X @ w + b).amax(1).numpy()
            res.append(f"{vn} {_auroc(lab[~tr], s[~tr]):.3f}/{_auroc(lab[tr], s[tr]):.3f}")
        print(f"{fac} (held-out/train AUROC):", "  ".join(res), flush=True)


if __name__ == "__main__":
    main()
