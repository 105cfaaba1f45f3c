"""Patch heatmaps on world2 (issue 14 item 2): do the v2 toy CLIP's patch-token SAE concepts fire on the object?

The whole measurement of BENCHMARKS.md, "Patch heatmaps on world2 (issue 14)", in one resumable run:

1. a world2 world (``visae.world2.generate_world2``: ``--n`` images of world ``--seed``, ``--max_objects``);
2. the v2 toy CLIP's patch tokens after each block of ``--layers`` in one forward pass (``visae extract --model
   visae-toyclip2 --pretrained WEIGHTS --layer 1,2,3 --token patch``; ``--model visae-toyclip2-reg4``: the register
   variant, whose weights do not ship);
3. per layer, every SAE of ``--saes`` trained on them (``visae train``, 20 epochs of 1,024 rows, lr 2e-3, no
   resampling; the v1 table's recipe);
4. ``visae.patch_recovery.patch_recovery`` on each: image-level AUROC (max over patches) of every latent for every
   factor value (an image is a positive of an object value when any of its objects has it), and for the object
   values with a latent at AUROC >= 0.95 the heat of that latent's 16 top images (the site's streaming pass) in the
   matching objects' boxes (area-weighted), on their masks, on patches touching a box, and the share of top
   images whose hottest patch touches one;
5. with ``--probe``, the single-direction upper bound per layer: the best linear direction, image score = max over
   patches of ``w . x + b`` (an SAE latent is a ReLU of one), fitted by multiple-instance logistic regression on
   70 % of the images, AUROC on the other 30 %;
6. with ``--figure PNG``, the heatmaps of the best concepts' top images with the objects' boxes (matplotlib).

Prints one table row per (layer, SAE) and writes everything to ``OUT/results.json``. Rerunning with the same
``--out`` reuses the world, the shards and finished SAEs.

    python benchmarks/bench_heatmap_world2.py --out runs/heatmap_world2 [--weights FILE] [--n 2000] [--seed 5000] \
        [--max_objects 1] [--layers 1,2,3] [--saes topk:k=8:x=4,topk:k=8:x=16] [--probe] [--figure PNG] \
        [--model visae-toyclip2] [--sae_seeds 0,1,2]

``--model``: the v2 toy CLIP architecture, default the one ``--weights`` records in its safetensors metadata, else
world2's (``visae.toyclip.WORLD2_MODEL``); ``--weights``: its weights file, default its shipped one
(``visae.toyclip.SHIPPED_WEIGHTS``), required when that is absent. SAE specs: ``topk:k=K:x=EXPANSION``, ``relu:l1=COEFF:x=EXPANSION`` or
``matryoshka:k=K:x=EXPANSION[:levels=L]``, comma-separated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (puts this checkout's visae first on the path)

import numpy as np  # noqa: E402

OBJECT_FACTORS = ("colour_family", "shape", "texture")  # scored per object, heat measured
TABLE_FACTORS = ("colour_family", "shape", "texture", "size")


def parse_sae(spec: str) -> tuple[str, dict[str, Any]]:
    """``"topk:k=8:x=4"`` / ``"relu:l1=1e-3:x=4"`` / ``"matryoshka:k=8:x=4[:levels=5]"`` (BatchTopK codes, nested
    prefixes) -> (a directory name, TrainConfig fields); ValueError otherwise."""
    arch, *kv = spec.strip().split(":")
    p = dict(s.split("=", 1) for s in kv if "=" in s)
    forms = "topk:k=K:x=EXPANSION, relu:l1=COEFF:x=EXPANSION or matryoshka:k=K:x=EXPANSION[:levels=L]"
    if len(p) != len(kv) or arch not in ("topk", "relu", "matryoshka") or "x" not in p:
        raise ValueError(f"SAE spec {spec!r}: expected {forms}")
    if arch == "topk":
        if set(p) != {"k", "x"}:
            raise ValueError(f"SAE spec {spec!r}: topk takes k and x")
        return f"topk_k{int(p['k'])}_x{int(p['x'])}", {"architecture": "topk", "k": int(p["k"]),
                                                        "expansion_factor": int(p["x"]), "l1_warmup_steps": 0}
    if arch == "matryoshka":
        if not {"k", "x"} <= set(p) <= {"k", "x", "levels"}:
            raise ValueError(f"SAE spec {spec!r}: matryoshka takes k, x and optionally levels")
        levels = int(p.get("levels", 5))
        return f"matryoshka_k{int(p['k'])}_x{int(p['x'])}_l{levels}", {
            "architecture": "matryoshka", "k": int(p["k"]), "expansion_factor": int(p["x"]),
            "matryoshka_levels": levels, "l1_warmup_steps": 0}
    if set(p) != {"l1", "x"}:
        raise ValueError(f"SAE spec {spec!r}: relu takes l1 and x")
    return f"relu_l1{p['l1']}_x{int(p['x'])}", {"architecture": "relu", "l1_coeff": float(p["l1"]),
                                                "expansion_factor": int(p["x"]), "l1_warmup_steps": 200}


class Clock:
    """Wall and process CPU seconds of a block (``with clock("stage"):``), kept per stage."""

    def __init__(self) -> None:
        self.t: dict[str, list[float]] = {}

    def __call__(self, name: str) -> "Clock":
        self._name = name
        return self

    def __enter__(self) -> None:
        self._w, self._c = time.perf_counter(), time.process_time()

    def __exit__(self, *exc: Any) -> None:
        w, c = self.t.setdefault(self._name, [0.0, 0.0])
        self.t[self._name] = [w + time.perf_counter() - self._w, c + time.process_time() - self._c]


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """One table row of a ``patch_recovery`` result: per factor AUROC min / median / max and the values >= 0.95;
    the heat of the object values with a latent at 0.95; the values passing (in box >= 0.8) and the verdict."""
    row: dict[str, Any] = {}
    vals = res["values"]
    at = res["summary"]["auroc_at"]
    for fac in TABLE_FACTORS:
        a = np.array([v["auroc"] for v in vals if v["factor"] == fac])
        row[fac] = {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max()), "n": len(a),
                    "at": [v["value"] for v in vals if v["factor"] == fac and v["auroc"] >= at]}
    row["heat"] = [{k: v.get(k) for k in ("factor", "value", "latent", "latent_auroc", "in_box", "in_mask", "touching",
                                          "peak_on_box", "passes")} for v in vals if "in_box" in v]
    row["passing"] = res["summary"]["passing"]
    fac_pass = set(res["summary"]["passing_factors"])
    row["met"] = bool(len(row["passing"]) >= 5 and {"colour_family", "shape"} <= fac_pass)
    return row


def best_heat(res: dict[str, Any], factor: str) -> dict[str, Any] | None:
    """Among ``factor``'s values with a latent at the result's ``auroc_at``: how many, and the (value, latent) with
    the most heat in the box (its in box, peak on box, AUROC); None when there is none."""
    hs = [(h["in_box"], r["value"], h) for r in res["values"] if r["factor"] == factor for h in r.get("latents_at", [])
          if h["in_box"] == h["in_box"]]
    if not hs:
        return None
    ib, value, h = max(hs, key=lambda t: t[0])
    return {"values": len({v for _, v, _ in hs}), "value": value, "latent": h["latent"], "auroc": h["auroc"],
            "in_box": ib, "peak_on_box": h["peak_on_box"], "touching": h["touching"]}


def format_row(layer: int, name: str, row: dict[str, Any], l0: float, ev: float) -> str:
    """A markdown table row: layer, SAE, L0 / EV, per factor 'max (median), n >= 0.95', heat of those values."""
    cells = [str(layer), name, f"{l0:.0f} / {ev:.2f}"]
    for fac in TABLE_FACTORS:
        f = row[fac]
        cells.append(f'{f["max"]:.3f} ({f["median"]:.3f}), {len(f["at"])}/{f["n"]}')
    cells.append(", ".join(f'{h["value"]} {h["in_box"]:.2f}/{h["in_mask"] if h["in_mask"] is not None else float("nan"):.2f}/'
                           f'{h["touching"]:.2f}/{h["peak_on_box"]:.2f}' for h in row["heat"]) or "-")
    cells.append(str(len(row["passing"])))
    return "| " + " | ".join(cells) + " |"


def probe(shards: Any, factors: tuple[str, ...], steps: int = 400, seed: int = 0) -> dict[str, dict[str, float]]:
    """Single-direction upper bound: per value of ``factors`` the held-out AUROC (last 30 % of the images) of the
    best linear direction, image score max over patches of ``w . x + b`` on standardised tokens, fitted with Adam
    (lr 0.02, ``steps`` full-batch steps) on the BCE of that max (multiple-instance logistic regression)."""
    import torch

    from visae.patch_recovery import world_objects
    from visae.recovery import sparse_auroc

    torch.manual_seed(seed)
    W = world_objects(shards)
    n = len(W.image_ids)
    X = torch.from_numpy(np.concatenate([b.acts for b in shards.sequential_batches(65536)]).astype(np.float32))
    X = X.reshape(n, -1, X.shape[1])  # rows are stored image by image, patches in order
    X = (X - X.mean((0, 1))) / X.std((0, 1)).clamp_min(1e-6)
    tr = np.arange(n) < int(0.7 * n)
    out: dict[str, dict[str, float]] = {}
    for fac in factors:
        vals = W.values[fac] if fac in W.object_factors else W.values[fac][:, :1]
        out[fac] = {}
        for v, vn in enumerate(W.factor_names[fac]):
            lab = (vals == v).any(1)
            if lab[tr].sum() < 5 or lab[~tr].sum() < 2 or (~lab[~tr]).sum() < 2:
                continue
            y = torch.from_numpy(lab[tr].astype(np.float32))
            w = (0.01 * torch.randn(X.shape[2])).requires_grad_()
            b = torch.zeros(1, requires_grad=True)
            opt = torch.optim.Adam([w, b], lr=0.02)
            for _ in range(steps):
                opt.zero_grad()
                torch.nn.functional.binary_cross_entropy_with_logits((X[tr] @ w + b).amax(1), y).backward()
                opt.step()
            with torch.no_grad():
                s = (X[~tr] @ w + b).amax(1).double().numpy()
            s = s - s.min() + 1.0  # sparse_auroc scores positive entries only
            out[fac][vn] = float(sparse_auroc(np.arange(len(s)), np.zeros(len(s), np.int64), s, lab[~tr][:, None], 1)[0, 0])
    return out


def make_figure(picks: list[dict[str, Any]], world_dir: Path, png: Path, n_show: int = 4,
                model: str = "visae-toyclip2-reg4") -> None:
    """One row per picked concept: its ``n_show`` top images (the site's ranking), the latent's patch heat overlaid
    (scaled per row to the row's maximum, as the site scales a concept's heatmaps), and the boxes of the objects
    that have the value (solid) and of the other objects (dotted). ``picks``: dicts with sae_dir, shards, layer, sae,
    factor, value, latent, latent_auroc, in_box, peak_on_box."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    from visae.patch_recovery import world_objects
    from visae.sae import load_sae
    from visae.shards import ShardSet
    from visae.topimages import compute_top_images, patch_layout

    fig, axes = plt.subplots(len(picks), n_show, figsize=(1.7 * n_show, 1.95 * len(picks) + 0.75), squeeze=False,
                             gridspec_kw={"wspace": 0.04, "hspace": 0.32})
    cache: dict[str, Any] = {}
    for r, p in enumerate(picks):
        if p["sae_dir"] not in cache:
            ss = ShardSet(p["shards"])
            ti = compute_top_images(load_sae(p["sae_dir"]), ss, n_top=16, n_random=0, progress=False)
            cache[p["sae_dir"]] = (ss, ti, world_objects(ss), patch_layout(ss.metadata()["id"])[0])
        ss, ti, W, img = cache[p["sae_dir"]]
        j = p["latent"]
        vi = W.factor_names[p["factor"]].index(p["value"])
        ok = np.flatnonzero(ti.top_index[j] >= 0)[:n_show]
        heat = ti.top_heat[j][ok].astype(np.float64)
        R, C = (int(g) for g in ti.patch_grid)
        scale = max(float(ti.top_heat[j][ti.top_index[j] >= 0].astype(np.float64).max()), 1e-12)
        for c in range(n_show):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(ok):
                ax.axis("off")
                continue
            i = int(img[ti.top_index[j][ok[c]]])
            with Image.open(world_dir / "images" / f"{W.image_ids[i]}.png") as im:
                ax.imshow(np.asarray(im.convert("RGB")), extent=(0, W.image_size, W.image_size, 0), interpolation="nearest")
            ax.imshow(heat[c].reshape(R, C) / scale, extent=(0, W.image_size, W.image_size, 0), cmap="inferno",
                      vmin=0, vmax=1, alpha=0.55, interpolation="nearest")
            for k in range(W.boxes.shape[1]):
                if W.values[p["factor"]][i, k] < 0:
                    continue
                x0, y0, x1, y1 = W.boxes[i, k]
                match = W.values[p["factor"]][i, k] == vi
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.6 if match else 0.9,
                                       ls="-" if match else ":", ec="#00e5ff" if match else "white"))
            ax.set_xlim(0, W.image_size)
            ax.set_ylim(W.image_size, 0)
            if c == 0:
                ax.set_ylabel(f'{p["value"]}\nL{p["layer"]} latent {j}', fontsize=8)
        below = ", best-localised below 0.95" if p.get("below") else ""
        axes[r, 0].set_title(f'{p["factor"]}={p["value"]}{below} ({p["sae"]}, layer {p["layer"]}): AUROC {p["latent_auroc"]:.3f}, '
                             f'in box {p["in_box"]:.2f}, peak on box {p["peak_on_box"]:.2f}', fontsize=7, loc="left")
    fig.suptitle(f"world2, {model} patch-token SAEs: a latent's top images with its heat per patch;\n"
                 "box of the object with the value (cyan), other objects (dotted)", fontsize=8)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.01, top=1 - 0.75 / (1.95 * len(picks) + 0.75))
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(png)


