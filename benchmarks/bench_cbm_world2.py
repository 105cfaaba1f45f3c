"""The concept bottleneck classifier on world2's 253 colour-family x shape classes (issue 14, item 1) with the v2 toy CLIP.

    python benchmarks/bench_cbm_world2.py [--model NAME] [--weights FILE] [--out DIR] [--n_train 10000,20000,40000] [--n_val 15000]

Setup (BENCHMARKS.md, "Concept bottleneck classifier on world2 (issue 14)"):

``--model``: the v2 toy CLIP architecture (default: the one ``--weights`` records in its safetensors metadata, else
world2's, ``visae.toyclip.WORLD2_MODEL``); ``--weights``: its weights (default its shipped file,
``visae.toyclip.SHIPPED_WEIGHTS``). A demo or shard set already in ``--out`` made with other weights is refused.

1. The world2 demo (``visae demo --config configs/demo_world2.yaml --model NAME --pretrained FILE``, 10,000 single-object images
   of world seed 5000): its selected SAE (``<demo>/sweep/best``) and its names (``<demo>/concepts``, world2's
   vocabulary). Run here unless ``--demo`` holds a finished one (``demo.json``).
2. Two more single-object worlds (``generate_world2(max_objects=1)``, as the demo's): a training world (seed
   ``--train_seed``, ``max(--n_train)`` images) and a validation world (``--val_seed``, ``--n_val``), embedded by the
   same weights (``visae extract --source toyworld``); each ``--n_train`` value trains on that many first images
   (a prefix shard set written beside).
3. ``visae cbm`` (``train_cbm``) per training size: ``--label_column family_shape``, named concepts only, lasso,
   target ``--target`` concepts per class, ``--max_iter`` FISTA steps a path point; linear probe and zero-shot
   (benchmark world2, the same 253 classes) on the same validation split.
4. Judged with world2's naming truth (``visae.world2.name_matches``): the fraction of classes whose two largest
   weights are on latents named by the class's colour-family and shape words (``cbm.top_weights_name_the_class``),
   and the interventions (``cbm.intervention_effects``: each class's top concept removed from every validation
   image; own accuracy >= 20 points lower, every class not using that latent within 2 points).

Every stage is skipped when its output exists (rerun to resume); timings are wall and process CPU (this process and
its reaped children) per stage. Result: JSON on stdout and ``<out>/result.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (puts this checkout's visae first on the path)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _timed(fn, *a, **kw) -> tuple[Any, dict[str, float]]:
    w0, c0 = time.perf_counter(), benchlib.cpu_seconds()
    out = fn(*a, **kw)
    return out, {"wall_s": round(time.perf_counter() - w0, 1), "cpu_s": round(benchlib.cpu_seconds() - c0, 1)}


def run_demo(demo: Path, model: str, weights: str, threads: int) -> dict[str, float] | None:
    """The world2 demo with the toy CLIP ``model`` (weights file ``weights``) into ``demo`` (skipped when
    ``demo.json`` exists)."""
    if (demo / "demo.json").is_file():
        cfg = json.loads((demo / "demo_state.json").read_text())["config"]
        benchlib.check_made_with(demo / "demo_state.json", cfg, model, weights)
        return None
    cmd = [sys.executable, "-m", "visae.cli", "demo", "--config", str(benchlib.REPO / "configs" / "demo_world2.yaml"),
           "--model", model, "--pretrained", weights, "--threads", str(threads), "--out", str(demo), "--no_progress"]
    _, t = _timed(subprocess.run, cmd, check=True)
    return t


def world_shards(out: Path, n: int, seed: int, model: str, weights: str,
                 threads: int) -> tuple[Path, dict[str, float] | None]:
    """A single-object world2 of ``n`` images (seed ``seed``) embedded by the weights -> its shard set (one of more
    images already there is kept: the callers take a prefix)."""
    from visae.extract import ExtractConfig, extract
    from visae.shards import ShardSet
    from visae.world2 import generate_world2

    shards = out / "shards"
    try:
        ss = ShardSet(shards)
        if len(ss) >= n:
            benchlib.check_made_with(shards / "manifest.json", ss.manifest["source"], model, weights)
            return shards, None
    except benchlib.MadeWithOtherWeights:
        raise
    except Exception:  # noqa: BLE001 - absent or incomplete: (re)build; generate and extract resume
        pass

    def build():
        generate_world2(out / "world", n, seed, max_objects=1, progress=False, workers=threads)
        extract(ExtractConfig(images=str(out / "world"), source="toyworld", out=str(shards), model=model,
                              pretrained=weights, batch_size=250, num_workers=0, threads=threads, device="cpu",
                              dtype="float32", progress=False))

    _, t = _timed(build)
    return shards, t


def prefix_shards(src: Path, n: int, out: Path) -> Path:
    """The first ``n`` rows of shard set ``src`` as a shard set (``src`` itself when it has no more)."""
    from visae.shards import ShardSet, subset_shard_set

    if n >= len(ShardSet(src)):
        return src
    return subset_shard_set(src, np.arange(n), out).path


def class_values(name: str) -> list[tuple[str, str]]:
    """world2's family_shape class name "red four-pointed star" -> its (factor, value) pairs."""
    family, shape = name.split(" ", 1)
    return [("colour_family", family), ("shape", shape)]


