"""The whole pipeline on the toy world, offline, in minutes: ``visae demo`` / ``python scripts/demo.py``.

Stages (each writes its artifact under ``--out``; a rerun skips the finished ones)::

    world/      visae.toyworld.generate_world   images + factor labels + captions
    shards/     visae.extract.extract           the shipped toy CLIP's image embeddings, factor columns
    sweep/      visae.sweep.sweep               a small grid of SAEs, selected by the zero-shot accuracy
                                                of the toy CLIP on their reconstructions -> sweep/best/
    concepts/   visae.naming.name_concepts      each latent named by its decoder direction's nearest word
    site/       visae.browse.build_site         a static page per concept with its top images
    recovery.json  visae.recovery               did the SAE find the world's known concepts (AUROC), named right?

Nothing is downloaded: the model is ``visae-toyclip`` with the weights in ``assets/toyclip/``.
``--quick`` runs a reduced size (a few hundred images, one SAE) for tests.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from visae.atomic import atomic_write_text
from visae.config import config_to_dict, parse_config
from visae.resources import config_yaml
from visae.sweepdir import SweepDir

__all__ = ["DemoConfig", "QUICK", "run_demo", "toy_vocabulary", "main"]

DEFAULT_YAML = config_yaml("demo.yaml")
STATE = "demo_state.json"
STAGES = ("world", "extract", "sweep", "name", "browse", "recovery")


@dataclass(frozen=True)
class DemoConfig:
    """End to end on the synthetic world: generate, extract, sweep, select, name, browse, score concept recovery."""

    out: str = field(default="demo_out", metadata={"help": "output directory (world/, shards/, sweep/, concepts/, site/)"})
    quick: bool = field(default=False, metadata={"help": "reduced size (for tests): the quick_* settings replace the others"})
    n_images: int = field(default=10000, metadata={"help": "toy-world images"})
    seed: int = field(default=0, metadata={"help": "seed of the world (its images) and of the SAE training"})
    world_seed_offset: int = field(default=5000, metadata={
        "help": "the demo's world has seed seed + this (not the toy CLIP's training world, seed 0)"})
    model: str = field(default="visae-toyclip", metadata={"help": "backbone (the shipped toy CLIP)"})
    pretrained: Optional[str] = field(default=None, metadata={"help": "other toy CLIP weights (.safetensors); null: the shipped ones"})
    lrs: tuple[float, ...] = field(default=(2e-3, 5e-3), metadata={"help": "sweep: learning rates"})
    l1_coeffs: tuple[float, ...] = field(default=(5e-5, 1e-4), metadata={
        "help": "sweep: sparsity coefficients (>= 1e-3 merges colour and shape into joint latents, see docs/toyworld.md)"})
    expansion_factors: tuple[int, ...] = field(default=(4, 8), metadata={"help": "sweep: d_sae / d_in"})
    architecture: str = field(default="relu", metadata={"help": "sweep: SAE architecture"})
    num_epochs: int = field(default=40, metadata={"help": "sweep: epochs per SAE"})
    batch_size: int = field(default=256, metadata={"help": "sweep: examples per step"})
    vocab: str = field(default="toy", metadata={
        "help": "naming vocabulary: toy (the world's words and synonyms plus n_distractors other words), wordfreq "
                "(20k English words) or a file"})
    n_distractors: int = field(default=600, metadata={"help": "vocab toy: words that name no factor value"})
    templates: tuple[str, ...] = field(default=(), metadata={"help": "naming: prompt templates with {} (empty: bare words)"})
    subtract_mean: bool = field(default=False, metadata={"help": "naming: subtract the vocabulary's mean text embedding first"})
    n_top: int = field(default=16, metadata={"help": "browse: top images per concept"})
    text_cache: str = field(default="", metadata={"help": "text-embedding cache directory; empty: <out>/text_cache"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})
    quick_n_images: int = field(default=1000, metadata={"help": "--quick: images"})
    quick_num_epochs: int = field(default=20, metadata={"help": "--quick: epochs of the one SAE"})
    quick_batch_size: int = field(default=32, metadata={"help": "--quick: examples per step (enough steps to learn)"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})



def effective(cfg: DemoConfig) -> DemoConfig:
    """The settings actually used (``--quick`` replaces sizes and shrinks the grid to one SAE)."""
    if not cfg.quick:
        return cfg
    return dataclasses.replace(cfg, n_images=cfg.quick_n_images, num_epochs=cfg.quick_num_epochs,
                               batch_size=cfg.quick_batch_size, lrs=cfg.lrs[-1:],
                               l1_coeffs=cfg.l1_coeffs[:1], expansion_factors=cfg.expansion_factors[:1], n_top=4)


QUICK = DemoConfig(quick=True)

# Distractors: colours, shapes, sizes, places and textures the world does not have, and other words.
_DISTRACTORS = ("orange white black grey gray gold silver beige maroon navy lime olive "
                "hexagon oval rectangle heart arrow ring crescent pentagon line curve spiral "
                "medium tiny huge top bottom upper lower corner edge "
                "checkered wavy grid noise gradient texture pattern "
                "object thing shape picture photo image background colour color size dog cat car house tree").split()


def toy_vocabulary(n_distractors: int = 600) -> list[str]:
    """The demo's naming vocabulary: every factor value word of the world, its synonyms and the world's position
    phrases, then distractors:
    the hand-picked ones above, topped up with wordfreq's most frequent English words (stop words dropped)
    until there are ``n_distractors`` words that name no factor value."""
    from visae.naming import load_vocabulary
    from visae.recovery import SYNONYMS, _words_of
    from visae.toyworld import FACTORS, MAIN_FACTORS, POSITION_PHRASES

    words: list[str] = []
    for f in MAIN_FACTORS:
        for v in FACTORS[f]:
            words += _words_of(v)
    for w in list(words):
        words += list(SYNONYMS.get(w, ()))
    world = set(words)
    words += list(POSITION_PHRASES)  # the world says "on the left", never "left" alone
    distractors = [w for w in dict.fromkeys(_DISTRACTORS) if w not in world]
    if len(distractors) < n_distractors:
        pool = load_vocabulary(None, max(2000, 3 * n_distractors), stopwords=True, alpha_only=True)
        seen = world | set(distractors)
        for w in pool:
            if w.lower() not in seen:
                seen.add(w.lower())
                distractors.append(w)
        if len(distractors) < n_distractors:
            raise ValueError(f"wordfreq gave only {len(distractors)} distractor words, {n_distractors} asked for")
    return list(dict.fromkeys(words)) + distractors[:max(n_distractors, 0)]


# ----------------------------------------------------------------------------- stages


def _state(out: Path) -> dict[str, Any]:
    p = out / STATE
    return json.loads(p.read_text()) if p.is_file() else {"stages": {}}


def _save_state(out: Path, st: dict[str, Any]) -> None:
    atomic_write_text(out / STATE, json.dumps(st, indent=1))


def _say(msg: str) -> None:
    print(f"visae demo: {msg}", file=sys.stderr, flush=True)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run (or finish) the demo; returns the summary also written to ``<out>/demo.json``."""
    import torch

    run = effective(cfg)
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    if run.threads > 0:
        torch.set_num_threads(run.threads)
    st = _state(out)
    key = {k: v for k, v in config_to_dict(run).items() if k not in ("progress", "threads", "text_cache")}
    text_cache = run.text_cache or str(out / "text_cache")
    if st.get("config") not in (None, key):
        old = st["config"]
        diff = {k: (old.get(k), key.get(k)) for k in key if old.get(k) != key.get(k)}
        raise ValueError(f"{out / STATE}: this directory holds a demo with other settings {diff} (old, new); "
                         "use another --out or delete it")
    st["config"] = key
    _save_state(out, st)
    world_dir, shards_dir, sweep_dir = out / "world", out / "shards", out / "sweep"
    concepts_dir, site_dir = out / "concepts", out / "site"
    swd = SweepDir(sweep_dir)
    best = swd.best_dir

    def stage(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if name in st["stages"]:
            _say(f"{name}: done before ({st['stages'][name]['seconds']:.1f} s), skipped")
            return st["stages"][name]
        _say(f"{name} ...")
        t = time.time()
        info = fn() or {}
        info["seconds"] = round(time.time() - t, 2)
        st["stages"][name] = info
        _save_state(out, st)
        _say(f"{name}: {info['seconds']:.1f} s")
        return info

    def do_world() -> dict[str, Any]:
        from visae.toyworld import generate_world

        generate_world(world_dir, run.n_images, run.seed + run.world_seed_offset, progress=run.progress)
        return {"dir": str(world_dir), "n": run.n_images, "seed": run.seed + run.world_seed_offset}

    def do_extract() -> dict[str, Any]:
        from visae.extract import ExtractConfig, extract

        ss = extract(ExtractConfig(images=str(world_dir), source="toyworld", out=str(shards_dir), model=run.model,
                                   pretrained=run.pretrained, batch_size=250, num_workers=0, device="cpu",
                                   dtype="float32", progress=run.progress))
        return {"dir": str(shards_dir), "rows": len(ss), "d": ss.d}

    def do_sweep() -> dict[str, Any]:
        from visae.sweep import SweepConfig, sweep

        from visae.sweep import SweepSelection
        from visae.zeroshot import ClassifierConfig

        trainer = dataclasses.replace(SweepConfig().train, shards=str(shards_dir), architecture=run.architecture,
                                      num_epochs=run.num_epochs, batch_size=run.batch_size, seed=run.seed,
                                      device="cpu", progress=run.progress, plot=not run.quick)
        sweep(SweepConfig(out=str(sweep_dir), lrs=run.lrs, l1_coeffs=run.l1_coeffs,
                          expansion_factors=run.expansion_factors, train=trainer,
                          selection=SweepSelection(classifier=ClassifierConfig(benchmark="toy", text_cache=text_cache))))
        sel = swd.read_selection() or {}
        if not (best / "cfg.json").is_file():
            raise RuntimeError(f"the sweep in {sweep_dir} selected no SAE (see its leaderboard)")
        return {"dir": str(sweep_dir), "best": str(best), "trials": len(run.lrs) * len(run.l1_coeffs) * len(run.expansion_factors),
                "selection": {k: sel.get(k) for k in ("trial", "metric", "score", "tied_with_chosen") if k in sel}}

    def do_name() -> dict[str, Any]:
        from visae.naming import NameConfig, name_concepts

        vocab = run.vocab
        if vocab == "toy":
            vocab = str(out / "vocab.txt")
            atomic_write_text(vocab, "\n".join(toy_vocabulary(run.n_distractors)) + "\n")
        name_concepts(NameConfig(sae=str(best), shards=str(shards_dir), out=str(concepts_dir),
                                 vocab=None if vocab == "wordfreq" else vocab, vocab_size=0 if vocab != "wordfreq" else 20000,
                                 templates=run.templates, subtract_mean=run.subtract_mean, stopwords=False, n_top=run.n_top, device="cpu",
                                 text_cache=text_cache))
        doc = json.loads((concepts_dir / "concepts.json").read_text())
        return {"dir": str(concepts_dir), "named": doc.get("num_named"), "latents": doc.get("num_concepts"),
                "vocabulary": vocab}

    def do_browse() -> dict[str, Any]:
        from visae.browse import BrowseConfig, build_site
        from visae.naming import NameConfig

        naming = NameConfig(sae=str(best), shards=str(shards_dir), n_top=run.n_top, n_random=min(8, run.n_top),
                            device="cpu", text_cache=text_cache)
        index = build_site(BrowseConfig(concepts=str(concepts_dir), out=str(site_dir), naming=naming,
                                        title="visae demo: concepts of the toy world"))
        return {"index": str(index)}

    def do_recovery() -> dict[str, Any]:
        from visae.recovery import concept_recovery, format_recovery

        res = concept_recovery(str(best), shards_dir, concepts=concepts_dir)
        # Every trial of the sweep too, named the same way: how the selected SAE compares on the ground truth.
        sel = swd.read_selection() or {}
        trials = {}
        trial_dirs = [swd.trial_dir(t) for t in swd.trials_with_weights() if swd.trial_cfg(t)]
        if trial_dirs:
            from visae.backbones import load_backbone
            from visae.naming import decoder_directions, embed_vocabulary, load_vocabulary, match_names
            from visae.sae import load_sae

            doc = json.loads((concepts_dir / "concepts.json").read_text())
            ncfg = doc["config"]
            words = load_vocabulary(ncfg["vocab"], ncfg["vocab_size"], stopwords=ncfg["stopwords"],
                                    alpha_only=ncfg["alpha_only"])
            bb = load_backbone(run.model, run.pretrained)
            # the vocabulary and the decision of the naming stage: entries that do not fit dropped, duplicates merged
            vocab = embed_vocabulary(bb, words, list(ncfg["templates"]) or None, cache_dir=text_cache)
        for t in trial_dirs:
            sae = load_sae(str(t))
            names = match_names(decoder_directions(sae), vocab.emb, vocab.words, unique=ncfg["unique_names"],
                                min_z=ncfg.get("min_z", 0.0), min_score=ncfg.get("min_score"),  # older runs: no min_z
                                subtract_mean=ncfg["subtract_mean"]).names
            r = concept_recovery(sae, shards_dir, concepts=[{"latent": j, "name": n} for j, n in enumerate(names)])
            trials[t.name] = {k: r["summary"][k] for k in ("mean_best_auroc", "fraction_recovered", "fraction_named_at")}
            trials[t.name]["factors"] = r["factors"]
        res["selected_trial"] = sel.get("trial")
        res["sweep_trials"] = trials
        atomic_write_text(out / "recovery.json", json.dumps(res, indent=1))
        text = format_recovery(res)
        if trials:
            text += ("\n\nevery trial of the sweep (mean best-latent AUROC; recovered at AUROC >= 0.9; a latent at AUROC "
                     ">= 0.95 named by the value's word):\n") + "\n".join(
                f"  {n:<24} {v['mean_best_auroc']:.3f}  {v['fraction_recovered']:>4.0%}  {v['fraction_named_at']:>4.0%}"
                + ("  <- selected" if n == sel.get("trial") else "")
                for n, v in sorted(trials.items(), key=lambda kv: -kv[1]["mean_best_auroc"]))
        atomic_write_text(out / "recovery.txt", text + "\n")
        info = {"file": str(out / "recovery.json"), **{k: res["summary"][k] for k in
                ("mean_best_auroc", "fraction_recovered", "fraction_named_right", "named_at", "fraction_named_at")
                if k in res["summary"]}}
        if trials:
            top = max(trials, key=lambda n: trials[n]["mean_best_auroc"])
            info["best_trial_in_sweep"] = {"trial": top, "mean_best_auroc": trials[top]["mean_best_auroc"]}
        return info

    t0 = time.time()
    stage("world", do_world)
    stage("extract", do_extract)
    stage("sweep", do_sweep)
    stage("name", do_name)
    stage("browse", do_browse)
    stage("recovery", do_recovery)
    summary = {"out": str(out), "config": key, "stages": st["stages"],
               "seconds_this_run": round(time.time() - t0, 1),
               "seconds_all_stages": round(sum(s["seconds"] for s in st["stages"].values()), 1)}
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=1))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    s = summary["stages"]
    lines = ["", "visae demo finished: everything is under " + summary["out"]]
    rows = [("images + labels", s["world"]["dir"]), ("activations (shard set)", s["extract"]["dir"]),
            ("SAE sweep + leaderboard", s["sweep"]["dir"] + "/leaderboard.md"), ("selected SAE", s["sweep"]["best"]),
            ("named concepts", s["name"]["dir"] + "/concepts.csv"), ("concept-recovery score", s["recovery"]["file"]),
            ("browsable page", s["browse"]["index"])]
    w = max(len(a) for a, _ in rows)
    lines += [f"  {a:<{w}}  {b}" for a, b in rows]
    sel = s["sweep"].get("selection") or {}
    if sel:
        tied = sel.get("tied_with_chosen") or []
        lines.append(f"  selected {sel.get('trial')} by {sel.get('metric')} = {sel.get('score'):.3f}"
                     + (f" ({len(tied)} other trial(s) tie within noise, see the leaderboard)" if tied else ""))
    rec = s["recovery"]
    msg = f"  concept recovery: mean best-latent AUROC {rec['mean_best_auroc']:.3f}, recovered {rec['fraction_recovered']:.0%}"
    if "fraction_named_right" in rec:
        msg += f", named right {rec['fraction_named_right']:.0%}"
    lines.append(msg)
    if "fraction_named_at" in rec:
        lines.append(f"  ground truth: {rec['fraction_named_at']:.0%} of the world's factor values have a latent with "
                     f"AUROC >= {rec['named_at']} named by the value's word")
    if rec.get("best_trial_in_sweep"):
        b = rec["best_trial_in_sweep"]
        lines.append(f"  (best recovery in the sweep: {b['trial']}, mean AUROC {b['mean_best_auroc']:.3f}; see recovery.txt)")
    lines.append(f"  time: {summary['seconds_all_stages']:.0f} s over all stages. Open {s['browse']['index']} in a browser "
                 f"(or serve it: visae browse serve {shlex.quote(str(Path(s['browse']['index']).parent))})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(DemoConfig, argv, default_yaml=DEFAULT_YAML, prog="visae demo")
        summary = run_demo(cfg)
    except ValueError as e:  # ConfigError, another demo's directory, a stage's own error (all name what is wrong)
        print(f"visae demo: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
