"""Measurement: zero-shot accuracy recovered by SAEs on a middle layer of the toy CLIP, through the splice.

    python benchmarks/toy_splice_recovery.py [--layer 2 --token all --train 800 --eval 400 --steps 300]

SAEs (ReLU, expansion 8) of a small L1 grid are trained on the residual stream after block
``layer`` of the shipped toy CLIP (all tokens of ``--train`` toy-world images, unit-norm inputs,
plain Adam on ``sae.training_loss``; not the full trainer: this measures the splice, not the
training recipe). Each is spliced in and scored on the toy ``colour`` zero-shot benchmark over
``--eval`` other images: clean, mean-ablated (the layer's tokens replaced by their mean),
spliced accuracy, and accuracy recovered = (spliced - ablated) / (clean - ablated).
"""

from __future__ import annotations

import argparse
import sys

import benchlib
import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--token", default="all", choices=["cls", "patch", "all"])
    p.add_argument("--train", type=int, default=800)
    p.add_argument("--eval", type=int, default=400)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--l1", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 3e-2])
    p.add_argument("--benchmark", default="colour")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    from visae.backbones import load_backbone
    from visae.sae import SAEConfig, build_sae
    from visae.splice import accuracy_recovered, spliced_accuracy, zeroshot_baseline
    from visae.toyworld import sample_world, toy_classnames_and_templates
    from visae.zeroshot import build_classifier

    bb = load_backbone("visae-toyclip")
    spec = toy_classnames_and_templates()[args.benchmark]
    clf = build_classifier(bb, spec["classnames"], spec["templates"])

    def tensors(world):
        return torch.stack([bb.preprocess(world.pil(i)) for i in range(len(world))])

    train_w, eval_w = sample_world(args.train, seed=11), sample_world(args.eval, seed=12)
    x_train = tensors(train_w)
    keep = eval_w.factor(spec["column"]) >= 0
    x_eval = tensors(eval_w)[torch.as_tensor(keep)]
    y_eval = torch.as_tensor(eval_w.factor(spec["column"])[keep])
    batches = [(x_eval[s:s + 100], y_eval[s:s + 100]) for s in range(0, len(y_eval), 100)]
    with torch.no_grad():
        acts = []
        for s in range(0, len(x_train), 100):
            xb = x_train[s:s + 100]
            if args.token == "cls":
                acts.append(bb.encode_layer(xb, args.layer, "cls"))
            else:
                pt = bb.encode_layer(xb, args.layer, "patch").reshape(-1, bb.width)
                acts.append(pt if args.token == "patch" else torch.cat([pt, bb.encode_layer(xb, args.layer, "cls")]))
        acts = torch.cat(acts)
    unit = acts / acts.norm(dim=-1, keepdim=True)
    base = zeroshot_baseline(bb, batches, clf, layer=args.layer, token=args.token)
    rows = []
    for l1 in args.l1:
        g = torch.Generator().manual_seed(0)
        sae = build_sae(SAEConfig(architecture="relu", d_in=bb.width, d_sae=8 * bb.width), generator=g)
        sae.init_b_dec_(unit[:4096], "mean")
        opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
        for _step in range(args.steps):
            idx = torch.randint(0, len(unit), (1024,), generator=g)
            out = sae.training_loss(unit[idx], l1_coeff=l1)
            opt.zero_grad()
            out.loss.backward()
            sae.remove_parallel_grad_()
            opt.step()
            sae.normalize_decoder_()
        sae.eval()
        sae.extra = {"source": {"model": bb.name, "layer": args.layer, "token": args.token}}
        acc = spliced_accuracy(bb, sae, batches, clf)
        with torch.no_grad():
            out = sae.training_loss(unit[:8192], l1_coeff=l1)
        rows.append({"l1": l1, "l0": float(out.l0), "explained_variance": float(out.explained_variance),
                     "spliced": acc, "recovered": accuracy_recovered(acc, base)})
        print(f"l1 {l1:g}: L0 {float(out.l0):.1f}, EV {float(out.explained_variance):.3f}, spliced {acc:.3f}, "
              f"recovered {rows[-1]['recovered']}", file=sys.stderr, flush=True)
    res = {"layer": args.layer, "token": args.token, "benchmark": args.benchmark, "eval_images": int(len(y_eval)),
           "clean": base["clean"], "ablated": base["ablated"], "baseline": base["baseline"], "saes": rows,
           "spliced_spread": float(np.ptp([r["spliced"] for r in rows]))}
    benchlib.report("toy_splice_recovery.py", res, args.json, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
