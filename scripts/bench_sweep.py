"""Benchmark: K sweep configurations of one expansion factor in one stacked pass vs K sequential runs.

    python scripts/bench_sweep.py                       # defaults below; prints a JSON summary
    python scripts/bench_sweep.py --d 512 --expansion 2 --n 16384 --epochs 2 --repeats 3

Both sides train the same K = len(lrs) x len(l1_coeffs) trials on the same shard set for the
same number of steps, with the sweep's own code: the stacked side is ``visae.sweep.sweep``
(one group, ``train_stack`` with S = K: one batch read feeds every member, batched matmuls),
the sequential side is ``visae.sweep.train_trial_alone`` once per trial (S = 1 each, from the
same shared init). Both include what a run does besides the steps (per-epoch validation,
checkpoints, logging). The two are timed alternately in one process, ``--repeats`` times,
and the ratio of the medians is reported with the machine's description. Per-trial curve
plots are off on both sides (``plot=False``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# This checkout's visae first, scripts/ off the path (its select.py would shadow the stdlib's select).
_here = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.realpath(p or ".") != _here]

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from visae.machine import machine_info  # noqa: E402


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
    p.add_argument("--out", default="", help="also write the JSON summary here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from visae.synthetic import make_planted_dictionary, write_planted_shards
    from visae.sweep import SweepConfig, plan_trials, sweep, train_trial_alone

    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        shards = work / "shards"
        write_planted_shards(shards, n=args.n, dictionary=make_planted_dictionary(d=args.d, n_atoms=4 * args.d, seed=0),
                             shard_size=8192, dtype="float16", seed=0)
        base = dict(shards=str(shards), lrs=tuple(args.lrs), l1_coeffs=tuple(args.l1_coeffs),
                    expansion_factors=(args.expansion,), num_epochs=args.epochs, batch_size=args.batch_size,
                    val_fraction=0.1, seed=0, resample_every=0, device=args.device, progress=False, plot=False,
                    select=False)
        K = len(args.lrs) * len(args.l1_coeffs)
        stacked_t, seq_t = [], []
        for r in range(args.repeats):
            out = work / f"stacked{r}"
            cfg = SweepConfig(out=str(out), **base)
            t0 = time.perf_counter()
            sweep(cfg)
            stacked_t.append(time.perf_counter() - t0)
            # sequential: the same trials one by one, from the same shared init (made above, not timed twice)
            seq_out = work / f"seq{r}"
            shutil.copytree(out / "init", seq_out / "init")
            cfg_seq = SweepConfig(out=str(seq_out), **base)
            t0 = time.perf_counter()
            for t in plan_trials(cfg_seq):
                train_trial_alone(cfg_seq, t, seq_out / "alone" / t.name)
            seq_t.append(time.perf_counter() - t0)
            print(f"repeat {r}: stacked {stacked_t[-1]:.2f} s, sequential {seq_t[-1]:.2f} s "
                  f"({seq_t[-1] / stacked_t[-1]:.2f}x)", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(seq_out, ignore_errors=True)
        steps = (int(args.n * 0.9) // args.batch_size) * args.epochs
        res = {"K": K, "d": args.d, "d_sae": args.d * args.expansion, "batch_size": args.batch_size,
               "steps_per_trial": steps, "examples": args.n, "epochs": args.epochs,
               "stacked_s_median": statistics.median(stacked_t), "sequential_s_median": statistics.median(seq_t),
               "speedup": statistics.median(seq_t) / statistics.median(stacked_t),
               "speedup_median_of_paired": statistics.median(q / s for q, s in zip(seq_t, stacked_t)),
               "stacked_s": stacked_t, "sequential_s": seq_t, "machine": machine_info(),
               "command": "python scripts/bench_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        print(json.dumps(res, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
