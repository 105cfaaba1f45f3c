"""Benchmark: fast causal-truncation text path vs open_clip's encode_text over the full context.

Both paths embed the same words side by side in one process (tokenisation included in both),
alternating (``benchlib.alternate``), ``--repeats`` rounds; the report gives medians, the ratio, and the largest
difference between the two embeddings. The full-context baseline is slow (~0.1 s a word for
ViT-B-32 on 2 CPU cores), so it runs on a random sample of ``--n_words`` words of the
vocabulary; the fast path is additionally timed over the whole vocabulary.

    python benchmarks/bench_text.py                                # ViT-B-32 random init, wordfreq 20k
    python benchmarks/bench_text.py --vocab ../shared/vocab/20k.txt --n_words 500 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import benchlib
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--vocab", default=None, help="word-list file (default: wordfreq's 20k most frequent English words)")
    p.add_argument("--vocab_size", type=int, default=20000)
    p.add_argument("--n_words", type=int, default=512, help="words in the side-by-side comparison")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--full_vocab", default="true", choices=["true", "false"], help="also time the fast path on the whole vocabulary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)

    from visae.backbones import load_backbone
    from visae.naming import load_vocabulary
    from visae.text import embed_prompts

    bb = load_backbone(a.model, random_init=True)
    words = load_vocabulary(a.vocab, size=a.vocab_size)
    g = torch.Generator().manual_seed(a.seed)
    sample = [words[i] for i in torch.randperm(len(words), generator=g)[: a.n_words].tolist()]
    lengths = (bb.tokenizer(sample) != 0).sum(1).float()
    print(f"{a.model} (random init), {len(sample)} words sampled from {len(words)}, "
          f"tokens incl. start/end: mean {lengths.mean():.2f}, max {int(lengths.max())}; context {bb.tokenizer(['x']).shape[1]}; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    emb = {}

    def run(kind: str):
        def case() -> None:
            emb[kind] = embed_prompts(bb, sample, batch_size=a.batch_size, fast=kind == "fast")
        return case

    times = benchlib.alternate({"fast": run("fast"), "full": run("full")}, a.repeats)
    t_fast, t_full = times["fast"], times["full"]
    fast, full = emb["fast"], emb["full"]
    med_fast, med_full = benchlib.median(t_fast), benchlib.median(t_full)
    maxdiff = float((fast - full).abs().max())
    res = {
        "model": a.model, "random_init": True, "n_words": len(sample), "repeats": a.repeats,
        "fast_s_median": med_fast, "full_s_median": med_full, "speedup": med_full / med_fast,
        "max_abs_diff": maxdiff, "words_per_s_fast": len(sample) / med_fast, "words_per_s_full": len(sample) / med_full,
        "speedup_median_of_paired": benchlib.median_ratio(t_full, t_fast), "fast_s": t_fast, "full_s": t_full,
    }
    print(f"median fast {med_fast:.3f} s, full {med_full:.3f} s -> speed-up {res['speedup']:.1f}x; max |diff| {maxdiff:.2e}")
    if a.full_vocab == "true":
        t0 = time.perf_counter()
        embed_prompts(bb, words, batch_size=a.batch_size, fast=True)
        res["fast_full_vocab_s"] = time.perf_counter() - t0
        res["full_vocab_words"] = len(words)
        print(f"fast path, whole vocabulary ({len(words)} words): {res['fast_full_vocab_s']:.1f} s")
    benchlib.report("bench_text.py", res, a.json, argv, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
