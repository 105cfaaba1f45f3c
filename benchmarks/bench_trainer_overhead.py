"""What the trainer's loop costs on top of the bare SAE step.

Side by side, alternating (``benchlib.alternate``), medians of ``--repeats`` rounds:
  bare       : training_loss -> backward -> remove_parallel_grad_ -> torch.optim.Adam -> normalize_decoder_,
               on one in-memory batch (no loader, no schedules, no metrics);
  bare+stacked: the same with visae.optim.StackedAdam and a per-step lr tensor;
  trainer    : visae.train.train_stack from a shard set on disk (loader, schedules, dead-latent tracking,
               metrics every --log_every steps), timed by the trainer itself (act/s of its hot loop).

    python benchmarks/bench_trainer_overhead.py --d_in 256 --expansion 8 --batch 2048 --steps 20
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import numpy as np
import torch


def bare(sae, x, steps, stacked):
    from visae.optim import StackedAdam

    params = list(sae.parameters())
    if stacked:
        opt = StackedAdam(params, lr=1e-4)
        lr = torch.tensor([1e-4], dtype=torch.float64)
    else:
        opt = torch.optim.Adam(params, lr=1e-4)
    t = time.perf_counter()
    for _ in range(steps):
        out = sae.training_loss(x, 1e-3)
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step(lr) if stacked else opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
    float(out.loss.detach())
    return steps * x.shape[0] / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d_in", type=int, default=256)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--log_every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from visae.sae import SAEConfig, build_sae
    from visae.shards import ShardSet, ShardWriter
    from visae.train import TrainConfig, sae_config_for, train_stack

    d, B = args.d_in, args.batch
    n = B * (args.steps + 1)
    tmp = Path(tempfile.mkdtemp(prefix="visae-bench-"))
    rng = np.random.default_rng(0)
    with ShardWriter(tmp / "s", d, dtype="float16", shard_size=65536) as w:
        for s in range(0, n, 65536):
            m = min(65536, n - s)
            w.add(rng.standard_normal((m, d)).astype(np.float32), ids=[str(i) for i in range(s, s + m)])
    ss = ShardSet(tmp / "s")
    x = torch.from_numpy(ss.read(np.arange(B)))
    cfg_sae = SAEConfig(d_in=d, d_sae=d * args.expansion)
    runs = iter(range(10**9))

    def trainer() -> float:
        cfg = TrainConfig(shards=str(tmp / "s"), out=str(tmp / f"run{next(runs)}"), batch_size=B,
                          expansion_factor=args.expansion, num_epochs=1, max_steps=args.steps, val_fraction=0.0,
                          progress=False, plot=False, log_every=args.log_every, b_dec_init="zeros", resample_every=0,
                          overwrite=True)
        return train_stack(ss, sae_config_for(cfg, ss), [1e-4], [1e-3], cfg).act_per_s

    try:
        res = benchlib.alternate({"bare": lambda: bare(build_sae(cfg_sae), x, args.steps, stacked=False),
                                  "bare+stacked": lambda: bare(build_sae(cfg_sae), x, args.steps, stacked=True),
                                  "trainer": trainer}, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = benchlib.median(res["bare"])
    print(f"d_in={d} d_sae={d * args.expansion} batch={B} steps={args.steps} repeats={args.repeats} "
          f"threads={torch.get_num_threads()}")
    for k, v in res.items():
        med = benchlib.median(v)
        print(f"{k:>13}: {med:10,.0f} act/s  ({med / base:.3f} of bare)   runs: {', '.join(f'{a:,.0f}' for a in v)}")
    benchlib.report("bench_trainer_overhead.py", {
        "d_in": d, "d_sae": d * args.expansion, "batch": B, "steps": args.steps,
        "act_per_s": {k: {"median": benchlib.median(v), "values": v} for k, v in res.items()},
        "of_bare_median_of_paired": {k: benchlib.median_ratio(v, res["bare"]) for k, v in res.items()}},
        args.json, argv, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
