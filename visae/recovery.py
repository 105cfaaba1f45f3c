"""Concept recovery: did the SAE find the toy world's known concepts, and are they named right?

For every value of every ground-truth factor ("red", "triangle", "striped", ...) we ask which
single SAE latent best detects it: the latent whose activation has the highest AUROC at
separating images with that value from the others, over a labelled shard set of the toy
world (factor columns in the shard metadata, as ``visae extract --source toyworld`` writes).
With a naming result (``concepts.json``) we also ask whether the naming module gave that
latent the value's word, and how well the latent *named* that word detects the value.

AUROC of every (latent, value) pair is computed exactly from ranks, touching only the
latents that fire: SAE codes are >= 0 and mostly 0, so all non-firing examples of a latent
share one mid-rank and only its non-zero activations need sorting. Memory is
O(nnz of the codes + N x values).

    python -m visae.recovery --sae runs/demo/best --shards runs/demo/shards --concepts runs/demo/concepts
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from visae.atomic import atomic_write_text
from visae.errors import VisaeError
from visae.shards import ShardSet

__all__ = [
    "RecoveryError",
    "SYNONYMS",
    "sparse_auroc",
    "collect_codes",
    "concept_recovery",
    "name_matches",
    "format_recovery",
    "RecoveryConfig",
    "main",
]


class RecoveryError(VisaeError, ValueError):
    """An SAE and a shard set that cannot be scored against the world's factors: widths or activations that do not
    match, a member out of range, no (or a missing) factor column (exit status 2)."""

# Words that count as naming a value correctly (besides the value itself and its plural).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "centre": ("center", "middle", "central", "centered", "centred"),
    "left": ("leftmost",),
    "right": ("rightmost",),
    "striped": ("stripes", "stripe", "stripy", "lines", "striping"),
    "dotted": ("dots", "dot", "polka", "spotted", "dotty", "spots"),
    "plain": ("blank", "solid", "uniform"),
    "large": ("big", "huge", "larger", "largest"),
    "small": ("tiny", "little", "smaller", "smallest"),
    "circle": ("circles", "circular", "round", "disc", "disk"),
    "square": ("squares", "squared"),
    "triangle": ("triangles", "triangular"),
    "diamond": ("diamonds", "rhombus"),
    "star": ("stars", "starry"),
    "cross": ("crosses", "plus"),
    "purple": ("violet",),
    "cyan": ("turquoise", "teal", "aqua"),
    "pink": ("magenta",),
}


def _words_of(value: str) -> list[str]:
    """'in the centre' -> ['centre']; 'red circle' -> ['red', 'circle']."""
    return [w for w in re.findall(r"[a-z]+", value.lower()) if w not in ("on", "in", "the", "a", "an", "of")]


def name_matches(name: Optional[str], value: str) -> bool:
    """Whether a concept name is the value's word (or a listed synonym / plural); multi-word values need all words."""
    if not name:
        return False
    got = set(re.findall(r"[a-z]+", name.lower()))
    got |= {w[:-1] for w in got if w.endswith("s")}
    for w in _words_of(value):
        if not ({w} | set(SYNONYMS.get(w, ()))) & got:
            return False
    return True


# ----------------------------------------------------------------------------- AUROC


