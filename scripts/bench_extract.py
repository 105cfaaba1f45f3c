"""Extraction throughput vs the model's pure forward throughput, side by side in one run.

    python scripts/bench_extract.py [--images ../shared/imagenet-sample] [--n 1000] [--repeats 3]
        [--model ViT-B-32] [--batch_size 64] [--settings "0:1,2:2,1:1,2:0"]

For each repeat, interleaved so that load changes on a shared machine hit both alike:
  forward: ``backbone.encode_image`` in ``torch.inference_mode`` over preprocessed images
           already in memory (the same n images), main-process torch threads as set;
  extract: ``visae.extract.extract`` over the n JPEGs (listing, DataLoader decode in worker
           processes, forward, normalising, shard writing), backbone already loaded.
Each setting is "threads:workers" (torch threads in the main process, 0 = torch's default :
DataLoader workers); the repeats are the outer loop, so every setting is measured once per round.
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

# This checkout's visae first, scripts/ off the path (its select.py would shadow the stdlib's select).
_here = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.realpath(p or ".") != _here]

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


def _key(setting: tuple[int, int]) -> str:
    return f"threads={setting[0]},workers={setting[1]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--images", default=os.path.join(os.path.dirname(here), "shared", "imagenet-sample"))
    ap.add_argument("--n", type=int, default=1000, help="images per measurement (the first n of the sorted source)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--settings", default="0:1", help="comma-separated threads:workers to compare (threads 0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    settings = []
    for spec in args.settings.split(","):
        try:
            threads, workers = (int(x) for x in spec.split(":"))
        except ValueError:
            ap.error(f"--settings: {spec!r} is not threads:workers (two integers, e.g. 0:1)")
        if threads < 0 or workers < 0:
            ap.error(f"--settings: {spec!r} has a negative count")
        if (threads, workers) not in settings:
            settings.append((threads, workers))

    device = torch.device(args.device)
    default_threads = torch.get_num_threads()
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
    results = {}
    try:
        with torch.inference_mode(), amp:  # warm-up
            bb.encode_image(batches[0])
        raw = {s: {"fwd": [], "ext": [], "ratio": [], "cpu_ratio": []} for s in settings}
        # repeats outermost: every setting is measured once per round, so load drifts hit all alike
        for r in range(args.repeats):
            for setting in settings:
                threads, workers = setting
                key = _key(setting)
                torch.set_num_threads(threads or default_threads)
                out = os.path.join(tmp, f"{threads}_{workers}_{r}")
                cfg = ExtractConfig(images=args.images, out=out, model=args.model, random_init=True, batch_size=args.batch_size,
                                    num_workers=workers, threads=threads, limit=args.n, progress=False,
                                    device=str(device))

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
                d = raw[setting]
                d["fwd"].append(f)
                d["ext"].append(e)
                d["ratio"].append(e / f)
                d["cpu_ratio"].append(ec / fc)
                print(f"  {key} repeat {r}: forward {f:.2f} img/s, extract {e:.2f} img/s, ratio {e / f:.3f}; "
                      f"per CPU-second: forward {fc:.2f}, extract {ec:.2f} img, ratio {ec / fc:.3f}", flush=True)
        for setting, d in raw.items():
            results[_key(setting)] = {"forward_img_s": statistics.median(d["fwd"]), "extract_img_s": statistics.median(d["ext"]),
                                      "ratio_median": statistics.median(d["ratio"]), "cpu_ratio_median": statistics.median(d["cpu_ratio"]),
                                      "ratios": d["ratio"], "cpu_ratios": d["cpu_ratio"], "forward": d["fwd"], "extract": d["ext"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nsetting                     forward img/s  extract img/s  extract/forward  (same, per CPU-second)   [medians of repeats]")
    for key, v in results.items():
        print(f"{key:<28}{v['forward_img_s']:>13.2f}{v['extract_img_s']:>15.2f}{v['ratio_median']:>17.3f}{v['cpu_ratio_median']:>22.3f}")
    meta = {"n": len(items), "model": args.model, "batch_size": args.batch_size, "device": str(device), "precision": precision,
            "cpus": os.cpu_count(), "default_threads": default_threads, "torch": torch.__version__, "python": platform.python_version(), "results": results}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(meta, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
