"""Benchmark: fast causal-truncation text path vs open_clip's encode_text over the full context.

Both paths embed the same words side by side in one process (tokenisation included in both),
alternating, ``--repeats`` times; the report gives medians, the ratio, and the largest
difference between the two embeddings. The full-context baseline is slow (~0.1 s a word for
ViT-B-32 on 2 CPU cores), so it runs on a random sample of ``--n_words`` words of the
vocabulary; the fast path is additionally timed over the whole vocabulary.

    python scripts/bench_text.py                                   # ViT-B-32 random init, wordfreq 20k
    python scripts/bench_text.py --vocab ../shared/vocab/20k.txt --n_words 500 --repeats 3
"""

from __future__ import annotations

import os
import sys

# This checkout's visae first, scripts/ off the path (its select.py would shadow the stdlib's select).
_here = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.realpath(p or ".") != _here]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from visae.machine import describe_machine  # noqa: E402

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
    t_fast, t_full = [], []
    fast = full = None
    for r in range(a.repeats):
        t0 = time.perf_counter()
        fast = embed_prompts(bb, sample, batch_size=a.batch_size, fast=True)
        t_fast.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        full = embed_prompts(bb, sample, batch_size=a.batch_size, fast=False)
        t_full.append(time.perf_counter() - t0)
        print(f"  repeat {r}: fast {t_fast[-1]:.3f} s, full context {t_full[-1]:.3f} s", flush=True)
    med_fast, med_full = statistics.median(t_fast), statistics.median(t_full)
    maxdiff = float((fast - full).abs().max())
    res = {
        "model": a.model, "random_init": True, "n_words": len(sample), "repeats": a.repeats,
        "fast_s_median": med_fast, "full_s_median": med_full, "speedup": med_full / med_fast,
        "max_abs_diff": maxdiff, "words_per_s_fast": len(sample) / med_fast, "words_per_s_full": len(sample) / med_full,
        "machine": describe_machine(),
    }
    print(f"median fast {med_fast:.3f} s, full {med_full:.3f} s -> speed-up {res['speedup']:.1f}x; max |diff| {maxdiff:.2e}")
    if a.full_vocab == "true":
        t0 = time.perf_counter()
        embed_prompts(bb, words, batch_size=a.batch_size, fast=True)
        res["fast_full_vocab_s"] = time.perf_counter() - t0
        res["full_vocab_words"] = len(words)
        print(f"fast path, whole vocabulary ({len(words)} words): {res['fast_full_vocab_s']:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
