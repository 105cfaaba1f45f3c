"""Benchmark: a forward pass with an SAE spliced in vs the plain forward (issue 13 target: <= 1.15x).

    python benchmarks/bench_splice.py [--model ViT-B-16 --images 500 --expansion 8 --layer 6 --token all
                                       --batch_size 50 --repeats 3]

Random-initialised backbone (no weights are downloaded; the cost does not depend on the
weights) and a random ReLU SAE of width ``expansion * W`` (ViT-B-16: 768 x 8 = 6,144 latents)
on ``token`` tokens of the residual stream after block ``layer`` (``all``: the 197 tokens of a
224 px ViT-B-16 image). Two cases, run alternately (``benchlib.alternate``) over the same
random images: ``plain`` = ``encode_image``, ``spliced`` = ``encode_image`` inside
``visae.splice.splice``. Prints the medians and the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import sys

import benchlib
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--token", default="all", choices=["cls", "patch", "all"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", default="", help="also write the JSON summary here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from visae.backbones import load_backbone
    from visae.sae import SAEConfig, build_sae
    from visae.splice import splice

    bb = load_backbone(args.model, random_init=True, device=args.device)
    sae = build_sae(SAEConfig(architecture="relu", d_in=bb.width, d_sae=args.expansion * bb.width),
                    generator=torch.Generator().manual_seed(0))
    sae.extra = {"source": {"model": bb.name, "layer": args.layer, "token": args.token}}
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(min(args.batch_size, args.images - s), 3, *bb.image_size, generator=g).to(args.device)
               for s in range(0, args.images, args.batch_size)]

    def sync() -> None:
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()

    def plain() -> None:
        with torch.inference_mode():
            for x in batches:
                bb.encode_image(x)
        sync()

    def spliced() -> None:
        with torch.inference_mode(), splice(bb, sae):
            for x in batches:
                bb.encode_image(x)
        sync()

    with torch.inference_mode():  # warm-up (allocator, kernels)
        bb.encode_image(batches[0][:2])
        with splice(bb, sae):
            bb.encode_image(batches[0][:2])
    times = benchlib.alternate({"plain": plain, "spliced": spliced}, args.repeats)
    tokens = {"cls": 1, "patch": None, "all": None}[args.token]
    out = {"model": args.model, "images": args.images, "batch_size": args.batch_size, "layer": args.layer,
           "token": args.token, "width": bb.width, "d_sae": sae.d_sae, "device": args.device,
           "tokens_per_image": tokens, "plain_s_median": benchlib.median(times["plain"]),
           "spliced_s_median": benchlib.median(times["spliced"]),
           "ratio_median": benchlib.median_ratio(times["spliced"], times["plain"]),
           "plain_s": times["plain"], "spliced_s": times["spliced"], "target_ratio": 1.15}
    benchlib.report("bench_splice.py", out, args.json, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
