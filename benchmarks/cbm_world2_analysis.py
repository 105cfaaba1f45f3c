"""Two analyses of ``bench_cbm_world2.py``'s output (BENCHMARKS.md, "Concept bottleneck classifier on world2").

    python benchmarks/cbm_world2_analysis.py probe  --out DIR [--n_train 10000,40000]
    python benchmarks/cbm_world2_analysis.py others --out DIR [--cbm cbm_40000]

``probe``: the clean linear probe (``visae.cbm.linear_probe``) on the bench's training prefixes and validation split at
several L2 strengths and step counts: whether the CBM's reference is under-fitted at the default ``probe_l2``.
``others``: for each class's top-concept removal, the signed largest change among the classes not using the removed
latent (a rise: images the concept had pulled in went back to their class) and how many of those classes' images
change prediction. ``DIR`` is the bench's ``--out`` (``DIR/train/shards``, ``DIR/val/shards``, ``DIR/cbm_<n>``;
the demo ``DIR/demo`` or ``--demo``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402,F401  (puts this checkout's visae first on the path)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _xy(path: Path, label: str = "family_shape") -> tuple[torch.Tensor, torch.Tensor]:
    from visae.shards import ShardSet

    ss = ShardSet(str(path))
    x = torch.from_numpy(np.asarray(ss.read(np.arange(len(ss))), np.float32))
    return x / x.norm(dim=-1, keepdim=True), torch.from_numpy(ss.metadata()[label].astype(np.int64))


def probe(out: Path, sizes: list[int]) -> None:
    from visae.cbm import _accuracy, linear_probe

    xv, yv = _xy(out / "val" / "shards")
    xt_all, yt_all = _xy(out / "train" / "shards")
    n_cls = int(max(yt_all.max(), yv.max())) + 1
    for n in sizes:
        xt, yt = xt_all[:n], yt_all[:n]
        for l2, steps in ((1e-4, 200), (1e-4, 1000), (1e-5, 1000), (1e-3, 1000), (0.0, 2000)):
            t = time.process_time()
            W, b = linear_probe(xt, yt, n_cls, l2=l2, max_iter=steps)
            print(f"n_train {n} probe_l2 {l2:g} max_iter {steps}: train {_accuracy(xt, yt, W, b):.4f} "
                  f"val {_accuracy(xv, yv, W, b):.4f} ({time.process_time() - t:.1f} CPU s)", flush=True)


def others(out: Path, cbm: str, demo: Path) -> None:
    from visae.cbm import load_cbm
    from visae.recovery import collect_codes
    from visae.sae import load_sae
    from visae.shards import ShardSet

    model, _ = load_cbm(str(out / cbm))
    ss = ShardSet(str(out / "val" / "shards"))
    sae = load_sae(str(demo / "sweep" / "best"))
    r, c, v = collect_codes(sae, ss)
    codes = torch.zeros(len(ss), sae.d_sae)
    codes[torch.from_numpy(r), torch.from_numpy(c)] = torch.from_numpy(v).float()
    y = torch.from_numpy(ss.metadata()["family_shape"].astype(np.int64))
    n_cls = model.n_classes if hasattr(model, "n_classes") else int(y.max()) + 1
    cnt = torch.bincount(y, minlength=n_cls).float().clamp(min=1)
    base = model.predict(codes)
    base_acc = torch.bincount(y[base == y], minlength=n_cls).float() / cnt
    worst, changed = [], []
    for k in range(n_cls):
        concepts = model.class_concepts(k)
        if not concepts:
            continue
        top = concepts[0]["latent"]
        users = {j for j in range(n_cls) if any(x["latent"] == top for x in model.class_concepts(j))}
        after = model.predict(codes, remove=[top])
        d = torch.bincount(y[after == y], minlength=n_cls).float() / cnt - base_acc
        rest = torch.tensor([j for j in range(n_cls) if j not in users])
        j = int(d[rest].abs().argmax())
        worst.append(float(d[rest][j]))
        m = torch.isin(y, rest)
        changed.append(int((after[m] != base[m]).sum()))
    w = np.array(worst)
    print(f"{len(w)} interventions: the largest change among non-using classes is a rise over 2 points in "
          f"{int((w > 0.02).sum())}, a fall over 2 points in {int((w < -0.02).sum())}; median |largest| "
          f"{np.median(np.abs(w)) * 100:.1f} points")
    print(f"non-using classes' images whose prediction changes, per intervention: median {np.median(changed):.0f}, "
          f"max {max(changed)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("probe", "others"))
    ap.add_argument("--out", required=True, help="bench_cbm_world2.py's --out")
    ap.add_argument("--n_train", default="10000,40000")
    ap.add_argument("--cbm", default="cbm_40000", help="the CBM directory under --out (others)")
    ap.add_argument("--demo", default=None, help="the world2 demo whose SAE the CBM uses (default: --out/demo)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    if a.what == "probe":
        probe(out, [int(s) for s in a.n_train.split(",")])
    else:
        others(out, a.cbm, Path(a.demo) if a.demo else out / "demo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
