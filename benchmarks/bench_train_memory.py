"""Training memory against shard-set size: peak RSS (and CUDA memory) of one full epoch, sets 1x ... 64x.

    python benchmarks/bench_train_memory.py [--base 65536 --d 64 --factors 1,8,64 --device cpu|cuda]

For each factor f a float16 shard set of ``base * f`` generated unit-norm rows is written to a
temporary directory (in chunks: this process never holds it), then a fresh process trains a
small SAE (d_sae = ``expansion`` x d, ReLU, batch ``batch``, the trainer's default shuffle buffer
of 262,144 rows) for ONE full epoch over it with ``visae.train.Trainer`` (loader thread, pinned
feed on CUDA, validation at the epoch's end), and reports its own peak RSS (``VmHWM`` from
/proc: the peak of this process alone) before and after training and, on CUDA,
``torch.cuda.max_memory_allocated``. The shapes are small so that the epoch over 64x is
I/O- and loader-bound, which is what is measured; the claim is that neither the host peak nor the
device peak grows with the set (the loader reads whole shards in shuffle groups of bounded size
and unmaps them; the device only ever holds a batch). The set is deleted after each factor.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import numpy as np

CHILD = r"""
import json, sys, time, warnings
import torch

def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

from visae.shards import ShardSet
from visae.train import TrainConfig, Trainer, sae_config_for

path, out, device, batch, expansion = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
shards = ShardSet(path)
cfg = TrainConfig(shards=path, out=out, architecture="relu", expansion_factor=expansion, batch_size=batch,
                  num_epochs=1, device=device, b_dec_init="zeros", val_fraction=0.01, resample_every=0,
                  progress=False, plot=False, validate_shards="none", log_every=100000)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    t = Trainer(shards, sae_config_for(cfg, shards), [cfg.lr], [cfg.l1_coeff], cfg, [out])
    base = hwm_kb()
    t0 = time.perf_counter()
    res = t.fit()
cuda = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
print(json.dumps({"baseline_kb": base, "peak_kb": hwm_kb(), "examples": res.examples, "steps": res.steps,
                  "seconds": time.perf_counter() - t0, "cuda_max_allocated_bytes": cuda}))
"""


def write_set(path: Path, n: int, d: int, chunk: int = 1 << 18) -> float:
    """A float16 shard set of ``n`` generated unit-norm rows; returns its size on disk in MB."""
    from visae.shards import ShardWriter

    with ShardWriter(path, d, dtype="float16", shard_size=65536) as w:
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            x = np.random.default_rng(s).standard_normal((m, d)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            w.add(x, ids=[str(i) for i in range(s, s + m)])
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2 ** 20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=65536, help="rows of the 1x set")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--factors", default="1,8,64")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--expansion", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    factors = [int(f) for f in args.factors.split(",")]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_train_mem_"))
    try:
        for f in factors:
            n = args.base * f
            t = time.perf_counter()
            mb = write_set(work / "s", n, args.d)
            write_s = time.perf_counter() - t
            proc = subprocess.run([sys.executable, "-c", CHILD, str(work / "s"), str(work / "run"), args.device,
                                   str(args.batch), str(args.expansion)], capture_output=True, text=True,
                                  cwd=benchlib.REPO)
            if proc.returncode:
                print(proc.stderr, file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"factor": f, "rows": n, "disk_mb": mb, "write_s": write_s, "baseline_mb": r["baseline_kb"] / 1024,
                   "peak_mb": r["peak_kb"] / 1024, "growth_mb": (r["peak_kb"] - r["baseline_kb"]) / 1024,
                   "examples_trained": r["examples"], "train_s": r["seconds"],
                   "cuda_peak_mb": None if r["cuda_max_allocated_bytes"] is None
                   else r["cuda_max_allocated_bytes"] / 2 ** 20}
            rows.append(row)
            print(f"{f:>4}x {n:>10,} rows {mb:>9.1f} MB on disk: peak RSS {row['peak_mb']:.1f} MB (+{row['growth_mb']:.1f} "
                  f"MB during the epoch of {r['examples']:,} examples, {r['seconds']:.1f} s)"
                  + ("" if row["cuda_peak_mb"] is None else f", CUDA peak {row['cuda_peak_mb']:.1f} MB"),
                  file=sys.stderr, flush=True)
            shutil.rmtree(work / "s")
            shutil.rmtree(work / "run", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    benchlib.report("bench_train_memory.py", {"d": args.d, "batch": args.batch, "expansion": args.expansion,
                                              "device": args.device, "rows": rows}, args.json or None, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
