"""Extraction throughput vs the model's pure forward throughput, side by side in one run.

    python benchmarks/bench_extract.py [--images ../shared/imagenet-sample] [--n 1000] [--repeats 3]
        [--model ViT-B-32] [--batch_size 64] [--settings "0:1,2:2,1:1,2:0"]

For each round (``benchlib.alternate``: every case once per round, the order reversed every
other round, so that load changes on a shared machine hit all alike):
  forward: ``backbone.encode_image`` in ``torch.inference_mode`` over preprocessed images
           already in memory (the same n images), main-process torch threads as set;
  extract: ``visae.extract.extract`` over the n JPEGs (listing, DataLoader decode in worker
           processes, forward, normalising, shard writing), backbone already loaded.
Each setting is "threads:workers" (torch threads in the main process, 0 = torch's default :
DataLoader workers); every setting is measured once per round.
Prints images/s medians and the ratio extract / forward (median of per-repeat ratios), and
writes them as JSON (``--json``). Also the same ratio in images per CPU-second (this process
and its DataLoader workers): on a machine shared with other jobs the wall-clock rates swing
with the load, while the CPU cost per image shows what decoding and writing add to the
forward pass (on a dedicated machine whose cores the forward saturates, the wall-clock ratio
approaches it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import benchlib
import torch

from visae.backbones import load_backbone
from visae.extract import ExtractConfig, extract
from visae.images import load_image, open_source



def forward_rate(bb, batches: list[torch.Tensor], amp) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of the bare forward pass."""
    n = sum(len(b) for b in batches)
    with torch.inference_mode(), amp:
        t, c = time.perf_counter(), benchlib.cpu_seconds()
        for x in batches:
            bb.encode_image(x).float().cpu()
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t), n / (benchlib.cpu_seconds() - c)


def _key(setting: tuple[int, int]) -> str:
    return f"threads={setting[0]},workers={setting[1]}"


def main(argv: list[str] | None = None) -> int:
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
    args = ap.parse_args(argv)
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
        runs = iter(range(10**9))

        def forward_case(setting: tuple[int, int]):
            def case() -> tuple[float, float]:
                torch.set_num_threads(setting[0] or default_threads)
                return forward_rate(bb, batches, amp)
            return case

        def extract_case(setting: tuple[int, int]):
            threads, workers = setting

            def case() -> tuple[float, float]:
                torch.set_num_threads(threads or default_threads)
                out = os.path.join(tmp, f"{threads}_{workers}_{next(runs)}")
                cfg = ExtractConfig(images=args.images, out=out, model=args.model, random_init=True,
                                    batch_size=args.batch_size, num_workers=workers, threads=threads, limit=args.n,
                                    progress=False, device=str(device))
                t, c = time.perf_counter(), benchlib.cpu_seconds()
                ss = extract(cfg, backbone=bb)
                rate, cpu_rate = len(items) / (time.perf_counter() - t), len(items) / (benchlib.cpu_seconds() - c)
                assert len(ss) == len(items)
                shutil.rmtree(out)
                return rate, cpu_rate
            return case

        cases = {}
        for setting in settings:
            cases[f"forward {_key(setting)}"] = forward_case(setting)
            cases[f"extract {_key(setting)}"] = extract_case(setting)
        got = benchlib.alternate(cases, args.repeats)
        for setting in settings:
            fwd, ext = got[f"forward {_key(setting)}"], got[f"extract {_key(setting)}"]
            f, fc = [r for r, _ in fwd], [c for _, c in fwd]
            e, ec = [r for r, _ in ext], [c for _, c in ext]
            results[_key(setting)] = {"forward_img_s": benchlib.median(f), "extract_img_s": benchlib.median(e),
                                      "ratio_median": benchlib.median_ratio(e, f),
                                      "cpu_ratio_median": benchlib.median_ratio(ec, fc),
                                      "ratios": [a / b for a, b in zip(e, f)],
                                      "cpu_ratios": [a / b for a, b in zip(ec, fc)], "forward": f, "extract": e}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nsetting                     forward img/s  extract img/s  extract/forward  (same, per CPU-second)   [medians of repeats]")
    for key, v in results.items():
        print(f"{key:<28}{v['forward_img_s']:>13.2f}{v['extract_img_s']:>15.2f}{v['ratio_median']:>17.3f}{v['cpu_ratio_median']:>22.3f}")
    meta = {"n": len(items), "model": args.model, "batch_size": args.batch_size, "device": str(device),
            "precision": precision, "default_threads": default_threads, "results": results}
    benchlib.report("bench_extract.py", meta, args.json, argv, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