def evaluate(cbm_dir: Path, sae_dir: Path, val: Path) -> dict[str, Any]:
    """Top-2 naming and interventions of a trained CBM on the validation shards."""
    from visae import world2
    from visae.cbm import intervention_effects, load_cbm, top_weights_name_the_class
    from visae.recovery import collect_codes
    from visae.sae import load_sae
    from visae.shards import ShardSet

    model, doc = load_cbm(cbm_dir)
    top = top_weights_name_the_class(model, class_values, world2.name_matches, k=2)
    ss = ShardSet(val)
    sae = load_sae(str(sae_dir))
    rows, cols, vals = collect_codes(sae, ss)
    codes = torch.zeros(len(ss), sae.d_sae)
    codes[torch.from_numpy(rows), torch.from_numpy(cols)] = torch.from_numpy(vals).float()
    y = torch.from_numpy(ss.metadata()["family_shape"].astype(np.int64))
    twenty, two = Fraction(20, 100), Fraction(2, 100)
    iv = {}
    for n_remove in (1, 2):
        rows_ = intervention_effects(model, codes, y, n_remove=n_remove)
        own = [float(r["own"]) for r in rows_]
        iv[f"top{n_remove}"] = {
            "classes": len(rows_),
            "own_drop_ge_20": sum(r["own"] <= -twenty for r in rows_),
            "own_drop_median_points": -100 * float(np.median(own)),
            "others_within_2": sum(r["other_max"] <= two for r in rows_),
            "others_worst_points": 100 * float(max(r["other_max"] for r in rows_)),
            "pooled_worst_points": 100 * float(max(abs(r["other_pooled"]) for r in rows_)),
            "pooled_mean_points": 100 * float(np.mean([abs(float(r["other_pooled"])) for r in rows_])),
            "users_median": float(np.median([r["users"] for r in rows_])),
            "short": [(r["name"], round(-100 * float(r["own"]), 1), r["concepts"]) for r in rows_ if r["own"] > -twenty][:40],
        }
    named_f = {f: float(np.mean([t["named"][f] for t in top])) for f in ("colour_family", "shape")}
    counts = torch.bincount(y, minlength=len(model.classnames))
    concept_names = [x["name"] for c in range(len(model.classnames)) for x in model.class_concepts(c)]
    return {"top2_named_right": float(np.mean([t["ok"] for t in top])),
            "top2_has_family_word": named_f["colour_family"], "top2_has_shape_word": named_f["shape"],
            "top2_examples": [(t["name"], t["top"], t["ok"]) for t in top[::23]],
            "val_images_per_class": {"min": int(counts.min()), "median": float(counts.float().median()),
                                     "max": int(counts.max())},
            "distinct_concept_names_used": len(set(concept_names)),
            "interventions": iv}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from visae.toyclip import V2_MODELS, WORLD2_MODEL

    ap.add_argument("--model", default=None, choices=V2_MODELS, help="the v2 toy CLIP architecture (default: the "
                    f"'model' of --weights' safetensors metadata, else world2's, {WORLD2_MODEL})")
    ap.add_argument("--weights", default="",
                    help="its weights (.safetensors); default: its shipped file (visae.toyclip.SHIPPED_WEIGHTS)")
    ap.add_argument("--out", default="runs/bench_cbm_world2", help="work directory (every stage resumes)")
    ap.add_argument("--demo", default="", help="a finished world2 demo (default: <out>/demo, run when absent)")
    ap.add_argument("--sae", default="", help="an SAE dir to use instead of the demo's selected one (<demo>/sweep/best)")
    ap.add_argument("--concepts", default="", help="the names of --sae (a visae name output dir; required with --sae)")
    ap.add_argument("--n_train", default="10000,20000,40000", help="training sizes (comma-separated)")
    ap.add_argument("--n_val", type=int, default=15000)
    ap.add_argument("--train_seed", type=int, default=6000)
    ap.add_argument("--val_seed", type=int, default=7000)
    ap.add_argument("--target", type=float, default=5.0, help="concepts per class")
    ap.add_argument("--max_iter", type=int, default=100, help="FISTA steps a path point (the toy-world test's 100)")
    ap.add_argument("--nonneg", action="store_true", help="weights >= 0 (visae cbm --nonneg)")
    ap.add_argument("--alpha", type=float, default=1.0, help="1: lasso; < 1: elastic net")
    ap.add_argument("--no_refit", action="store_true", help="keep the lasso's weights (visae cbm --no_refit)")
    ap.add_argument("--probe_l2", type=float, default=1e-4, help="L2 weight of the clean linear probe")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="", help="also write the result here")
    a = ap.parse_args(argv)
    try:
        a.model, a.weights = benchlib.toy_model_and_weights(a.model, a.weights, WORLD2_MODEL, V2_MODELS)
    except ValueError as e:
        ap.error(str(e))
    sizes = sorted({int(s) for s in a.n_train.split(",")})
    if sizes[0] < 1 or a.n_val < 1:
        ap.error("--n_train and --n_val must be positive")
    if bool(a.sae) != bool(a.concepts):
        ap.error("--sae and --concepts go together (an SAE dir and the names of its latents)")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    demo = Path(a.demo) if a.demo else out / "demo"
    times: dict[str, Any] = {}
    try:  # reused outputs must be this model's and weights' (a rerun after a change of model is refused)
        t = run_demo(demo, a.model, a.weights, a.threads)
        if t:
            times["demo"] = t
        train_full, t = world_shards(out / "train", sizes[-1], a.train_seed, a.model, a.weights, a.threads)
        if t:
            times["train_world_and_extract"] = {**t, "images": sizes[-1]}
        val, t = world_shards(out / "val", a.n_val, a.val_seed, a.model, a.weights, a.threads)
    except benchlib.MadeWithOtherWeights as e:
        print(f"bench_cbm_world2: {e}", file=sys.stderr)
        return 2
    if t:
        times["val_world_and_extract"] = {**t, "images": a.n_val}
    val = prefix_shards(val, a.n_val, out / f"val_{a.n_val}")

    from visae.cbm import CBMConfig, train_cbm

    sae_dir, concepts = demo / "sweep" / "best", demo / "concepts"
    if a.sae:
        sae_dir, concepts = Path(a.sae), Path(a.concepts)
    tag = "".join([f"_sae-{sae_dir.name}" if a.sae else "", f"_it{a.max_iter}" if a.max_iter != 100 else "", "_nonneg" if a.nonneg else "", "_norefit" if a.no_refit else "",
                   f"_alpha{a.alpha:g}" if a.alpha != 1.0 else "", f"_probe{a.probe_l2:g}" if a.probe_l2 != 1e-4 else ""])
    runs = []
    for n in sizes:
        train = prefix_shards(train_full, n, out / f"train_{n}")
        cfg = CBMConfig(sae=str(sae_dir), concepts=str(concepts), train_shards=str(train), val_shards=str(val),
                        label_column="family_shape", target_concepts_per_class=a.target, max_iter=a.max_iter,
                        nonneg=a.nonneg, alpha=a.alpha, probe_l2=a.probe_l2, refit=not a.no_refit, text_cache=str(demo / "text_cache"),
                        out=str(out / f"cbm_{n}{tag}"))
        res, t = _timed(train_cbm, cfg)
        ev, t_ev = _timed(evaluate, Path(cfg.out), sae_dir, val)
        t1 = res["top1"]
        row = {"n_train": n, "variant": tag.strip("_") or "default", "train_images_per_class": n / 253, "n_val": res["n_val"], "num_classes": res["num_classes"],
               "top1": t1, "cbm_over_probe": t1["cbm"] / t1["linear_probe"],
               "concepts_per_class": res["concepts_per_class"], "num_candidate_concepts": res["num_candidate_concepts"],
               "num_concepts_used": res["num_concepts_used"], "lam": res["lam"], "path_points": len(res["path"]),
               "refit": res.get("refit"),
               "train_cbm": t, "evaluate": t_ev, **ev}
        print(json.dumps({k: row[k] for k in ("n_train", "top1", "cbm_over_probe", "concepts_per_class",
                                              "top2_named_right", "train_cbm")}), file=sys.stderr, flush=True)
        runs.append(row)
    sel = json.loads((demo / "sweep" / "selection.json").read_text()) if (demo / "sweep" / "selection.json").is_file() else {}
    result = {"model": a.model, "weights": a.weights, "demo": str(demo), "sae": str(sae_dir), "concepts": str(concepts),
              "selected_trial": None if a.sae else sel.get("trial"),
              "times": times, "runs": runs}
    benchlib.report("bench_cbm_world2.py", result, a.json or str(out / "result.json"), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
