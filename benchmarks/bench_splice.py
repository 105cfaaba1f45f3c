"""Benchmark: a forward pass with an SAE spliced in vs the plain forward (issue 13 target: <= 1.15x).

    python benchmarks/bench_splice.py [--model ViT-B-16 --images 500 --expansion 8 --layer 6 --token all
                                       --architecture topk --k 64 --batch_size 50 --repeats 3 --threads 1]

Random-initialised backbone (no weights are downloaded; the cost does not depend on the
weights) and an SAE of width ``expansion * W`` (ViT-B-16: 768 x 8 = 6,144 latents) on ``token``
tokens of the residual stream after block ``layer`` (``all``: the 197 tokens of a 224 px
ViT-B-16 image), at the sparsity of a trained SAE, not of a random one (a random ReLU SAE fires
on about half its latents; users splice SAEs whose L0 is in the tens):

* ``--architecture topk`` (default): a TopK SAE with ``k`` latents per token (L0 = k; 64 by default);
* ``--architecture relu``: a ReLU SAE whose encoder bias is one constant, set so that on the first
  batch's tokens ``--l0`` (default 50) latents per token fire on average.

The weights are random (Kaiming-uniform encoder, its transpose as the decoder, as ``build_sae``
makes them); the measured L0 of the timed codes is printed (``l0_measured``), with the number of
passes the splice decoded from the active codes only (``sparse_decodes`` of ``splice_calls``).

Cases, run alternately (``benchlib.alternate``) over the same random images, each timed in wall
and process CPU seconds: ``plain`` = ``encode_image``; ``spliced`` = ``encode_image`` inside
``visae.splice.splice`` (``--decode auto``: the splice's own choice, sparse at this L0; ``dense``
forces the dense decode; ``--dense_case`` adds ``spliced_dense`` as a third case). Prints medians
and medians of per-round ratios (wall and CPU), and a breakdown of the SAE's own work on one
batch's tokens (encoder GEMM, choice of the active codes, sparse and dense decode, CPU seconds)
scaled to the whole run, which says where the extra time goes.
"""

from __future__ import annotations

import argparse
import sys
import time

import benchlib
import torch


