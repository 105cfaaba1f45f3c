"""Select the best SAE of a sweep by the zero-shot accuracy of its reconstructions.

    python scripts/select_sae.py --sweep runs/sweep [--max_l0 64] [--max_dead 0.1]

Each trial of ``<sweep>/trials/`` is scored once on the selection set (the sweep's
``val_shards``, or the held-out split of its training shards) with
:func:`visae.zeroshot.evaluate`: zero-shot top-1 / top-5 of its reconstructions, the clean
accuracy, L0, explained variance and dead fraction on that same set. Scores are cached in
``trials/<name>/zeroshot.json`` (keyed by the selection set, classifier and the weights
file), so re-selecting under other constraints costs nothing. Trials of one shape are
scored together as one stacked SAE in one pass over the data.

The rule (``rule``) decides which trial is chosen among the finished trials that meet the
constraints (``max_l0``, ``max_dead``): ``best`` (default) maximises the metric
(``zeroshot_top1`` by default; ties go to the lower L0, then the name); ``sparsest_within``
takes the lowest-L0 trial whose zero-shot drop below the clean accuracy (``drop_pts``, clean
minus reconstruction, percentage points) is at most ``max_drop`` (ties: higher metric, then
name): the sparsest point of the sparsity-fidelity frontier within a tolerance (Gao et al. 2024,
"Scaling and evaluating sparse autoencoders", compare SAEs on that frontier; docs/sweeps.md).
No trial within the tolerance is an error, like no trial within the constraints. Trials whose zero-shot accuracy is within 2 binomial standard errors of the chosen
one's are marked ``tied`` (the selection set cannot tell them apart; the leaderboard and
``selection.json`` say so). Written to the sweep directory: ``leaderboard.csv`` /
``leaderboard.md`` (every trial, best first, with ``feasible`` / ``pareto`` / ``tied`` /
``chosen`` columns), ``pareto.png``
(L0 against the metric, clean accuracy as a horizontal line, the chosen SAE marked),
``drop_vs_l0.png`` (zero-shot drop against L0 for every trial, the chosen one marked, the
tolerance drawn under ``sparsest_within``; zero-shot metrics only), ``selection.json`` (with
``rule`` and ``max_drop``), and ``best/`` (a copy of the chosen trial's SAE dir plus
``selection.json`` naming the trial).
"""

from __future__ import annotations

import dataclasses

import csv
import io
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from visae.atomic import atomic_write_text, save_figure
from visae.config import ConfigError, absolute_paths, check_bounds, check_fraction_constraint, parse_config
from visae.errors import VisaeError
from visae.resources import config_yaml
from visae.shards import ShardError, ShardSet
from visae.sweepdir import SCORE_FORMAT, SweepDir, SweepError, weights_problem

DEFAULT_YAML = config_yaml("select.yaml")
METRICS = ("zeroshot_top1", "zeroshot_top5", "explained_variance")
RULES = ("best", "sparsest_within")
# drop_pts = 100 (clean - recon) of two accuracies in [0, 1]: the subtraction and the scaling round at most ~3 times,
# each by eps relative to values <= 100, so a drop "equal" to max_drop may exceed it by that much (e.g. 100 * (0.996 -
# 0.995) = 0.10000000000000009): it is compared with max_drop + _DROP_TOL points.
_DROP_TOL = 4 * sys.float_info.epsilon * 100
# rule sparsest_within: a trial whose drop is within this many paired standard errors of max_drop is "borderline"
_BORDER_Z = 2.0

__all__ = ["SelectConfig", "SelectError", "score_trials", "select", "select_if_complete", "leaderboard",
           "drop_standard_error", "main"]


class SelectError(VisaeError, ValueError):
    """Selection cannot proceed (no scored trials, no trial meets the constraints, ...)."""


