"""Benchmark: K sweep configurations of one expansion factor in one stacked pass vs K sequential runs.

    python benchmarks/bench_sweep.py                    # defaults below; prints a JSON summary
    python benchmarks/bench_sweep.py --d 512 --expansion 2 --n 16384 --epochs 2 --repeats 3

Both sides train the same K = len(lrs) x len(l1_coeffs) trials on the same shard set for the
same number of steps, with the sweep's own code: the stacked side is ``visae.sweep.sweep``
(one group, ``train_stack`` with S = K: one batch read feeds every member, batched matmuls),
the sequential side is ``visae.sweep.train_trial_alone`` once per trial (S = 1 each, from the
same shared init, made once before timing). Both include what a run does besides the steps
(per-epoch validation, checkpoints, logging). The two are timed alternately in one process
(``benchlib.alternate``), ``--repeats`` rounds, and the ratio of the medians is reported with
the machine record. Per-trial curve
plots are off on both sides (``plot=False``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=96, help="activation width (96: the toy CLIP's embedding, as in the demo; "
                                                      "512: ViT-B)")
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-4, 1e-3])
    p.add_argument("--l1_coeffs", type=float, nargs="+", default=[3e-4, 1.5e-3, 3e-3])
    p.add_argument("--n", type=int, default=10000, help="examples in the generated shard set (the demo's 10,000)")
    p.add_argument("--batch_size", type=int, default=256, help="examples per step (the demo's 256)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", default="", help="also write the JSON summary here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from visae.shards import ShardSet
    from visae.sweep import SweepConfig, plan_trials, prepare_init, sweep, train_config_for, train_trial_alone
    from visae.synthetic import make_planted_dictionary, write_planted_shards

    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        shards = work / "shards"
        write_planted_shards(shards, n=args.n, dictionary=make_planted_dictionary(d=args.d, n_atoms=4 * args.d, seed=0),
                             shard_size=8192, dtype="float16", seed=0)
        trainer = dataclasses.replace(SweepConfig().train, shards=str(shards), num_epochs=args.epochs,
                                      batch_size=args.batch_size, val_fraction=0.1, seed=0, resample_every=0,
                                      device=args.device, progress=False, plot=False)
        base = dict(lrs=tuple(args.lrs), l1_coeffs=tuple(args.l1_coeffs), expansion_factors=(args.expansion,),
                    select=False, train=trainer)
        K = len(args.lrs) * len(args.l1_coeffs)
        # the shared initial SAE, made once (untimed) and copied into each run's directory
        init_cfg = SweepConfig(out=str(work / "init_src"), **base)
        prepare_init(work / "init_src", args.expansion, ShardSet(shards), train_config_for(init_cfg))
        runs = iter(range(10**9))

        def fresh(tag: str) -> tuple[Path, SweepConfig]:
            out = work / f"{tag}{next(runs)}"
            shutil.copytree(work / "init_src" / "init", out / "init")
            return out, SweepConfig(out=str(out), **base)

        def stacked() -> float:
            out, cfg = fresh("stacked")
            t0 = time.perf_counter()
            sweep(cfg)
            dt = time.perf_counter() - t0
            shutil.rmtree(out, ignore_errors=True)
            return dt

        def sequential() -> float:
            out, cfg = fresh("seq")
            t0 = time.perf_counter()
            for t in plan_trials(cfg):
                train_trial_alone(cfg, t, out / "alone" / t.name)
            dt = time.perf_counter() - t0
            shutil.rmtree(out, ignore_errors=True)
            return dt

        times = benchlib.alternate({"stacked": stacked, "sequential": sequential}, args.repeats)
        stacked_t, seq_t = times["stacked"], times["sequential"]
        steps = (int(args.n * 0.9) // args.batch_size) * args.epochs
        res = {"K": K, "d": args.d, "d_sae": args.d * args.expansion, "batch_size": args.batch_size,
               "steps_per_trial": steps, "examples": args.n, "epochs": args.epochs,
               "stacked_s_median": benchlib.median(stacked_t), "sequential_s_median": benchlib.median(seq_t),
               "speedup": benchlib.median(seq_t) / benchlib.median(stacked_t),
               "speedup_median_of_paired": benchlib.median_ratio(seq_t, stacked_t),
               "stacked_s": stacked_t, "sequential_s": seq_t}
        benchlib.report("bench_sweep.py", res, args.json, argv)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