def sparse_auroc(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, labels: np.ndarray, n_latents: int) -> np.ndarray:
    """AUROC of every latent's activation at detecting every label, from sparse codes.

    Args:
        rows: [nnz] example index of each non-zero code (0 <= rows < N).
        cols: [nnz] latent index of each non-zero code.
        vals: [nnz] its value (> 0; codes not listed are 0).
        labels: [N, V] bool, ``labels[i, v]``: example i has value v.
        n_latents: number of latents d.

    Returns:
        [d, V] float64 AUROC (0.5 for a latent that never fires; NaN for a label with no
        positives or no negatives). Ties get mid-ranks, so this equals the usual AUROC
        (Mann-Whitney U / (n_pos * n_neg)) of the dense activation column.
    """
    labels = np.asarray(labels, bool)
    if labels.ndim != 2:
        raise ValueError(f"labels must be [N, V], got shape {labels.shape}")
    N, V = labels.shape
    rows, cols, vals = np.asarray(rows, np.int64), np.asarray(cols, np.int64), np.asarray(vals, np.float64)
    if not (rows.shape == cols.shape == vals.shape):
        raise ValueError("rows, cols and vals must have the same shape [nnz]")
    if rows.size and (rows.min() < 0 or rows.max() >= N or cols.min() < 0 or cols.max() >= n_latents):
        raise ValueError(f"rows must be in [0, {N}) and cols in [0, {n_latents})")
    if (vals <= 0).any():
        raise ValueError("vals must be > 0 (codes that do not fire are simply not listed)")
    n_pos = labels.sum(0).astype(np.float64)  # [V]
    n_neg = N - n_pos
    # Sort the non-zeros by (latent, value); rank within each latent's block with mid-ranks for ties.
    order = np.lexsort((vals, cols))
    r, c, v = rows[order], cols[order], vals[order]
    nz = np.bincount(c, minlength=n_latents)  # [d] firing count
    start = np.concatenate([[0], np.cumsum(nz)[:-1]])
    pos_in_block = np.arange(r.size) - start[c]  # 0-based rank among the latent's non-zeros
    if r.size:
        new_run = np.ones(r.size, bool)
        new_run[1:] = (c[1:] != c[:-1]) | (v[1:] != v[:-1])
        run_id = np.cumsum(new_run) - 1
        run_first = pos_in_block[new_run]
        run_len = np.bincount(run_id)
        mid = run_first[run_id] + (run_len[run_id] - 1) / 2.0
    else:
        mid = np.zeros(0)
    n0 = N - nz  # [d] non-firing examples: all tied at the bottom
    rank = n0[c] + mid + 1.0  # 1-based global rank of each non-zero within its latent
    # Per latent and value: sum of ranks of positive non-zeros, and count of positive non-zeros, as one sparse
    # product [d, N] @ [N, V] each. Exact in float64 whatever the summation order while N * nnz < 2^52: the ranks
    # are multiples of 1/2 no larger than N, so every partial sum is a multiple of 1/2 below 2^52, representable.
    from scipy import sparse

    lab = labels.astype(np.float64)
    rank_pos = np.asarray(sparse.csr_matrix((rank, (c, r)), shape=(n_latents, N)) @ lab)
    cnt_pos = np.asarray(sparse.csr_matrix((np.ones(r.size), (c, r)), shape=(n_latents, N)) @ lab)
    zero_pos = n_pos[None, :] - cnt_pos  # positives among the non-firing examples
    rank_sum = rank_pos + zero_pos * (n0[:, None] + 1.0) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc[:, (n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def collect_codes(sae: Any, shards: ShardSet, *, member: int = 0, batch_size: int = 4096, device: str = "cpu",
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream a shard set through ``sae.encode``: sparse codes (rows [nnz] example index, cols [nnz] latent, vals [nnz])."""
    if sae.d_in != shards.d:
        raise RecoveryError(f"SAE d_in={sae.d_in} but shard set {shards.path} has d={shards.d}")
    if not 0 <= member < sae.n_models:
        raise RecoveryError(f"member {member} out of range (stack of {sae.n_models})")
    norms = shards.metadata()["norm"]
    R, C, Vv = [], [], []
    batches: Iterable = shards.sequential_batches(batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-len(shards) // batch_size), desc="recovery: encode", unit="batch")
    with torch.no_grad():
        for b in batches:
            x = b.acts
            if shards.normalization == "unit_norm":
                x = x * norms[b.index][:, None]  # the SAE takes raw activations
            f = sae.encode(torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device))
            if f.ndim == 3:
                f = f[member]
            i, j = torch.nonzero(f > 0, as_tuple=True)
            R.append(b.index[i.cpu().numpy()])
            C.append(j.cpu().numpy())
            Vv.append(f[i, j].float().cpu().numpy())
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return cat(R, np.int64), cat(C, np.int64), cat(Vv, np.float64)


def _default_factors(shards: ShardSet) -> list[str]:
    src = shards.source or {}
    cols = list(shards.manifest.get("columns", {}))
    main = src.get("main_factors") or (src.get("dataset_info") or {}).get("main_factors")
    if not main:  # shards extracted before the source recorded its world's main factors
        from visae import toyworld, world2

        main = list((world2 if world2.is_world2_shards(shards) else toyworld).MAIN_FACTORS)
    return [f for f in main if f in cols]


def _name_matcher(ss: ShardSet) -> Callable[[Optional[str], str, str], bool]:
    """``match(name, factor, value_name)``: the world's naming truth (world2: its tables and colour rules,
    :func:`visae.world2.name_matches`, for the factors it has them for, ``world2.NAMED_FACTORS``; world2's other
    factors, e.g. n_objects, and the first toy world: :func:`name_matches`, the value's word)."""
    from visae import world2

    if world2.is_world2_shards(ss):
        def match(name: Optional[str], factor: str, value: str) -> bool:
            if world2.has_naming_truth(factor):
                return world2.name_matches(name, factor, value)
            return name_matches(name, value)

        return match
    return lambda name, factor, value: name_matches(name, value)


def _load_concepts(concepts: Any) -> dict[int, dict[str, Any]] | None:
    if concepts is None:
        return None
    if isinstance(concepts, (str, Path)):
        from visae.naming import read_concepts

        concepts = read_concepts(concepts)
    if isinstance(concepts, dict) and "concepts" in concepts:
        concepts = concepts["concepts"]
    return {int(c["latent"]): c for c in concepts}


def concept_recovery(sae: Any, shards: str | Path | ShardSet, *, member: int = 0, factors: Sequence[str] | None = None,
                     concepts: Any = None, batch_size: int = 4096, device: str = "cpu", recovered_at: float = 0.9,
                     named_at: float = 0.95, progress: bool = False) -> dict[str, Any]:
    """Concept-recovery score of ``sae`` (an SAE object or directory) on a labelled toy-world shard set.

    Args:
        factors: factor columns to score (default: the main factors of the shards' world, as recorded in the
            manifest's source, present in the shards).
        concepts: naming result (``concepts.json`` path / dir, its dict, or its "concepts" list), optional.
        recovered_at: a value counts as recovered when its best latent's AUROC >= this.
        named_at: with ``concepts``, ``fraction_named_at`` counts the values that have a latent with
            AUROC >= this which naming calls by the value's word (issue 6's ground truth, target 80%). What counts
            as the value's word is the world's naming truth: synonyms and plurals (:func:`name_matches`) for the
            first toy world; :func:`visae.world2.name_matches` (synonym tables, colour names by family / CIEDE2000)
            for world2. Precision: ``n_unsupported_names`` counts the firing named latents whose name names no
            value they detect with AUROC >= ``recovered_at``.

    Returns ``{"values": [per value: factor, value, n_pos, best_latent, auroc, firing_rate,
    name, name_correct, named_latents, named_auroc], "factors": {factor: mean best AUROC},
    "summary": {...; with concepts also n_named_latents, n_unsupported_names, unsupported_names (at most 50,
    {latent: name})}}``. Rows whose factor is -1 (absent) count as negatives.

    Raises NamingError (a ValueError) when ``sae`` is a directory and ``concepts`` a naming result made for another
    SAE (:func:`visae.naming.check_concepts_sae`), before any work.
    """
    if isinstance(sae, (str, Path)):
        from visae.naming import check_concepts_sae, read_concepts
        from visae.sae import load_sae

        if isinstance(concepts, (str, Path)):  # names made for another SAE are refused before any work
            where = f"concepts {concepts}"
            concepts = read_concepts(concepts)
            check_concepts_sae(concepts, sae, member, where)
        sae = load_sae(sae, device=device)
    ss = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    from visae.zeroshot import sae_shards_mismatch

    diffs = sae_shards_mismatch(sae, ss)
    if diffs:
        raise RecoveryError(f"{ss.path}: not the activations the SAE was trained on ({'; '.join(diffs)})")
    factors = list(factors) if factors is not None else _default_factors(ss)
    if not factors:
        raise RecoveryError(f"{ss.path}: no factor columns to score (columns: {list(ss.manifest.get('columns', {}))})")
    meta = ss.metadata()
    names = ss.label_names
    label_cols, value_info = [], []
    for fac in factors:
        if fac not in meta:
            raise RecoveryError(f"{ss.path}: factor column {fac!r} missing (columns: {list(ss.manifest.get('columns', {}))})")
        vnames = names.get(fac)
        col = np.asarray(meta[fac])
        if vnames is None:
            vnames = [str(v) for v in range(int(col.max()) + 1)]
        for v, vn in enumerate(vnames):
            label_cols.append(col == v)
            value_info.append((fac, v, vn))
    labels = np.stack(label_cols, 1)
    rows, cols, vals = collect_codes(sae, ss, member=member, batch_size=batch_size, device=device, progress=progress)
    d = sae.d_sae
    auc = sparse_auroc(rows, cols, vals, labels, d)
    firing = np.bincount(cols, minlength=d) / max(1, len(ss))
    named = _load_concepts(concepts)
    match = _name_matcher(ss)
    by_name: dict[int, str] = {j: c.get("name") for j, c in named.items() if c.get("name")} if named else {}
    out_vals = []
    for k, (fac, v, vn) in enumerate(value_info):
        a = auc[:, k]
        if np.isnan(a).all():
            continue
        best = int(np.nanargmax(a))
        rec: dict[str, Any] = {"factor": fac, "value": vn, "value_index": v, "n_pos": int(labels[:, k].sum()),
                               "best_latent": best, "auroc": float(a[best]), "firing_rate": float(firing[best])}
        if named is not None:
            rec["name"] = by_name.get(best)
            rec["name_correct"] = match(rec["name"], fac, vn)
            hits = [j for j, nm in by_name.items() if match(nm, fac, vn)]
            rec["named_latents"] = hits
            rec["named_auroc"] = float(np.nanmax(a[hits])) if hits else None
        out_vals.append(rec)
    res: dict[str, Any] = {
        "values": out_vals,
        "factors": {f: float(np.mean([r["auroc"] for r in out_vals if r["factor"] == f])) for f in factors
                    if any(r["factor"] == f for r in out_vals)},
    }
    au = np.array([r["auroc"] for r in out_vals])
    summary: dict[str, Any] = {
        "n_values": len(out_vals),
        "mean_best_auroc": float(au.mean()),
        "recovered_at": recovered_at,
        "fraction_recovered": float((au >= recovered_at).mean()),
        "distinct_best_latents": len({r["best_latent"] for r in out_vals}),
        "n_examples": len(ss),
        "d_sae": d,
        "alive_latents": int((firing > 0).sum()),
    }
    if named is not None:
        summary["fraction_named_right"] = float(np.mean([r["name_correct"] for r in out_vals]))
        summary["fraction_with_named_latent"] = float(np.mean([r["named_auroc"] is not None for r in out_vals]))
        na = [r["named_auroc"] for r in out_vals if r["named_auroc"] is not None]
        summary["mean_named_auroc"] = float(np.mean(na)) if na else None
        summary["named_at"] = named_at
        summary["fraction_named_at"] = float(np.mean([r["named_auroc"] is not None and r["named_auroc"] >= named_at
                                                      for r in out_vals]))
        # precision: a latent's name is supported when the latent detects (AUROC >= recovered_at) a value it names
        alive = {j: nm for j, nm in by_name.items() if firing[j] > 0}
        unsupported = [j for j, nm in alive.items()
                       if not any(match(nm, fac, vn) and auc[j, k] >= recovered_at
                                  for k, (fac, v, vn) in enumerate(value_info))]
        summary["n_named_latents"] = len(alive)
        summary["n_unsupported_names"] = len(unsupported)
        summary["unsupported_names"] = {str(j): alive[j] for j in unsupported[:50]}
    res["summary"] = summary
    return res


def format_recovery(res: dict[str, Any]) -> str:
    """A plain-text table of a recovery result."""
    named = any("name" in r for r in res["values"])
    head = f"{'factor':<11} {'value':<14} {'latent':>6} {'AUROC':>6} {'fires':>6}" + ("  name (right?)  named-latent AUROC" if named else "")
    lines = [head]
    for r in res["values"]:
        line = f"{r['factor']:<11} {r['value']:<14} {r['best_latent']:>6} {r['auroc']:>6.3f} {r['firing_rate']:>6.3f}"
        if named:
            na = "-" if r["named_auroc"] is None else f"{r['named_auroc']:.3f}"
            line += f"  {str(r['name']):<10} {'yes' if r['name_correct'] else 'no ':<4}  {na}"
        lines.append(line)
    s = res["summary"]
    lines.append(f"mean best AUROC {s['mean_best_auroc']:.3f}; recovered (AUROC >= {s['recovered_at']}) "
                 f"{s['fraction_recovered']:.0%} of {s['n_values']} values")
    if named:
        lines.append(f"named right {s['fraction_named_right']:.0%}; a latent named the value's word exists for "
                     f"{s['fraction_with_named_latent']:.0%} (mean AUROC {s['mean_named_auroc'] if s['mean_named_auroc'] is None else round(s['mean_named_auroc'], 3)})")
        lines.append(f"a latent with AUROC >= {s['named_at']} named the value's word: {s['fraction_named_at']:.0%} "
                     f"of {s['n_values']} values")
        if "n_unsupported_names" in s:  # results written before precision was counted have no such key
            lines.append(f"precision: {s['n_unsupported_names']} of {s['n_named_latents']} firing named latents carry a "
                         f"name that names no value they detect at AUROC >= {s['recovered_at']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class RecoveryConfig:
    """Concept recovery of an SAE on a labelled toy-world shard set (best latent AUROC per factor value)."""

    sae: str = field(default="", metadata={"help": "SAE directory", "required": True})
    member: int = field(default=0, metadata={"help": "member of a stacked SAE"})
    shards: str = field(default="", metadata={"help": "labelled shard set of the toy world (factor columns)",
                                              "required": True})
    concepts: Optional[str] = field(default=None, metadata={"help": "naming result (concepts.json or its directory), optional"})
    factors: tuple[str, ...] = field(default=(), metadata={"help": "factor columns to score; empty: the world's main factors"})
    batch_size: int = field(default=4096, metadata={"help": "shard rows per SAE forward pass"})
    recovered_at: float = field(default=0.9, metadata={"help": "AUROC at which a value counts as recovered"})
    out: Optional[str] = field(default=None, metadata={"help": "write the result as JSON here"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    progress: bool = field(default=True, metadata={"help": "progress bar (stderr) of the encoding pass; --no_progress: none"})

    def __post_init__(self) -> None:
        from visae.devices import check_device

        check_device(self.device, "RecoveryConfig.device")
        from visae.config import check_bounds

        # recovered_at, an AUROC threshold: outside [0, 1] everything or nothing counted
        check_bounds(self, {"member": (0, None), "batch_size": (1, None), "recovered_at": (0.0, 1.0)},
                     {"recovered_at": "(an AUROC)"})


def main(argv: list[str] | None = None) -> int:
    from visae.devices import resolve_device
    from visae.config import parse_config

    from visae.errors import VisaeError, report

    try:
        cfg = parse_config(RecoveryConfig, argv, prog="visae recovery")
        cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))  # 'auto' resolved; one this machine lacks refused
        res = concept_recovery(cfg.sae, cfg.shards, member=cfg.member, factors=cfg.factors or None,
                               concepts=cfg.concepts, batch_size=cfg.batch_size, device=cfg.device,
                               recovered_at=cfg.recovered_at, progress=cfg.progress)
    except VisaeError as e:  # a bad flag, SAE, shard set or names (exit 2; visae.errors)
        return report("visae recovery", e)
    from visae.config import absolute_paths

    # file and directory arguments recorded absolute: as typed (relative) they did not say which from elsewhere
    res["config"] = absolute_paths(dataclasses.asdict(cfg), ("sae", "shards", "concepts", "out"))
    if cfg.out:
        atomic_write_text(cfg.out, json.dumps(res, indent=1))
    print(format_recovery(res))
    return 0


if __name__ == "__main__":
    from visae.cli import run_main

    sys.exit(run_main("python -m visae.recovery", main))
