"""Benchmark: zero-shot evaluation of 50,000 x 512 embeddings against 1000 classes (target: < 2 s on a CPU).

    python benchmarks/bench_zeroshot.py [--n 50000 --d 512 --classes 1000 --repeats 5]

Text embeddings are precomputed (as the on-disk text cache gives them): random unit class
vectors [1000, 512] stand in for them, and the logit scale is 100 (CLIP's). Two figures,
medians of ``--repeats`` alternating rounds (``benchlib.alternate``):

* ``classifier``: the zero-shot classifier itself on embeddings already in memory: unit-
  normalise, one [n, 512] x [512, 1000] matmul (logit scale folded into the weights), top-1
  and top-5 under the lower-index tie rule (``visae.zeroshot.topk_hits``), in batches of 8192;
* ``end_to_end``: ``visae.zeroshot.evaluate`` streaming the same embeddings from a float16
  shard set on disk (memmap reads, labels, the cross-entropy at the logit scale included).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import benchlib
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", default="", help="also write the JSON summary here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from visae.shards import ShardSet, ShardWriter
    from visae.zeroshot import ZeroShotClassifier, evaluate, topk_hits

    g = torch.Generator().manual_seed(0)
    W = torch.randn(args.classes, args.d, generator=g)
    W /= W.norm(dim=-1, keepdim=True)
    clf = ZeroShotClassifier(W, 100.0, [str(i) for i in range(args.classes)])
    # embeddings with a real signal: class direction + noise, so accuracies are neither 0 nor 1
    y = torch.randint(0, args.classes, (args.n,), generator=g)
    x = W[y] + 0.3 * torch.randn(args.n, args.d, generator=g)

    def classifier_only() -> dict[str, float]:
        hits = {1: 0, 5: 0}
        for s in range(0, args.n, args.batch_size):
            logits = clf.logits(x[s:s + args.batch_size])
            for k, h in topk_hits(logits, y[s:s + args.batch_size], (1, 5)).items():
                hits[k] += int(h.sum())
        return {f"top{k}": v / args.n for k, v in hits.items()}

    work = Path(tempfile.mkdtemp(prefix="bench_zs_"))
    try:
        with ShardWriter(work / "s", args.d, shard_size=16384, source={"model": "bench"}) as w:
            w.add(x.numpy(), ids=[str(i) for i in range(args.n)], labels=y.numpy())
        ss = ShardSet(work / "s")
        classifier_only()  # warm-up
        evaluate(ss, clf, batch_size=args.batch_size)
        last: dict = {}

        def run_classifier() -> None:
            last["acc"] = classifier_only()

        def run_end_to_end() -> None:
            last["res"] = evaluate(ss, clf, batch_size=args.batch_size)

        times = benchlib.alternate({"classifier": run_classifier, "end_to_end": run_end_to_end}, args.repeats)
        t_clf, t_e2e = times["classifier"], times["end_to_end"]
        acc, res = last["acc"], last["res"]
        # the brute-force reference agrees (argmax / torch.topk on the same logits)
        logits = clf.logits(x[:5000])
        ref1 = float((logits.argmax(-1) == y[:5000]).float().mean())
        got = topk_hits(logits, y[:5000], (1,))[1].float().mean().item()
        assert abs(ref1 - got) < 1e-12, (ref1, got)
        out = {"n": args.n, "d": args.d, "classes": args.classes, "batch_size": args.batch_size,
               "classifier_s_median": benchlib.median(t_clf), "end_to_end_s_median": benchlib.median(t_e2e),
               "classifier_s": t_clf, "end_to_end_s": t_e2e, "accuracy_in_memory": acc,
               "accuracy_from_shards": {k: res["clean"][k] for k in ("top1", "top5")},
               "gflop_matmul": 2 * args.n * args.d * args.classes / 1e9}
        benchlib.report("bench_zeroshot.py", out, args.json, argv)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