@dataclass(frozen=True)
class SelectConfig:
    """Re-select the best SAE of a sweep under constraints, without retraining (scores are cached per trial)."""

    sweep: str = field(default="", metadata={"help": "sweep directory (made by `visae sweep`)", "required": True})
    max_l0: Optional[float] = field(default=None, metadata={"help": "constraint: mean L0 at most this (null: the "
                                                                    "sweep's setting; inf: none)"})
    max_dead: Optional[float] = field(default=None, metadata={"help": "constraint: dead fraction at most this (null: "
                                                                      "the sweep's setting; inf: none)"})
    metric: Optional[str] = field(default=None, metadata={"help": "zeroshot_top1 | zeroshot_top5 | "
                                                                  "explained_variance (null: the sweep's)"})
    rule: Optional[str] = field(default=None, metadata={"help": "best (highest metric) | sparsest_within (lowest L0 "
                                                                "whose zero-shot drop <= max_drop) (null: the "
                                                                "sweep's)"})
    max_drop: Optional[float] = field(default=None, metadata={"help": "rule sparsest_within: tolerated zero-shot "
                                                                      "drop below the clean accuracy, percentage "
                                                                      "points (null: the sweep's)"})
    val_shards: Optional[str] = field(default=None, metadata={"help": "selection shard set (null: the sweep's)"})
    rescore: bool = field(default=False, metadata={"help": "ignore cached scores and score every trial again"})
    device: str = field(default="cpu", metadata={"help": "torch device for scoring"})
    batch_size: int = field(default=4096, metadata={"help": "rows per scoring batch"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        from visae.devices import check_device

        check_device(self.device, "SelectConfig.device")
        if self.rule is not None and self.rule not in RULES:
            raise ConfigError(f"SelectConfig.rule must be one of {RULES} (or null: the sweep's), got {self.rule!r}")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise ConfigError(f"SelectConfig.max_drop must be >= 0 percentage points, got {self.max_drop}")
        if self.rule == "best" and self.max_drop is not None:
            raise ConfigError(f"SelectConfig.max_drop ({self.max_drop:g}) applies only with rule sparsest_within, "
                              "not with rule best")
        # refused before any trial is scored: a batch size of 0 failed inside scoring (range() step 0), a negative
        # one scored no rows; a negative (or NaN) constraint excluded every trial, only after all were scored
        check_bounds(self, {"batch_size": (1, None), **({"max_l0": (0.0, None)} if self.max_l0 is not None else {})},
                     {"max_l0": "(null: the sweep's setting; inf: none)"}, allow_inf=("max_l0",))
        check_fraction_constraint(self, "max_dead", null="the sweep's setting")


# ----------------------------------------------------------------------------- scoring


@dataclass
class _Context:
    """What scoring needs, built once: the selection data, the classifier (or None), the cache key."""

    data: Any
    classifier: Any
    label_column: str
    key: dict[str, Any]
    facts: dict[str, Any]
    splice: Any = None  # visae.zeroshot.SplicedSelection: residual-layer SAEs scored through the splice


def _check_selection_set(out: Path, tcfg: dict[str, Any], ss: ShardSet, given: bool) -> None:
    """Refuse a selection set of other activations than the sweep trained on (model, layer, token: the trials would be
    scored on rows they never saw, and one published as best on that score); warn when a given selection set is the
    training set itself (every score then measured on the examples the SAEs were fitted to)."""
    from visae.zeroshot import site_mismatch

    try:
        train = ShardSet(tcfg["shards"])
    except (ShardError, KeyError, TypeError):
        return  # the training set moved or was deleted: nothing to compare with (the trials record their own)
    diffs = site_mismatch(train.source, ss.source)
    if diffs:
        raise SelectError(f"{out}: the selection set {ss.path} holds other activations than the sweep trained on "
                          f"({train.path}): {'; '.join(diffs)}")
    if given and train.path.resolve() == ss.path.resolve():
        print(f"visae select: warning: the selection set {ss.path} is the sweep's training set: every score is "
              "measured on examples the SAEs were trained on (pass held-out --val_shards)", file=sys.stderr)


def _selection_context(out: Path, doc: dict[str, Any], val_shards: str | None = None, device: str = "cpu",
                       metric: str | None = None, progress: bool = False) -> _Context:
    from visae.zeroshot import ZeroShotError, classifier_for_shards

    tcfg = doc["train_config"]
    cfg = doc["config"].get("selection", doc["config"])  # sweep.json v1 had the selection fields at the top
    clf = cfg.get("classifier", cfg)  # ... and the classifier's fields among them
    val = val_shards if val_shards is not None else cfg.get("val_shards", "")
    try:
        if val:
            ss = ShardSet(val)
            data = ss
            subset = "all"
        else:
            ss = ShardSet(tcfg["shards"])
            vf, seed = float(tcfg.get("val_fraction", 0.0)), int(tcfg.get("seed", 0))
            if vf <= 0:
                raise SelectError(f"{out}: no selection set: the sweep has no --val_shards and its training split "
                                  "holds nothing out (val_fraction 0); pass --val_shards")
            data = ss.split(vf, seed=seed)[1]
            subset = f"split(val_fraction={vf}, seed={seed})"
            if len(data) == 0:
                raise SelectError(f"{out}: no selection set: val_fraction {vf:g} of the {len(ss)} rows of "
                                  f"{tcfg['shards']} holds out none (rounded to 0); pass --val_shards")
    except ShardError as e:
        raise SelectError(f"selection shard set: {e}") from None
    trained_on = (doc.get("data") or {}).get("train.shards")
    if not val and trained_on and ss.fingerprint() != trained_on:  # the held-out split of data the SAEs never saw
        raise SelectError(f"{out}: the training shard set {tcfg['shards']} changed since the sweep trained on it (its "
                          "content differs from sweep.json's data): its held-out split is not the trials' any more; "
                          "pass --val_shards, or sweep again into a new --out")
    _check_selection_set(out, tcfg, ss, bool(val))
    metric = metric or cfg.get("metric", "zeroshot_top1")
    from visae.zeroshot import residual_layer

    if metric.startswith("zeroshot") and residual_layer(ss.source) is not None:
        return _spliced_context(out, ss, data, subset, clf, device, progress)
    classifier, column, facts = None, "label", {}
    try:
        classifier, column, facts = classifier_for_shards(
            ss, model=clf.get("model", ""), pretrained=clf.get("pretrained"), benchmark=clf.get("benchmark", "auto"),
            label_column=clf.get("label_column", ""), classnames_file=clf.get("classnames_file"),
            templates_file=clf.get("templates_file"), text_cache=clf.get("text_cache"), device=device)
    except Exception as e:  # noqa: BLE001 - no classifier is fine for the explained-variance metric
        if metric.startswith("zeroshot"):
            raise SelectError(f"cannot zero-shot score on {ss.path}: {e}\n(select with --metric explained_variance "
                              "to choose by reconstruction alone)") from e
        facts = {"zeroshot_unavailable": str(e)}
        if not isinstance(e, (ZeroShotError, ValueError, OSError)):
            print(f"visae select: no zero-shot classifier ({type(e).__name__}: {e})", file=sys.stderr)
    key = {"format": SCORE_FORMAT, "data": str(ss.path.resolve()), "fingerprint": ss.fingerprint(), "subset": subset,
           "n": len(data), "classifier": None if classifier is None else {**classifier.key, "label_column": column,
                                                           "benchmark": facts.get("benchmark")}}
    return _Context(data, classifier, column, key, facts)


def _spliced_context(out: Path, ss: ShardSet, data: Any, subset: str, clf: dict[str, Any], device: str,
                     progress: bool) -> _Context:
    """A residual-layer selection set: each SAE is spliced into the model, scored over the rows' images."""
    from visae.zeroshot import ZeroShotError, spliced_selection

    try:
        sel, facts = spliced_selection(
            data, model=clf.get("model", ""), pretrained=clf.get("pretrained"), benchmark=clf.get("benchmark", "auto"),
            label_column=clf.get("label_column", ""), classnames_file=clf.get("classnames_file"),
            templates_file=clf.get("templates_file"), text_cache=clf.get("text_cache"), device=device,
            progress=progress)
    except ZeroShotError as e:
        raise SelectError(f"cannot zero-shot score on {ss.path} through the splice: {e}\n(select with --metric "
                          "explained_variance to choose by reconstruction alone)") from None
    column = facts["label_column"]
    key = {"format": SCORE_FORMAT, "data": str(ss.path.resolve()), "fingerprint": ss.fingerprint(), "subset": subset,
           "n": len(data), "classifier": {**sel.classifier.key, "label_column": column, "benchmark": facts.get("benchmark")},
           "splice": {**facts["splice"], "images": facts["images"], "n_images": facts["n_images"],
                      "baseline": "mean-ablation"}}
    return _Context(data, None, column, key, facts, splice=sel)


def score_trials(out: str | Path, names: Sequence[str] | None = None, *, val_shards: str | None = None,
                 device: str = "cpu", batch_size: int = 4096, rescore: bool = False, progress: bool = False,
                 max_stack: int = 32, metric: str | None = None) -> dict[str, dict[str, Any]]:
    """Score the trials ``names`` (default: every trial with weights) of sweep ``out``; cached per trial.

    ``metric`` (default: the sweep's) only decides whether a missing zero-shot classifier is
    an error (zero-shot metrics) or is recorded and skipped (``explained_variance``).

    Returns {trial name: score doc} where score doc = {"key", "weights", "result"} and
    ``result`` has ``clean`` (when zero-shot applies) and ``recon`` (one member's metrics).

    Raises:
        SelectError: a trial's weights are of another size than its cfg.json recorded (truncated or replaced:
            ``SweepDir.weights_problem``), before any scoring; the same ``visae sweep`` command trains it again.
    """
    import dataclasses

    import torch

    from visae.sae import load_sae, stack_saes
    from visae.zeroshot import evaluate

    out = Path(out)
    sd = SweepDir(out)
    doc = sd.read_plan()
    trials = sd.trials_with_weights(names)
    if not trials:
        return {}
    damaged = {t: why for t in trials if (why := sd.weights_problem(t)) is not None}
    if damaged:  # scored from a cached score, it could have been chosen and copied damaged into best/
        demo_dir = out.resolve().parent
        how = (f"rerun the demo (visae demo --out {demo_dir} with its settings)" if (demo_dir / "demo_state.json").is_file()
               else "rerun the same `visae sweep` command")
        raise SelectError(f"{out}: {len(damaged)} trial(s) are damaged ({'; '.join(damaged.values())}); {how} to train "
                          "them again (their directories are set aside), then select")
    ctx = _selection_context(out, doc, val_shards, device, metric, progress)
    scores: dict[str, dict[str, Any]] = {}
    todo: list[str] = []
    for name in trials:
        hit = None if rescore else sd.read_score(name, ctx.key)
        if hit is not None:
            scores[name] = hit
        else:
            todo.append(name)
    if not todo:
        return scores
    # one stacked pass per same-shape batch of trials
    loaded = [(name, load_sae(sd.trial_dir(name), device=device)) for name in todo]
    buckets: dict[Any, list[tuple[str, Any]]] = {}
    for name, sae in loaded:
        buckets.setdefault(dataclasses.replace(sae.cfg, n_models=1), []).append((name, sae))
    for items in buckets.values():
        for i in range(0, len(items), max_stack):
            chunk = items[i:i + max_stack]
            stacked = stack_saes([s for _, s in chunk]) if len(chunk) > 1 else chunk[0][1]
            with torch.inference_mode():
                res = evaluate(ctx.data, ctx.classifier, stacked, label_column=ctx.label_column,
                               batch_size=batch_size, device=device, progress=progress)
            for j, (name, one) in enumerate(chunk):
                member = {k: v for k, v in res.items() if k != "recon"}
                member["recon"] = res["recon"][j]
                member.update(ctx.facts)
                if ctx.splice is not None:  # a residual layer: zero-shot accuracy of the model with it spliced in
                    member.update({**ctx.splice.summary(), "n_rows": res["n"]})
                    member["recon"] = {**res["recon"][j], **ctx.splice.score(one, name)}
                scores[name] = sd.write_score(name, ctx.key, member)
    return scores


# ----------------------------------------------------------------------------- selection


def _metric_value(result: dict[str, Any], metric: str) -> float:
    r = result["recon"]
    if metric == "explained_variance":
        return float(r["explained_variance"])
    k = metric.split("_")[-1]
    if k not in r:
        raise SelectError(f"metric {metric} needs zero-shot scores; these trials were scored without a classifier")
    return float(r[k])


def _drop_points(row: dict[str, Any], metric: str) -> float | None:
    """Clean minus reconstruction zero-shot accuracy of ``metric``'s k, in percentage points (None: not zero-shot)."""
    if not metric.startswith("zeroshot"):
        return None
    clean = row.get("clean_" + metric.split("_")[-1])
    if clean is None or not math.isfinite(row["score"]):
        return None
    return 100.0 * (float(clean) - row["score"])


def drop_standard_error(lost: int, gained: int, n: int) -> float:
    """Standard error, in percentage points, of a zero-shot drop measured as a paired difference on ``n`` examples.

    ``lost``: examples the clean embeddings classify right and the reconstruction wrong; ``gained``: the reverse
    (the discordant counts of McNemar's test). drop = 100 (lost - gained) / n, and over examples drawn independently
    its variance is (lost + gained - (lost - gained)^2 / n) / n^2 (the variance of the per-example difference
    clean_hit - recon_hit, in {-1, 0, 1}, over n). Pairing is what makes it small: the difference of two independent
    accuracies of 0.69 on 10,000 examples each has a standard error of 0.65 points, while a reconstruction that
    changes 6 % of the answers has a drop known to about 0.24.

    Raises:
        ValueError: n < 1, a negative count, or lost + gained > n.
    """
    if n < 1 or lost < 0 or gained < 0 or lost + gained > n:
        raise ValueError(f"drop_standard_error: need n >= 1 and 0 <= lost + gained <= n, got lost {lost}, gained "
                         f"{gained}, n {n}")
    var = (lost + gained - (lost - gained) ** 2 / n) / n ** 2
    return 100.0 * math.sqrt(max(var, 0.0))


def _drop_se(row: dict[str, Any], recon: dict[str, Any], metric: str) -> float | None:
    """The paired standard error of ``row``'s drop (points); None when the score has no discordant counts (cached by
    visae before 2026-12-02)."""
    if not metric.startswith("zeroshot"):
        return None
    k = metric.split("_")[-1]
    lost, gained, n = recon.get("lost_" + k), recon.get("gained_" + k), row.get("n_val")
    if lost is None or gained is None or not n:
        return None
    try:
        return drop_standard_error(int(lost), int(gained), int(n))
    except ValueError as e:
        raise SelectError(f"trial {row['trial']}: its cached score is inconsistent ({e}); rescore it (--rescore)") from None


def _borderline_record(rows: list[dict[str, Any]], rule: str) -> dict[str, Any]:
    """``selection.json``'s ``borderline`` (the candidates of :func:`_borderline_candidates` that are borderline; None
    under rule best, or when one of them has no standard error) and ``n_drop_se_unknown``."""
    if rule != "sparsest_within":
        return {"borderline": None, "n_drop_se_unknown": None}
    cand = _borderline_candidates(rows)
    unknown = sum(r.get("borderline") is None for r in cand)
    return {"borderline": None if unknown else [r["trial"] for r in cand if r["borderline"]],
            "n_drop_se_unknown": unknown}


def _borderline_candidates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Under sparsest_within, the rows whose side of the tolerance decides the choice: those that meet every other
    constraint (feasible, or excluded by the drop alone) and are no denser than the chosen trial (all of them when
    none is chosen). A borderline one among them may change the choice with other selection examples."""
    chosen = next((r for r in rows if r["chosen"]), None)
    return [r for r in rows if r["within_max_drop"] is not None and _excluded_by_drop_alone(r)
            and (chosen is None or r["l0"] <= chosen["l0"])]


def _excluded_by_drop_alone(row: dict[str, Any]) -> bool:
    """Whether ``row`` meets every constraint but (perhaps) the tolerance: ``excluded_by`` lists only drop reasons."""
    return all(w.startswith("drop ") for w in row["excluded_by"].split("; ") if w)


def degenerate_reasons(row: dict[str, Any]) -> list[str]:
    """Why a trial's reconstructions are no SAE's worth choosing, whatever the constraints: every latent dead (L0 0:
    the reconstruction is the decoder bias), or an explained variance below -1 or infinite (a squared error over
    twice the data's variance: a diverged run; an untrained SAE whose codes are all 0 has EV 0, a short run of a
    working one may be a little below 0 and is kept). Empty when neither. Such a trial scores near a constant
    predictor's zero-shot accuracy; tied with the others within noise, it won the lower-L0 tie-break (L0 0). An EV
    of NaN (a selection set without spread: undefined) is no reason."""
    out = []
    l0, ev = row.get("l0"), row.get("explained_variance")
    if isinstance(l0, (int, float)) and l0 == 0:
        out.append("degenerate: every latent dead (L0 0)")
    if isinstance(ev, (int, float)) and (ev < -1 or math.isinf(ev)):  # NaN: undefined (no spread), not a fault
        out.append(f"degenerate: explained variance {ev:.3g} < -1 (diverged)")
    return out


def leaderboard(out: Path, scores: dict[str, dict[str, Any]], metric: str, max_l0: float | None,
                max_dead: float | None, rule: str = "best", max_drop: float | None = None) -> list[dict[str, Any]]:
    """One row per scored trial, in the rule's order; marks feasible, Pareto-optimal (L0 vs metric) and chosen.

    A trial is infeasible when unfinished, outside ``max_l0`` / ``max_dead``, of a non-finite score, or degenerate
    (:func:`degenerate_reasons`: every latent dead, or explained variance < -1: diverged).
    ``rule`` "best": the feasible trial with the highest metric (ties: lower L0, then name) is
    chosen. "sparsest_within": a trial is feasible only if, besides the constraints, its
    zero-shot drop ``drop_pts`` = 100 (clean - reconstruction accuracy) <= ``max_drop``
    (percentage points); the feasible trial with the lowest L0 is chosen (ties: higher metric,
    then name): the sparsest point of the sparsity-fidelity frontier that keeps the accuracy
    within tolerance (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", compare
    SAEs on that frontier). Every row gets ``drop_pts`` (None without a clean zero-shot accuracy),
    ``drop_se_pts`` (its paired standard error, :func:`drop_standard_error`; None for a score cached
    before visae recorded the discordant counts), ``within_max_drop`` and ``borderline`` (the drop
    within 2 standard errors of ``max_drop``: the selection set cannot tell which side the trial is
    on; both None under rule "best").
    """
    if rule not in RULES:
        raise SelectError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "sparsest_within" and (max_drop is None or not max_drop >= 0):
        raise SelectError(f"rule sparsest_within needs max_drop >= 0 (percentage points), got {max_drop}")
    rows = []
    sd = SweepDir(out)
    for name, doc in scores.items():
        res = doc["result"]
        r = res["recon"]
        row = {"trial": name, **sd.trial_record(name), "score": _metric_value(res, metric),
               "l0": r["l0"], "dead_fraction": r["dead_fraction"], "explained_variance": r["explained_variance"],
               "recon_top1": r.get("top1"), "recon_top5": r.get("top5"),
               "clean_top1": res.get("clean", {}).get("top1"), "clean_top5": res.get("clean", {}).get("top5"),
               "delta_top1": r.get("delta_top1"), "recon_loss": r.get("loss"), "kl_to_clean": r.get("kl_to_clean"),
               "recovered": r.get("accuracy_recovered"), "ablated_top1": res.get("ablated", {}).get("top1"),
               "n_val": res.get("n")}
        why = []
        if not row["finished"]:
            why.append("unfinished")
        if max_l0 is not None and not row["l0"] <= max_l0:
            why.append(f"L0 {row['l0']:.1f} > {max_l0:g}")
        if max_dead is not None and not row["dead_fraction"] <= max_dead:
            why.append(f"dead {row['dead_fraction']:.3f} > {max_dead:g}")
        if not math.isfinite(row["score"]):
            why.append("score not finite")
        why += degenerate_reasons(row)
        row["drop_pts"] = _drop_points(row, metric)
        row["drop_se_pts"] = _drop_se(row, r, metric)
        row["within_max_drop"] = row["borderline"] = None
        if rule == "sparsest_within":
            row["within_max_drop"] = row["drop_pts"] is not None and row["drop_pts"] <= max_drop + _DROP_TOL
            if row["drop_pts"] is not None and row["drop_se_pts"] is not None:
                # the selection set cannot tell on which side of the tolerance this trial lies
                row["borderline"] = abs(row["drop_pts"] - max_drop) <= _BORDER_Z * row["drop_se_pts"]
            if row["drop_pts"] is None:
                why.append("no clean zero-shot accuracy to measure a drop against")
            elif not row["within_max_drop"]:
                why.append(f"drop {row['drop_pts']:.2f} pts > max_drop {max_drop:g}")
        row["feasible"] = not why
        row["excluded_by"] = "; ".join(why)
        rows.append(row)
    # Pareto front over all trials: no other trial has L0 <= and score >= with one strict
    for a in rows:
        a["pareto"] = not any((b["l0"] <= a["l0"] and b["score"] >= a["score"])
                              and (b["l0"] < a["l0"] or b["score"] > a["score"]) for b in rows)
    def neg_score(r: dict[str, Any]) -> float:
        return -r["score"] if math.isfinite(r["score"]) else math.inf

    if rule == "sparsest_within":  # feasible (within tolerance) sparsest first; the rest best first
        rows.sort(key=lambda r: (not r["feasible"], r["l0"] if r["feasible"] else 0.0, neg_score(r), r["l0"],
                                 r["trial"]))
    else:
        rows.sort(key=lambda r: (not r["feasible"], neg_score(r), r["l0"], r["trial"]))
    for i, r in enumerate(rows):
        r["rank"] = i + 1
        r["chosen"] = False
    if rows and rows[0]["feasible"]:
        rows[0]["chosen"] = True
        if rule == "sparsest_within":  # a denser trial that scores alike is no rival: the borderline ones are
            for r in rows:
                r["tied"] = None
        else:
            _mark_ties(rows, metric)
    return rows


def _mark_ties(rows: list[dict[str, Any]], metric: str, z: float = 2.0) -> None:
    """``tied``: a feasible trial whose zero-shot accuracy is within ``z`` standard errors of the chosen one's.

    Accuracy on n selection examples is a binomial estimate; the standard error of a difference
    of two is sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n) (treating the two as independent, which
    overstates the noise of a paired comparison a little). Tied trials are ones the selection set
    cannot tell apart: the choice among them rests on noise (or, for equal scores, the lower L0).
    """
    best = rows[0]
    n = best.get("n_val") or 0
    for r in rows:
        r["tied"] = None
    if not metric.startswith("zeroshot") or n <= 0:
        return
    p1 = best["score"]
    for r in rows:
        if r is best or not r["feasible"]:
            continue
        p2 = r["score"]
        se = math.sqrt(max(p1 * (1 - p1), 0.0) / n + max(p2 * (1 - p2), 0.0) / n)
        r["tied"] = abs(p1 - p2) <= z * se if se > 0 else p1 == p2


_COLUMNS = ["rank", "trial", "chosen", "tied", "feasible", "excluded_by", "pareto", "score", "recon_top1", "recon_top5",
            "clean_top1", "clean_top5", "delta_top1", "drop_pts", "drop_se_pts", "within_max_drop", "borderline", "recovered", "ablated_top1", "l0", "dead_fraction", "explained_variance", "recon_loss",
            "kl_to_clean", "expansion", "d_sae", "lr", "l1_coeff", "architecture", "finished", "n_val"]


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _rule_text(rule: str, max_drop: float | None, metric: str) -> str:
    """One sentence: how the chosen trial was picked."""
    if rule == "sparsest_within":
        return (f"Rule: **sparsest_within**, max_drop {max_drop:g} points: the lowest-L0 trial whose {metric} is at "
                f"most {max_drop:g} percentage points below the clean embeddings' (ties: higher {metric}).")
    return f"Rule: **best**: the highest {metric} (ties: lower L0)."


def _write_tables(out: Path, rows: list[dict[str, Any]], metric: str, constraints: dict[str, Any],
                  rule: str = "best", max_drop: float | None = None) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in _COLUMNS})
    sd = SweepDir(out)
    atomic_write_text(sd.leaderboard_csv, buf.getvalue())
    md_cols = ["rank", "trial", "score", "recon_top1", "recon_top5", "delta_top1"]
    if any(r.get("drop_pts") is not None for r in rows):
        md_cols.append("drop_pts")
    if any(r.get("drop_se_pts") is not None for r in rows):
        md_cols.append("drop_se_pts")
    if rule == "sparsest_within":
        md_cols += ["within_max_drop", "borderline"]
    if any(r.get("recovered") is not None for r in rows):
        md_cols.append("recovered")
    md_cols += ["l0", "dead_fraction", "explained_variance", "feasible", "pareto", "tied", "chosen"]
    if any(r.get("excluded_by") for r in rows):  # why a trial is not feasible: a constraint, or degenerate
        md_cols.append("excluded_by")
    kc = "clean_top5" if metric == "zeroshot_top5" else "clean_top1"  # the metric's own k
    clean = next((r[kc] for r in rows if r.get(kc) is not None), None)
    cons = ", ".join(f"{k} <= {v:g}" for k, v in constraints.items() if v is not None) or "none"
    lines = [f"# Sweep leaderboard: {out}", "",
             f"Metric: **{metric}** (of reconstructions, on the selection set); constraints: {cons}.",
             _rule_text(rule, max_drop, metric)]
    if clean is not None:
        lines.append(f"Clean zero-shot top-{kc[-1]} of the original embeddings: {clean:.4f}.")
    ablated = next((r["ablated_top1"] for r in rows if r.get("ablated_top1") is not None), None)
    if ablated is not None:
        lines.append(f"Residual-layer SAEs, scored spliced into the model (recon_top1: the model with the SAE's "
                     f"reconstruction at that layer). Baseline: mean-ablation of the layer's tokens, top-1 {ablated:.4f}; "
                     "recovered = (spliced - ablated) / (clean - ablated).")
    chosen = [r for r in rows if r["chosen"]]
    if chosen:
        lines.append(f"Chosen: **{chosen[0]['trial']}**.")
    elif rule == "sparsest_within":
        lines.append(f"Chosen: none (no trial meets the constraints with a drop of at most {max_drop:g} points; "
                     "see drop_pts and excluded_by).")
    else:
        lines.append("Chosen: none (no trial meets the constraints; see excluded_by).")
    if not chosen:
        kept = _kept_selection(SweepDir(out))
        if kept:
            rule_then = kept.get("rule", "best")
            tol = f", max_drop {kept['max_drop']:g} points" if rule_then == "sparsest_within" and kept.get("max_drop") is not None else ""
            lines.append(f"`best/` still holds **{kept['trial']}**, chosen by an earlier selection (rule {rule_then}{tol}, "
                         f"metric {kept.get('metric')}); this one changed nothing there.")
    if any(r.get("drop_pts") is not None for r in rows):
        lines.append("drop_pts: clean minus reconstruction zero-shot accuracy of the metric, percentage points "
                     "(drop_vs_l0.png plots it against L0).")
    if any(r.get("drop_se_pts") is not None for r in rows):
        lines.append("drop_se_pts: its standard error, from the examples the reconstruction gets wrong where the "
                     "clean embedding is right and the reverse (a paired difference on the same examples).")
    if rule == "sparsest_within":
        cand = _borderline_candidates(rows)
        border = [r["trial"] for r in cand if r.get("borderline")]
        unknown = [r["trial"] for r in cand if r.get("borderline") is None]
        if border:
            lines += ["", f"**{len(border)} trial(s) that could change the choice are borderline**: the chosen one "
                      f"or sparser, their drop within 2 standard errors of max_drop {max_drop:g} ({', '.join(border)}). "
                      "The selection set cannot tell whether they are within the tolerance: with other selection "
                      "examples the rule may choose differently. (The borderline column marks every trial whose drop "
                      "lies that close to max_drop; a denser one cannot change the choice.) A larger selection set (`visae select --val_shards`; "
                      "in `visae demo`, --n_select_images) narrows the error."]
        if unknown:
            lines += ["", f"The drop's standard error is unknown for {len(unknown)} trial(s) ({', '.join(unknown)}): "
                      "scores cached by an older visae (--rescore)."]
    tied = [r["trial"] for r in rows if r.get("tied") and not r["chosen"]]
    if tied and rule != "sparsest_within":  # under sparsest_within a denser trial that scores alike is no rival
        lines += ["", f"**{len(tied)} other trial(s) tie with the chosen one**: their {metric} is within 2 standard "
                  f"errors of it on {rows[0].get('n_val')} selection examples ({', '.join(tied)}). The selection set "
                  "cannot tell them apart: the choice among them rests on differences within noise (and, for equal "
                  "scores, on the lower L0). A larger selection set (`visae select --val_shards`; in `visae demo`, "
                  "--n_select_images) or another criterion would be "
                  "needed to separate them."]
    lines += ["", "| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    for r in rows:
        cells = [_fmt(r.get(k)) for k in md_cols]
        if r["chosen"]:
            cells[1] = f"**{cells[1]}**"
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(sd.leaderboard_md, "\n".join(lines) + "\n")


def _scatter_trials(ax: Any, rows: list[dict[str, Any]], y: str) -> None:
    """Every trial at (L0, ``row[y]``), one colour per expansion factor; trials not ``feasible`` hollow."""
    import matplotlib.pyplot as plt

    exps = sorted({r["expansion"] for r in rows if r["expansion"] is not None}) or [None]
    cmap = plt.get_cmap("viridis")
    for i, e in enumerate(exps):
        sel = [r for r in rows if r["expansion"] == e]
        colour = cmap(i / max(1, len(exps) - 1)) if len(exps) > 1 else "tab:blue"
        feas = [r for r in sel if r["feasible"]]
        infeas = [r for r in sel if not r["feasible"]]
        ax.scatter([r["l0"] for r in feas], [r[y] for r in feas], color=colour, s=28, zorder=3,
                   label=f"expansion {e}" if e is not None else "trials")
        if infeas:
            ax.scatter([r["l0"] for r in infeas], [r[y] for r in infeas], facecolors="none",
                       edgecolors=colour, s=28, zorder=3)


def _mark_chosen_and_l0_axis(ax: Any, rows: list[dict[str, Any]], y: str, label: str) -> None:
    """The chosen trial as a red star at (L0, ``row[y]``); the L0 axis labelled, logarithmic past a 20x range."""
    for r in rows:
        if r["chosen"]:
            ax.scatter([r["l0"]], [r[y]], marker="*", s=260, color="tab:red", edgecolors="black", zorder=4,
                       label=f"{label}: {r['trial']}")
    l0s = [r["l0"] for r in rows if r["l0"] > 0]
    if l0s and max(l0s) / min(l0s) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (mean active latents per example, selection set)")


def _plot(out: Path, rows: list[dict[str, Any]], metric: str, max_l0: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    _scatter_trials(ax, rows, "score")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["l0"])
    if len(front) > 1:
        ax.plot([r["l0"] for r in front], [r["score"] for r in front], color="grey", lw=1, ls="-", zorder=2,
                label="Pareto front")
    clean_key = {"zeroshot_top1": "clean_top1", "zeroshot_top5": "clean_top5"}.get(metric)
    clean = next((r[clean_key] for r in rows if clean_key and r.get(clean_key) is not None), None)
    if clean is not None:
        ax.axhline(clean, color="black", ls="--", lw=1, label=f"clean accuracy {clean:.3f}")
    if max_l0 is not None and math.isfinite(max_l0):
        ax.axvline(max_l0, color="tab:red", ls=":", lw=1, label=f"max L0 {max_l0:g}")
    _mark_chosen_and_l0_axis(ax, rows, "score", "chosen")
    ax.set_ylabel({"zeroshot_top1": "zero-shot top-1 of reconstructions", "zeroshot_top5":
                   "zero-shot top-5 of reconstructions"}.get(metric, metric))
    ax.set_title(f"{out.name}: {len(rows)} trials" + (" (hollow: excluded by constraints or degenerate)"
                                                       if any(not r["feasible"] for r in rows) else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, SweepDir(out).pareto_png, dpi=120)


def _plot_drop(out: Path, rows: list[dict[str, Any]], metric: str, rule: str, max_drop: float | None) -> bool:
    """``drop_vs_l0.png``: every trial's zero-shot drop (clean - reconstruction, points) against its L0.

    The chosen trial is a red star, trials excluded by a constraint (or, under sparsest_within, by
    the tolerance) are hollow, the tolerance ``max_drop`` is a horizontal line when the rule
    uses it, and each drop with a standard error has a bar of +- 2 of them. Returns False (and removes a stale plot) when no trial has a drop (metric not
    zero-shot, or no clean accuracy).
    """
    path = SweepDir(out).drop_png
    pts = [r for r in rows if r.get("drop_pts") is not None]
    if not pts:
        if path.is_file():
            path.unlink()
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    with_se = [r for r in pts if r.get("drop_se_pts") is not None]
    if with_se:  # +- 2 paired standard errors: how far the selection set places each drop
        ax.errorbar([r["l0"] for r in with_se], [r["drop_pts"] for r in with_se],
                    yerr=[2 * r["drop_se_pts"] for r in with_se], fmt="none", ecolor="grey", elinewidth=0.8,
                    capsize=2, zorder=1, label="+- 2 standard errors")
    _scatter_trials(ax, pts, "drop_pts")
    ax.axhline(0.0, color="black", lw=0.8, ls="-", zorder=1)
    if rule == "sparsest_within" and max_drop is not None and math.isfinite(max_drop):
        ax.axhline(max_drop, color="tab:red", ls="--", lw=1, label=f"max_drop {max_drop:g} pts")
    _mark_chosen_and_l0_axis(ax, pts, "drop_pts", f"chosen ({rule})")
    k = metric.split("_")[-1]
    ax.set_ylabel(f"zero-shot {k} drop, clean - reconstruction (points)")
    ax.set_title(f"{out.name}: {len(pts)} trials" + (" (hollow: excluded)" if any(not r["feasible"] for r in pts)
                                                      else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return True


def _resolve(value: float | None, recorded: Any) -> float | None:
    v = recorded if value is None else value
    if v is None or (isinstance(v, float) and math.isinf(v) and v > 0):
        return None
    return float(v)


def select(cfg: SelectConfig) -> dict[str, Any]:
    """Score (cached) and rank every trial of ``cfg.sweep``; write leaderboard, plot, selection.json and best/.

    Raises SelectError before any scoring for an unknown metric or rule, a selection set of other activations than
    the sweep trained on (model, random_init, layer, token), no scored trial, or no trial meeting the constraints
    (then selection.json and best/ are kept as they were). Warns (stderr) when the selection set is the training set;
    planned trials without weights are listed in the summary and in selection.json ``trials_missing``.
    """
    if not cfg.sweep:
        raise SelectError("--sweep is required: a sweep directory (made by `visae sweep`)")
    out = Path(cfg.sweep)
    sd = SweepDir(out)
    doc = sd.read_plan()
    scfg = doc["config"].get("selection", doc["config"])  # sweep.json v1 had the selection fields at the top
    metric = cfg.metric or scfg.get("metric", "zeroshot_top1")
    if metric not in METRICS:
        where = "--metric" if cfg.metric else f"{sd.plan_file} field config.selection.metric"
        raise SelectError(f"{where} must be one of {METRICS}, got {metric!r}")
    max_l0 = _resolve(cfg.max_l0, scfg.get("max_l0"))
    max_dead = _resolve(cfg.max_dead, scfg.get("max_dead"))
    rule, max_drop = _resolve_rule(cfg, scfg, metric)
    planned = [t["name"] for t in doc["trials"]]
    from visae.atomic import output_lock

    with output_lock(out, "visae select", flag=None), sd.lock():  # the sweep itself: no other place to write
        scores = score_trials(out, None, val_shards=cfg.val_shards, device=cfg.device, batch_size=cfg.batch_size,
                              rescore=cfg.rescore, progress=cfg.progress, metric=metric)
        if not scores:
            raise SelectError(f"{out}: no trained trials in {sd.trials_dir} yet; run the sweep first")
        rows = leaderboard(out, scores, metric, max_l0, max_dead, rule, max_drop)
        chosen_now = next((r["trial"] for r in rows if r.get("chosen")), None)
        why = weights_problem(sd.trial_dir(chosen_now), full=True) if chosen_now else None
        if why is not None:  # found before the leaderboard marks it chosen (best/ would refuse it after the tables)
            demo_dir = out.resolve().parent
            again = ("the demo (visae demo --out {} with its settings)".format(demo_dir)
                     if (demo_dir / "demo_state.json").is_file() else "the same `visae sweep` command")
            raise SelectError(f"{out}: the chosen trial {chosen_now} is damaged ({why}); delete "
                              f"{sd.trial_dir(chosen_now)} and rerun {again} to train it again (a same-size "
                              "replacement passes the sweep's size check)")
        constraints = {"max_l0": max_l0, "max_dead": max_dead}
        _write_tables(out, rows, metric, constraints, rule, max_drop)
        _plot(out, rows, metric, max_l0)
        drop_plot = _plot_drop(out, rows, metric, rule, max_drop)
        chosen = next((r for r in rows if r["chosen"]), None)
        missing = sorted(set(planned) - set(scores))
        info = {"trial": chosen["trial"] if chosen else None, "path": f"trials/{chosen['trial']}" if chosen else None,
                "metric": metric, "score": chosen["score"] if chosen else None, "constraints": constraints,
                "rule": rule, "max_drop": max_drop, "drop_pts": chosen["drop_pts"] if chosen else None,
                "n_within_max_drop": (sum(bool(r["feasible"]) for r in rows) if rule == "sparsest_within" else None),
                "drop_plot": SweepDir(out).drop_png.name if drop_plot else None,
                "row": chosen, "tied_with_chosen": [r["trial"] for r in rows if r.get("tied") and not r["chosen"]],
                **_borderline_record(rows, rule),
                "n_trials_scored": len(scores), "trials_missing": missing,
                "selection_set": next(iter(scores.values()))["key"],
                "config": absolute_paths(asdict(cfg), ("sweep", "val_shards"))}  # paths absolute, not as typed
        if chosen is None:  # a failed selection changes neither best/ nor selection.json
            prev = _kept_selection(sd)
            kept = (f" (the previous selection.json and best/, which holds {prev['trial']}, are kept)" if prev
                    else " (the previous selection.json and best/ are kept)" if sd.best_dir.is_dir() else "")
            if rows and all(degenerate_reasons(r) for r in rows):  # no constraint or tolerance to blame
                raise SelectError(f"{out}: every one of the {len(rows)} trials is degenerate (every latent dead, or "
                                  f"explained variance < -1: diverged), e.g. {rows[0]['trial']}: "
                                  f"{'; '.join(degenerate_reasons(rows[0]))}; train with a lower lr or lambda (see "
                                  f"{sd.leaderboard_md}, column excluded_by){kept}")
            others = [r for r in rows if r["drop_pts"] is not None and _excluded_by_drop_alone(r)]
            if rule == "sparsest_within" and others:  # the tolerance, not another constraint, excludes them all
                least = min(others, key=lambda r: r["drop_pts"])
                hint = (f"; the smallest drop among trials meeting the other constraints is {least['drop_pts']:.2f} "
                        f"points ({least['trial']}, L0 {least['l0']:.1f})")
                raise SelectError(f"{out}: no finished trial has a zero-shot drop within max_drop {max_drop:g} "
                                  f"points under the constraints ({constraints}){hint}; raise --max_drop or select "
                                  f"with --rule best (in visae demo: --sweep.max_drop, or --sweep.rule best "
                                  f"--sweep.max_drop None); see {sd.leaderboard_md} and {sd.drop_png}{kept}")
            raise SelectError(f"{out}: no finished trial meets the constraints ({constraints}); see "
                              f"{sd.leaderboard_md} for each trial's L0 and dead fraction{kept}")
        sd.commit_selection(chosen["trial"], info)
    return info


def _resolve_rule(cfg: SelectConfig, scfg: dict[str, Any], metric: str) -> tuple[str, float | None]:
    """The rule and tolerance this selection applies: the command's, else the sweep plan's; checked before any work.

    The plan's ``max_drop`` belongs to the plan's rule: ``--rule best`` on a sweep planned with
    sparsest_within ignores it; ``--max_drop`` on a sweep planned with best needs
    ``--rule sparsest_within`` (an error otherwise, not a silent change of rule).
    """
    planned_rule = scfg.get("rule", "best")
    rule = cfg.rule if cfg.rule is not None else planned_rule
    if rule not in RULES:
        raise SelectError(f"rule must be one of {RULES}, got {rule!r} (sweep.json config.selection.rule)")
    if cfg.max_drop is not None:
        max_drop = float(cfg.max_drop)
    elif rule == planned_rule and scfg.get("max_drop") is not None:
        max_drop = float(scfg["max_drop"])
    else:
        max_drop = None
    if rule == "best":
        if max_drop is not None and cfg.max_drop is not None:
            raise SelectError(f"--max_drop {max_drop:g} applies only with --rule sparsest_within (the sweep's rule "
                              f"is {planned_rule}); pass --rule sparsest_within")
        return rule, None
    if max_drop is None:
        raise SelectError("--rule sparsest_within needs --max_drop (the tolerated zero-shot drop below the clean "
                          "accuracy, percentage points)")
    if not max_drop >= 0:
        raise SelectError(f"max_drop must be >= 0 percentage points, got {max_drop}")
    if not metric.startswith("zeroshot"):
        whose = "" if cfg.rule is not None else " (the sweep's planned rule; select with --rule best to choose by " \
                                                  f"{metric})"
        raise SelectError(f"--rule sparsest_within{whose} needs a zero-shot metric (the drop is clean minus "
                          f"reconstruction accuracy), got --metric {metric}")
    return rule, max_drop


def select_if_complete(out: str | Path) -> dict[str, Any] | None:
    """Select when every planned trial's group is done (the last rank to finish does it); else None."""
    out = Path(out)
    sd = SweepDir(out)
    doc = sd.read_plan()
    if not sd.all_groups_done(doc):
        return None
    return select(SelectConfig(sweep=str(out), device=_device(doc), progress=bool(doc["train_config"].get("progress", True))))


def _device(doc: dict[str, Any]) -> str:
    dev = doc.get("train_config", {}).get("device", "cpu")
    return dev if dev else "cpu"


def _kept_selection(sd: SweepDir) -> dict[str, Any] | None:
    """The selection that ``best/`` holds (its ``best/selection.json``), or None when there is no ``best/`` or it
    cannot be read."""
    if not (sd.best_dir / "selection.json").is_file():
        return None
    try:
        doc = sd.read_selection()
    except (SweepError, OSError):
        return None
    return doc if doc and doc.get("trial") else None


def format_selection(info: dict[str, Any], out: Path) -> str:
    row = info.get("row") or {}
    lines = [f"chosen: {info['trial']}  ({info['metric']} {info['score']:.4f}, L0 {row.get('l0', float('nan')):.1f}, "
             f"dead {row.get('dead_fraction', float('nan')):.3f}, EV {row.get('explained_variance', float('nan')):.4f})"]
    k = 5 if info["metric"] == "zeroshot_top5" and row.get("clean_top5") is not None else 1  # the metric's own k
    clean, recon = row.get(f"clean_top{k}"), row.get(f"recon_top{k}")
    if clean is not None and recon is not None:
        lines.append(f"clean zero-shot top-{k} {clean:.4f}; reconstruction top-{k} {recon:.4f} ({recon - clean:+.4f})")
    rule = info.get("rule", "best")
    if rule == "sparsest_within":
        lines.append(f"rule sparsest_within: the lowest L0 of {info.get('n_within_max_drop')} trial(s) whose "
                     f"{info['metric']} drop is within max_drop {info['max_drop']:g} points (this one: "
                     f"{info['drop_pts']:.2f} points)")
    else:
        drop = f"; its drop below clean: {info['drop_pts']:.2f} points" if info.get("drop_pts") is not None else ""
        lines.append(f"rule best: the highest {info['metric']} (ties: lower L0){drop}")
    tied = info.get("tied_with_chosen") or []
    border = info.get("borderline") or []
    if border:
        lines.append(f"note: {len(border)} trial(s), the chosen one or sparser, have a drop within 2 standard errors of "
                     f"max_drop ({', '.join(border[:4])}{', ...' if len(border) > 4 else ''}): the selection set cannot "
                     "tell whether they are within the tolerance, so the choice may change with other selection "
                     "examples")
    if info.get("n_drop_se_unknown"):
        lines.append(f"note: the drop's standard error is unknown for {info['n_drop_se_unknown']} trial(s) (scores "
                     "cached by an older visae: --rescore), so whether the "
                     "choice rests on noise is not known")
    if tied and rule != "sparsest_within":  # under sparsest_within a denser trial scoring alike is no rival
        lines.append(f"note: {len(tied)} other trial(s) score within 2 standard errors of the chosen one "
                     f"({', '.join(tied[:4])}{', ...' if len(tied) > 4 else ''}): the selection set cannot separate them")
    missing = info.get("trials_missing") or []
    if missing:
        lines.append(f"warning: {len(missing)} of {len(missing) + info.get('n_trials_scored', 0)} planned trial(s) have "
                     f"no weights and were not scored ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): "
                     "the choice is among the others")
    plots = str(out / "pareto.png") + (f", {out / info['drop_plot']}" if info.get("drop_plot") else "")
    lines.append(f"best SAE: {out / 'best'}   leaderboard: {out / 'leaderboard.md'}   plots: {plots}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from visae.errors import VisaeError, report

    try:
        cfg = parse_config(SelectConfig, argv, default_yaml=DEFAULT_YAML, prog="visae select",
                           description=(SelectConfig.__doc__ or "").strip())
        from visae.devices import resolve_device

        cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))  # 'auto' resolved; one this machine lacks refused
        before = _kept_selection(SweepDir(cfg.sweep))
        info = select(cfg)
    except VisaeError as e:  # a bad flag, sweep or shard set (exit 2), a lock held (1): visae.errors
        return report("visae select", e)
    print(format_selection(info, Path(cfg.sweep)))
    note = _demo_note(Path(cfg.sweep), before, info)
    if note:
        print(note)
    return 0


def _demo_note(sweep: Path, before: dict[str, Any] | None, info: dict[str, Any]) -> str | None:
    """When the sweep is a demo's (``<out>/sweep`` beside ``<out>/demo_state.json``) and this selection put another
    trial in ``best/``: the demo's names, site and recovery still describe the previous one; say how to refresh them."""
    demo_dir = sweep.resolve().parent
    if not (demo_dir / "demo_state.json").is_file() or not before or before.get("trial") == info.get("trial"):
        return None
    return (f"note: {demo_dir} is a demo whose concepts/, site/ and recovery were made from the previous choice "
            f"({before.get('trial')}); rerun the demo with the same settings (visae demo --out {demo_dir} ...) to name, "
            "browse and score the new one")


if __name__ == "__main__":
    from visae.cli import run_main

    sys.exit(run_main("python -m visae.select", main))
