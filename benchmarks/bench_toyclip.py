"""Toy CLIP training speed: seconds per step (batch 256) with 1 and 2 torch threads, and what the
full 1,500-step run would take at that speed.

    python benchmarks/bench_toyclip.py [--steps 30] [--repeats 3] [--json out.json]

Each repeat trains a fresh model (the shipped recipe: concept captions, aux heads) for --steps
steps on a small in-memory world and reads the loop time from the run's card; thread counts
alternate (``benchlib.alternate``) so both see the same machine load. The load average is recorded: on a shared
machine the absolute numbers move, the ratio less.
"""
import argparse
import json
import os
import sys
import tempfile

import benchlib

from visae.toyclip import ToyClipConfig, train_toy_clip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    full = ToyClipConfig().steps
    loads = []

    def seconds_per_step(t: int):
        def case() -> float:
            with tempfile.TemporaryDirectory() as d:
                cfg = ToyClipConfig(out=d, n_train=2048, steps=args.steps, warmup=5, eval_n=100, eval_every=0,
                                    checkpoint_every=10**6, threads=t, progress=False)
                loads.append(os.getloadavg()[0])
                w = train_toy_clip(cfg, argv=[])
                card = json.loads(w.with_suffix(".json").read_text())
            return card["train_seconds"] / args.steps
        return case

    res = benchlib.alternate({t: seconds_per_step(t) for t in args.threads}, args.repeats)
    out = {"steps": args.steps, "repeats": args.repeats, "batch_size": ToyClipConfig().batch_size,
           "loadavg_1min_at_starts": loads,
           "seconds_per_step_median": {t: benchlib.median(v) for t, v in res.items()},
           "full_run_minutes_at_median": {t: benchlib.median(v) * full / 60 for t, v in res.items()},
           "all": res}
    if len(args.threads) == 2:
        a, b = args.threads
        out["ratio_median"] = {f"{a}/{b}": benchlib.median_ratio(res[a], res[b])}
    benchlib.report("bench_toyclip.py", out, args.json, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