def _residual(bb, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Every token of the residual stream after block ``layer``: [B, N, W] (the blocks after it are run too)."""
    got = []

    def hook(_m, _i, out):
        out = out[0] if isinstance(out, tuple) else out
        got.append(out if bb.batch_first else out.transpose(0, 1))

    h = bb.blocks[bb.resolve_layer(layer)].register_forward_hook(hook)
    try:
        bb.encode_image(x)
    finally:
        h.remove()
    return got[0]


def _tokens(res: torch.Tensor, token: str, p: int) -> torch.Tensor:
    return {"cls": res[:, :1], "patch": res[:, p:], "all": res}[token].reshape(-1, res.shape[-1])


def build(bb, args, first_batch: torch.Tensor):
    """The benchmark's SAE (see the module docstring) with its source recorded for the splice."""
    from visae.sae import SAEConfig, build_sae

    d_sae = args.expansion * bb.width
    cfg = SAEConfig(architecture=args.architecture, d_in=bb.width, d_sae=d_sae,
                    k=args.k if args.architecture == "topk" else 32)
    sae = build_sae(cfg, generator=torch.Generator().manual_seed(0))
    sae.extra = {"source": {"model": bb.name, "layer": args.layer, "token": args.token}}
    if args.architecture == "relu":  # one bias for all latents: the (1 - l0 / d_sae) quantile of the pre-activations
        with torch.inference_mode():
            x = _tokens(_residual(bb, first_batch, args.layer), args.token, bb.num_prefix_tokens)
            pre = sae.preacts(sae.normalize_input(x)[0])[0] - sae.b_enc[0]
            sample = pre.reshape(-1)[:: max(1, pre.numel() // 2_000_000)]
            t = torch.quantile(sample.float(), 1.0 - args.l0 / d_sae)
        with torch.no_grad():
            sae.b_enc.fill_(-float(t))
    return sae.eval()


def breakdown(bb, sae, x_tokens: torch.Tensor, scale: float) -> dict[str, float]:
    """CPU seconds of the SAE's steps on ``x_tokens`` [M, W] (median of 3), times ``scale`` (batches in the run)."""
    from visae.sae.kernels import sparse_decode
    from visae.splice import _encode_active

    def cpu(fn) -> float:
        ts = []
        for _ in range(3):
            c = time.process_time()
            fn()
            ts.append(time.process_time() - c)
        return sorted(ts)[1] * scale

    with torch.inference_mode():
        x_sae, _ = sae.normalize_input(x_tokens)
        pre = sae.preacts(x_sae)
        f, pattern, vals = _encode_active(sae, x_tokens, True, need_dense=True)
        out = {"encoder_gemm_cpu_s": cpu(lambda: sae.preacts(x_sae)),
               "encode_and_select_active_cpu_s": cpu(lambda: _encode_active(sae, x_tokens, True, need_dense=False)),
               "dense_codes_cpu_s": cpu(lambda: sae._activate(pre)),
               "sparse_decode_cpu_s": cpu(lambda: sparse_decode(sae.W_dec[0], sae.b_dec[0], pattern, vals)),
               "dense_decode_cpu_s": cpu(lambda: sae.decode(f))}
    return {k: round(v, 3) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--token", default="all", choices=["cls", "patch", "all"])
    p.add_argument("--architecture", default="topk", choices=["topk", "relu"])
    p.add_argument("--k", type=int, default=64, help="TopK: latents per token")
    p.add_argument("--l0", type=float, default=50.0, help="ReLU: mean latents per token the encoder bias is set for")
    p.add_argument("--decode", default="auto", choices=["auto", "dense"], help="the spliced case's decode")
    p.add_argument("--dense_case", action="store_true", help="also time the splice with the dense decode")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", default="", help="also write the JSON summary here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from visae.backbones import load_backbone
    from visae.splice import splice

    bb = load_backbone(args.model, random_init=True, device=args.device)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(min(args.batch_size, args.images - s), 3, *bb.image_size, generator=g).to(args.device)
               for s in range(0, args.images, args.batch_size)]
    sae = build(bb, args, batches[0])
    stats = {"calls": 0, "sparse_decodes": 0}

    def sync() -> None:
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn):
        def case():
            w, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            return [time.perf_counter() - w, time.process_time() - c]
        return case

    def plain() -> None:
        with torch.inference_mode():
            for x in batches:
                bb.encode_image(x)

    def spliced_with(sparse):
        def run() -> None:
            with torch.inference_mode(), splice(bb, sae, sparse=sparse) as sp:
                for x in batches:
                    bb.encode_image(x)
            if sparse is None:
                stats["calls"] += sp.calls
                stats["sparse_decodes"] += sp.sparse_decodes
        return run

    main_sparse = None if args.decode == "auto" else False
    with torch.inference_mode():  # warm-up (allocator, kernels); the L0 of the codes the timed passes will see
        bb.encode_image(batches[0][:2])
        with splice(bb, sae, record_codes=True, sparse=main_sparse) as sp:
            bb.encode_image(batches[0][:2])
        l0 = float((sp.codes != 0).sum(-1).float().mean())
        x_tokens = _tokens(_residual(bb, batches[0], args.layer), args.token, bb.num_prefix_tokens)
    cases = {"plain": timed(plain), "spliced": timed(spliced_with(main_sparse))}
    if args.dense_case:
        cases["spliced_dense"] = timed(spliced_with(False))
    times = benchlib.alternate(cases, args.repeats)
    wall = {k: [v[0] for v in vs] for k, vs in times.items()}
    cpu = {k: [v[1] for v in vs] for k, vs in times.items()}
    tokens = {"cls": 1, "patch": None, "all": None}[args.token]
    out = {"model": args.model, "images": args.images, "batch_size": args.batch_size, "layer": args.layer,
           "token": args.token, "width": bb.width, "d_sae": sae.d_sae, "device": args.device,
           "architecture": args.architecture, "k": args.k if args.architecture == "topk" else None,
           "l0_target": args.l0 if args.architecture == "relu" else None, "l0_measured": round(l0, 2),
           "decode": args.decode, "tokens_per_image": tokens or int(x_tokens.shape[0] // batches[0].shape[0]),
           "splice_calls": stats["calls"], "sparse_decodes": stats["sparse_decodes"]}
    for name in cases:
        out[f"{name}_wall_s_median"] = benchlib.median(wall[name])
        out[f"{name}_cpu_s_median"] = benchlib.median(cpu[name])
    for name in [c for c in cases if c != "plain"]:
        out[f"{name}_ratio_wall_median"] = benchlib.median_ratio(wall[name], wall["plain"])
        out[f"{name}_ratio_cpu_median"] = benchlib.median_ratio(cpu[name], cpu["plain"])
    out["target_ratio"] = 1.15
    out["sae_breakdown_whole_run"] = breakdown(bb, sae, x_tokens, args.images / batches[0].shape[0])
    out["wall_s"], out["cpu_s"] = wall, cpu
    benchlib.report("bench_splice.py", out, args.json, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
