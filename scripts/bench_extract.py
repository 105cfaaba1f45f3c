"""Extraction throughput vs the model's pure forward throughput, side by side in one run.

    python scripts/bench_extract.py [--images ../shared/imagenet-sample] [--n 1000] [--repeats 3]
        [--model ViT-B-32] [--batch_size 64] [--settings "2:2,2:1,1:1,2:0"]

For each repeat, interleaved so that load changes on a shared machine hit both alike:
  forward: ``backbone.encode_image`` in ``torch.inference_mode`` over preprocessed images
           already in memory (the same n images), main-process torch threads as set;
  extract: ``visae.extract.extract`` over the n JPEGs (listing, DataLoader decode in worker
           processes, forward, normalising, shard writing), backbone already loaded.
Each setting is "threads:workers" (torch threads in the main process : DataLoader workers).
Prints images/s medians and the ratio extract / forward (median of per-repeat ratios), and
writes them as JSON (``--json``). Also the same ratio in images per CPU-second (this process
and its DataLoader workers): on a machine shared with other jobs the wall-clock rates swing
with the load, while the CPU cost per image shows what decoding and writing add to the
forward pass (on a dedicated machine whose cores the forward saturates, the wall-clock ratio
approaches it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
sys.path.insert(0, os.path.dirname(_here))

import torch  # noqa: E402

from visae.backbones import load_backbone  # noqa: E402
from visae.extract import ExtractConfig, extract  # noqa: E402
from visae.images import load_image, open_source  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its reaped children (DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def forward_rate(bb, batches: list[torch.Tensor], amp) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of the bare forward pass."""
    n = sum(len(b) for b in batches)
    with torch.inference_mode(), amp:
        t, c = time.perf_counter(), cpu_seconds()
        for x in batches:
            bb.encode_image(x).float().cpu()
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t), n / (cpu_seconds() - c)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--images", default=os.path.join(os.path.dirname(here), "shared", "imagenet-sample"))
    ap.add_argument("--n", type=int, default=1000, help="images per measurement (the first n of the sorted source)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--settings", default="2:2", help="comma-separated threads:workers pairs to compare")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()

    device = torch.device(args.device)
    bb = load_backbone(args.model, random_init=True, device=device)
    src = open_source(args.images)
    items = src.items[: args.n]
    print(f"{len(items)} images from {args.images} ({src.kind}); model {args.model} (random init), batch {args.batch_size}, "
          f"device {device}, {os.cpu_count()} cpus", flush=True)
    t = time.perf_counter()
    torch.set_num_threads(1)  # preprocessing is single-image work; avoid thread-pool overhead
    pre = torch.stack([bb.preprocess(load_image(it)[0]) for it in items]).to(device)
    print(f"preloaded {len(items)} images in {time.perf_counter() - t:.1f}s", flush=True)
    batches = list(pre.split(args.batch_size))
    from visae.extract import _autocast

    amp, precision = _autocast(device, "auto")
    tmp = tempfile.mkdtemp(prefix="bench_extract_")
    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings.split(",")]
    results = {}
    try:
        with torch.inference_mode(), amp:  # warm-up
            bb.encode_image(batches[0])
        for threads, workers in settings:
            key = f"threads={threads},workers={workers}"
            fwd, ext, ratio, cpu_ratio = [], [], [], []
            for r in range(args.repeats):
                torch.set_num_threads(threads)
                out = os.path.join(tmp, f"{threads}_{workers}_{r}")
                cfg = ExtractConfig(images=args.images, out=out, model=args.model, random_init=True, batch_size=args.batch_size,
                                    num_workers=workers, threads=threads, limit=args.n, progress=False, device=str(device))

                def run_extract() -> tuple[float, float]:
                    t, c = time.perf_counter(), cpu_seconds()
                    ss = extract(cfg, backbone=bb)
                    rate, cpu_rate = len(items) / (time.perf_counter() - t), len(items) / (cpu_seconds() - c)
                    assert len(ss) == len(items)
                    shutil.rmtree(out)
                    return rate, cpu_rate

                # alternate which runs first, so a load change during a repeat hits both sides alike
                if r % 2 == 0:
                    f, fc = forward_rate(bb, batches, amp)
                    e, ec = run_extract()
                else:
                    e, ec = run_extract()
                    f, fc = forward_rate(bb, batches, amp)
                fwd.append(f)
                ext.append(e)
                ratio.append(e / f)
                cpu_ratio.append(ec / fc)
                print(f"  {key} repeat {r}: forward {f:.2f} img/s, extract {e:.2f} img/s, ratio {e / f:.3f}; "
                      f"per CPU-second: forward {fc:.2f}, extract {ec:.2f} img, ratio {ec / fc:.3f}", flush=True)
            results[key] = {"forward_img_s": statistics.median(fwd), "extract_img_s": statistics.median(ext),
                            "ratio_median": statistics.median(ratio), "cpu_ratio_median": statistics.median(cpu_ratio),
                            "ratios": ratio, "cpu_ratios": cpu_ratio, "forward": fwd, "extract": ext}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nsetting                     forward img/s  extract img/s  extract/forward  (same, per CPU-second)   [medians of repeats]")
    for key, v in results.items():
        print(f"{key:<28}{v['forward_img_s']:>13.2f}{v['extract_img_s']:>15.2f}{v['ratio_median']:>17.3f}{v['cpu_ratio_median']:>22.3f}")
    meta = {"n": len(items), "model": args.model, "batch_size": args.batch_size, "device": str(device), "precision": precision,
            "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(), "results": results}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(meta, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