def pick_concepts(results: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The best concepts for the figure: per object value, its latent with the most heat in the box among all
    (layer, SAE) runs; the passing ones (in box >= 0.8) first by in box, colour and shape both represented when
    present; then, if room is left, the best-AUROC shape latent whatever its heat (to show where it fires); ``n`` in
    all, plus one row for the shape latent below 0.95 (among those at ``--diag_at``) with the most heat in the box."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for res in results:
        for h in res["row"]["heat"]:
            key = (h["factor"], h["value"])
            if h["in_box"] is None or h["in_box"] != h["in_box"]:
                continue
            if key not in best or h["in_box"] > best[key]["in_box"]:
                best[key] = {**h, "sae_dir": res["sae_dir"], "shards": res["shards"], "layer": res["layer"], "sae": res["sae"]}
    ranked = sorted(best.values(), key=lambda h: -h["in_box"])
    picks: list[dict[str, Any]] = []
    for fac in ("colour_family", "shape"):  # the best of each first
        first = [h for h in ranked if h["factor"] == fac and h["passes"]]
        picks += first[:1]
    picks += [h for h in ranked if h["passes"] and h not in picks]
    picks = picks[:n - 1] if len(picks) >= n else picks
    if not any(h["factor"] == "shape" for h in picks):
        shape = sorted((h for h in best.values() if h["factor"] == "shape"), key=lambda h: -h["latent_auroc"])
        picks += shape[:1]
    picks += [h for h in ranked if h not in picks][: max(0, n - len(picks))]
    picks = picks[:n]
    # and the shape latent below 0.95 (``--diag_at``) with the most heat in the box: where the localised ones are
    low = [{"factor": "shape", "value": d["value"], "latent": d["latent"], "latent_auroc": d["auroc"], "in_box": d["in_box"],
            "peak_on_box": d["peak_on_box"], "sae_dir": res["sae_dir"], "shards": res["shards"], "layer": res["layer"],
            "sae": res["sae"], "below": True}
           for res in results for d in [(res["row"].get("diag") or {}).get("shape")] if d and d["auroc"] < 0.95]
    if low:
        picks.append(max(low, key=lambda h: h["in_box"]))
    return picks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/heatmap_world2", help="work directory (world, shards, SAEs, results.json)")
    ap.add_argument("--weights", default=None, help="the model's weights file (default: its shipped one)")
    from visae.toyclip import V2_MODELS, WORLD2_MODEL

    ap.add_argument("--model", default=None, choices=V2_MODELS, help="the toy CLIP architecture of --weights (default: "
                    f"the one its safetensors metadata records, else world2's, {WORLD2_MODEL}: 4 register tokens; "
                    "visae-toyclip2: without)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=5000, help="world seed (the toy CLIP trained on seed 0's scenes)")
    ap.add_argument("--max_objects", type=int, default=1, help="objects per image: 1 .. max_objects (1-4)")
    ap.add_argument("--layers", default="1,2,3")
    ap.add_argument("--saes", default="topk:k=8:x=4,topk:k=16:x=4,relu:l1=1e-3:x=4")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--sae_seeds", default="0", help="comma-separated SAE training seeds: one SAE per seed and spec "
                    "(a cell moves by a few hundredths with the seed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe", action="store_true", help="also the single-direction upper bound per layer")
    ap.add_argument("--figure", default=None, help="write the heatmap figure of the best concepts here (PNG)")
    ap.add_argument("--figure_rows", type=int, default=6)
    ap.add_argument("--diag_at", type=float, default=0.85, help="also report, among the latents at this lower AUROC, "
                    "the one with the most heat in the box per object factor (1: off)")
    a = ap.parse_args(argv)

    try:  # before any work: the weights' own model, or the shipped file of --model
        a.model, weights = benchlib.toy_model_and_weights(a.model, a.weights, WORLD2_MODEL, V2_MODELS)
    except ValueError as e:
        print(f"bench_heatmap_world2: {e}", file=sys.stderr)
        return 2
    weights = Path(weights)
    saes = [parse_sae(s) for s in a.saes.split(",") if s.strip()]
    layers = [int(x) for x in a.layers.split(",")]
    try:
        sae_seeds = [int(x) for x in a.sae_seeds.split(",")]
    except ValueError:
        print(f"bench_heatmap_world2: --sae_seeds {a.sae_seeds}: expected comma-separated integers", file=sys.stderr)
        return 2
    if not 1 <= a.max_objects <= 4:
        print(f"bench_heatmap_world2: --max_objects {a.max_objects}: expected 1-4", file=sys.stderr)
        return 2

    import torch

    from visae.extract import ExtractConfig, extract
    from visae.patch_recovery import format_patch_recovery, patch_recovery
    from visae.train import TrainConfig, train
    from visae.world2 import generate_world2

    from visae.atomic import atomic_write_text
    from visae.metrics import json_safe

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    clock = Clock()
    with clock("world"):
        world = generate_world2(out / "world", a.n, a.seed, max_objects=a.max_objects, progress=False, workers=1)
    with clock("extract"):
        sets = extract(ExtractConfig(images=str(world), out=str(out / "shards"), model=a.model,
                                     pretrained=str(weights), layer=",".join(map(str, layers)), token="patch",
                                     batch_size=200, num_workers=0, threads=a.threads, progress=False))
    sets = sets if isinstance(sets, dict) else {layers[0]: sets}
    results, probes = [], {}
    header = ("| layer | SAE | L0 / EV | colour family AUROC max (median), n >= 0.95 | shape | texture | size | "
              "heat of the values at 0.95: in box / in mask / touching / peak | pass |")
    lines = [header, "|" + "---|" * 9]
    for L in layers:
        ss = sets[L]
        if a.probe:
            pf = out / f"probe_layer_{L}.json"  # kept: a rerun reuses it
            if pf.is_file():
                probes[L] = json.loads(pf.read_text())
            else:
                with clock("probe"):
                    probes[L] = probe(ss, TABLE_FACTORS)
                atomic_write_text(pf, json.dumps(probes[L], indent=1))
            for fac, d in probes[L].items():
                v = np.array(list(d.values()))
                print(f"probe layer {L} {fac}: {int((v >= 0.95).sum())}/{len(v)} >= 0.95, median {np.median(v):.3f}, "
                      + ", ".join(f"{k} {x:.2f}" for k, x in d.items()), flush=True)
        for (base_name, kw), sae_seed in ((s, sd) for s in saes for sd in sae_seeds):
            name = base_name if sae_seed == 0 else f"{base_name}_s{sae_seed}"  # seed 0: the directory of older runs
            sae_dir = out / "sae" / f"layer_{L}_{name}"
            done = sae_dir / "train_summary.json"
            if not (done.is_file() and json.loads(done.read_text()).get("finished")):
                with clock("train"):
                    train(TrainConfig(shards=str(ss.path), out=str(sae_dir), num_epochs=a.epochs, batch_size=1024, lr=2e-3,
                                      resample_every=0, seed=sae_seed, progress=False, plot=False, overwrite=True, **kw))
            with clock("patch_recovery"):
                res = patch_recovery(str(sae_dir), ss, factors=("shape", "colour_family", "texture", "size", "background"),
                                     object_factors=OBJECT_FACTORS)
            val = json.loads(done.read_text())["val"][0]
            row = summarise(res)
            if a.diag_at < res["summary"]["auroc_at"]:  # where do the next-best latents fire? (not the criterion)
                with clock("patch_recovery"):
                    low = patch_recovery(str(sae_dir), ss, factors=OBJECT_FACTORS, object_factors=OBJECT_FACTORS,
                                         auroc_at=a.diag_at)
                row["diag"] = {fac: best_heat(low, fac) for fac in OBJECT_FACTORS}
                print(f"  latents at AUROC >= {a.diag_at}: " + "; ".join(
                    f'{fac}: {d["values"]} values, most heat in box {d["value"]} {d["in_box"]:.2f} (AUROC {d["auroc"]:.3f}, '
                    f'peak {d["peak_on_box"]:.2f})' if d else f"{fac}: none" for fac, d in row["diag"].items()), flush=True)
            results.append({"layer": L, "sae": name, "sae_dir": str(sae_dir), "shards": str(ss.path), "l0": val["l0"],
                            "explained_variance": val["explained_variance"], "row": row,
                            "background_max": max(v["auroc"] for v in res["values"] if v["factor"] == "background")})
            print(format_patch_recovery(res).splitlines()[-1], f"(layer {L}, {name})", flush=True)
            lines.append(format_row(L, name, row, val["l0"], val["explained_variance"]))
            print(lines[-1], flush=True)
    met = [f'layer {r["layer"]} {r["sae"]}' for r in results if r["row"]["met"]]
    print("\n" + "\n".join(lines))
    print(f"\nissue 14's criterion (>= 5 object values at AUROC >= 0.95 with >= 0.8 of the heat in the box, colour and "
          f"shape among them): {'met by ' + ', '.join(met) if met else 'not met'}")
    if a.figure:
        with clock("figure"):
            picks = pick_concepts(results, a.figure_rows)
            if picks:
                make_figure(picks, Path(world), Path(a.figure), model=a.model)
                print(f"figure: {a.figure} ({', '.join(p['factor'] + '=' + p['value'] for p in picks)})")
            else:
                print("figure: no value has a latent at AUROC >= 0.95; nothing drawn")
    for k, (w, c) in clock.t.items():
        print(f"time {k}: {w:.1f} s wall, {c:.1f} s CPU (process)")
    doc = benchlib.report("bench_heatmap_world2.py", json_safe({
        "args": vars(a), "weights": str(weights), "results": results, "probe": probes, "met": met,
        "time": {k: {"wall_s": w, "cpu_s": c} for k, (w, c) in clock.t.items()}}), argv=argv, echo=False)
    atomic_write_text(out / "results.json", json.dumps(doc, indent=1, allow_nan=False, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
