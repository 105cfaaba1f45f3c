"""Several layers in one extraction pass vs the deepest of them alone, side by side in one run (issue 13).

    python benchmarks/bench_extract_layers.py [--images ../shared/imagenet-sample] [--n 64] [--repeats 3]
        [--model ViT-B-16] [--layers 4,8,11] [--token cls] [--batch_size 32] [--threads 1] [--workers 0] [--forward] [--device cuda]

Cases, every one once per round (``benchlib.alternate``: the order reversed every other round, so that load
changes on a shared machine hit all alike):
  deepest: ``visae.extract.extract`` with ``--layer <deepest>`` (one shard set);
  several: ``visae.extract.extract`` with ``--layer <layers>`` (one shard set per layer, one forward pass);
  with ``--forward`` also the bare forward passes on preloaded images (``Backbone.encode_layer`` of the deepest
  block vs ``Backbone.encode_layers``), which separates the model's share from decoding and writing.
Both extractions read the same n images of the sorted source through the full pipeline (listing, decoding,
forward, normalising, shard writing), with the backbone (random init, no download) already loaded. Reports per
case the medians of wall-clock seconds and of process CPU seconds (all threads of this process plus its reaped
DataLoader workers), and the median over rounds of the per-round ratios several / deepest. Issue 13's target:
the ratio is at most 1.15 for 3 layers.
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
from visae.extract import ExtractConfig, _autocast, extract, normalise_layer_spec, resolve_layers
from visae.images import load_image, open_source



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--images", default=os.path.join(os.path.dirname(here), "shared", "imagenet-sample"))
    ap.add_argument("--n", type=int, default=64, help="images per measurement (the first n of the sorted source)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--layers", default="4,8,11", help="the several-layer request (at least two blocks)")
    ap.add_argument("--token", default="cls", choices=["cls", "mean", "patch"])
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process (0 = torch's default)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--forward", action="store_true", help="also time the bare forward passes on preloaded images")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (autocast bf16 there, as visae extract does)")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    spec = normalise_layer_spec(args.layers)
    if not isinstance(spec, str):
        ap.error(f"--layers {args.layers!r}: give at least two blocks (e.g. 4,8,11) or all")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    bb = load_backbone(args.model, random_init=True, device=args.device)
    layers = resolve_layers(spec, bb.num_layers, bb.name)
    deepest = layers[-1]
    src = open_source(args.images)
    items = src.items[: args.n]
    print(f"{len(items)} images from {args.images} ({src.kind}); model {args.model} (random init, {bb.num_layers} blocks), "
          f"layers {layers} vs {deepest} alone, token {args.token}, batch {args.batch_size}, threads {torch.get_num_threads()}, "
          f"workers {args.workers}", flush=True)
    tmp = tempfile.mkdtemp(prefix="bench_extract_layers_")
    amp, precision = _autocast(torch.device(args.device), "auto")
    runs = iter(range(10**9))

    def extract_case(layer):
        def case() -> tuple[float, float]:
            out = os.path.join(tmp, f"run{next(runs)}")
            cfg = ExtractConfig(images=args.images, out=out, model=args.model, random_init=True, layer=layer,
                                token=args.token, batch_size=args.batch_size, num_workers=args.workers,
                                threads=args.threads, limit=args.n, progress=False, device=args.device, dtype=args.dtype)
            t, c = time.perf_counter(), benchlib.cpu_seconds()
            got = extract(cfg, backbone=bb)
            wall, cpu = time.perf_counter() - t, benchlib.cpu_seconds() - c
            sets = got.values() if isinstance(got, dict) else [got]
            rows = {len(ss) for ss in sets}  # every layer's set holds one row per image (per patch for patch)
            assert len(rows) == 1 and rows.pop() % len(items) == 0, [len(ss) for ss in sets]
            shutil.rmtree(out)
            return wall, cpu
        return case

    cases = {f"extract layer {deepest}": extract_case(deepest), f"extract layers {spec}": extract_case(spec)}
    if args.forward:
        pre = torch.stack([bb.preprocess(load_image(it)[0]) for it in items]).to(args.device)
        batches = list(pre.split(args.batch_size))

        def forward_case(several: bool):
            def case() -> tuple[float, float]:
                t, c = time.perf_counter(), benchlib.cpu_seconds()
                with torch.inference_mode(), amp:
                    for x in batches:
                        if several:
                            [f.float().cpu() for f in bb.encode_layers(x, layers, args.token).values()]
                        else:
                            bb.encode_layer(x, deepest, args.token).float().cpu()
                return time.perf_counter() - t, benchlib.cpu_seconds() - c
            return case

        cases[f"forward layer {deepest}"] = forward_case(False)
        cases[f"forward layers {spec}"] = forward_case(True)
    try:
        with torch.inference_mode(), amp:  # warm-up
            bb.encode_layers(torch.zeros(2, 3, *bb.image_size, device=args.device), layers, args.token)
        got = benchlib.alternate(cases, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = {name: {"median_wall_s": benchlib.median([w for w, _ in v]), "median_cpu_s": benchlib.median([c for _, c in v]),
                      "wall_s": [w for w, _ in v], "cpu_s": [c for _, c in v]} for name, v in got.items()}
    ratios = {}
    for kind in ("extract", "forward"):
        one, several = got.get(f"{kind} layer {deepest}"), got.get(f"{kind} layers {spec}")
        if one and several:
            ratios[kind] = {"wall_ratio_median": benchlib.median_ratio([w for w, _ in several], [w for w, _ in one]),
                            "cpu_ratio_median": benchlib.median_ratio([c for _, c in several], [c for _, c in one])}
    print("\ncase                          wall s (median)   CPU s (median)")
    for name, v in results.items():
        print(f"{name:<30}{v['median_wall_s']:>15.2f}{v['median_cpu_s']:>17.2f}")
    for kind, r in ratios.items():
        print(f"{kind}: layers {spec} / layer {deepest}: wall {r['wall_ratio_median']:.3f}, CPU {r['cpu_ratio_median']:.3f} "
              "(medians of per-round ratios; target <= 1.15)")
    meta = {"n": len(items), "model": args.model, "layers": layers, "deepest": deepest, "token": args.token,
            "batch_size": args.batch_size, "threads": torch.get_num_threads(), "workers": args.workers, "dtype": args.dtype,
            "device": args.device, "precision": precision,
            "results": results, "ratios": ratios}
    benchlib.report("bench_extract_layers.py", meta, args.json, argv, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
