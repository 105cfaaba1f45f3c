"""Sweeps over lr x lambda x expansion factor, trained group-wise in one pass, then selected.

    python scripts/sweep.py --config configs/sweep_dncbm.yaml --shards runs/acts --out runs/sweep
    torchrun --nproc_per_node 8 scripts/sweep.py --config configs/sweep_dncbm.yaml ...

The grid (default: Discover-then-Name's, lr {1e-5, 5e-5, 1e-4, 5e-4, 1e-3} x lambda
{3e-5, 1.5e-4, 3e-4, 1.5e-3, 3e-3} x expansion {2, 4, 8}) is cut into *groups*: the trials
that share an expansion factor have the same shape, so they train as one stacked SAE
(``visae.train.train_stack``: one batch read feeds every member, batched matmuls,
per-member lr and lambda). All members of a group start from the same initialisation
(``<out>/init/exp<E>/``: seeded weights, b_dec at the geometric median of a seeded sample of
the training split), which is what separate runs with the same seed would do; the
stack's member i therefore trains exactly like trial i alone (up to float rounding of the
batched kernels), resampling included: each member's resampling draws are seeded by its
own lr and lambda, not by its position in the stack (docs/sweeps.md).

Layout of ``<out>/`` (read and written through ``visae.sweepdir``; format: docs/sweep_format.md)::

    sweep.json                   the sweep config, the trainer config and the plan (trials, groups)
    init/exp<E>/                 the shared initial SAE of expansion E
    groups/<group>/checkpoint/   the trainer's checkpoint of a group's stack (resumable)
    groups/<group>/done.json     written when the group finished: its trials are complete
    trials/<name>/               one SAE dir per trial (cfg.json, weights.safetensors, metrics.jsonl,
                                 curves.png, zeroshot.json = its cached selection score)
    leaderboard.csv / .md, pareto.png, selection.json, best/   (visae.select)

Resumable: rerun the same command after a kill; finished groups are skipped and a
half-finished group resumes from its last checkpoint (bit-for-bit the trainer's resume).
Across GPUs / machines, ``torchrun`` sets ``RANK`` / ``WORLD_SIZE``: groups (split into
parts when there are fewer groups than ranks, or by ``max_group_size``) are assigned to
ranks by a static, deterministic longest-processing-time split, so no process group is
needed; each rank scores its own trials, and the rank that finds every trial scored runs
the selection.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np

from visae.atomic import atomic_dir
from visae.config import ConfigError, absolute_paths, check_fraction_constraint, config_to_dict, parse_config
from visae.resources import config_yaml
from visae.shards import ShardError, ShardSet
from visae.train import TrainConfig
from visae.zeroshot import ClassifierConfig
from visae.sweepdir import FORMAT_NAME, FORMAT_VERSION, SweepDir, SweepError

DEFAULT_YAML = config_yaml("sweep_dncbm.yaml")

__all__ = ["SweepConfig", "SweepError", "Trial", "Group", "plan_trials", "plan_groups", "assign_groups", "train_trial_alone",
           "train_config_for", "prepare_init", "sweep", "main", "trial_name"]

# SweepConfig fields (dotted: nested configs) that may change between a sweep and its rerun without changing
# any trial; a name matches itself and every field under it
_RESUME_FREE = {"train.device", "train.progress", "train.plot", "train.keep_checkpoint", "train.wandb",
                "train.wandb_project", "train.wandb_name", "select", "selection",
                "out"}  # a moved sweep directory resumes (issue 11 item 9): the plan and the data decide, not the path

# The trainer fields a sweep sets itself, per group and trial: no flag in `visae sweep`, and a SweepConfig
# must leave them at the trainer's defaults.
SET_BY_SWEEP = {"out": "each trial's directory is <out>/trials/<trial>", "lr": "from --lrs",
                "l1_coeff": "from --l1_coeffs", "expansion_factor": "from --expansion_factors",
                "init_from": "the sweep's shared init", "resume": "a sweep always resumes",
                "overwrite": "use a new --out", "synthetic": "give --shards", "synthetic_examples": "give --shards",
                "synthetic_d": "give --shards", "synthetic_atoms": "give --shards"}


@dataclass(frozen=True)
class SweepSelection:
    """How the finished trials are scored and the best one chosen (visae.select; rerun it alone with `visae select`)."""

    val_shards: str = field(default="", metadata={"help": "labelled shard set to select on (e.g. ImageNet val "
                                                          "embeddings); empty: the held-out split of --shards"})
    metric: Literal["zeroshot_top1", "zeroshot_top5", "explained_variance"] = field(
        default="zeroshot_top1", metadata={"help": "selection score: zero-shot top-1 / top-5 accuracy of the "
                                                   "reconstructions, or explained variance (no text tower needed)"})
    max_l0: Optional[float] = field(default=None, metadata={"help": "constraint: mean L0 on the selection set at "
                                                                    "most this"})
    max_dead: Optional[float] = field(default=None, metadata={"help": "constraint: dead-latent fraction at most this"})
    rule: Literal["best", "sparsest_within"] = field(
        default="best", metadata={"help": "best: the highest metric (ties: lower L0); sparsest_within: the lowest-L0 "
                                          "trial whose zero-shot drop below the clean accuracy is at most max_drop "
                                          "(ties: higher metric)"})
    max_drop: Optional[float] = field(default=None, metadata={"help": "rule sparsest_within: tolerated drop of the "
                                                                      "reconstructions' zero-shot accuracy below the "
                                                                      "clean embeddings', in percentage points "
                                                                      "(1.0 = 0.01 of accuracy)"})
    eval_batch_size: int = field(default=4096, metadata={"help": "rows per batch when scoring"})
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig, metadata={
        "help": "the zero-shot classifier of the zeroshot metrics (text tower, benchmark; `visae zeroshot --help`)"})

    def __post_init__(self) -> None:
        if self.eval_batch_size <= 0:
            raise ConfigError(f"SweepSelection.eval_batch_size must be positive, got {self.eval_batch_size}")
        if self.max_l0 is not None and not self.max_l0 >= 0:
            raise ConfigError(f"SweepSelection.max_l0 must be >= 0 (or None: no constraint), got {self.max_l0}")
        check_fraction_constraint(self, "max_dead")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise ConfigError(f"SweepSelection.max_drop must be >= 0 percentage points, got {self.max_drop}")
        if self.rule == "sparsest_within":
            if self.max_drop is None:
                raise ConfigError("SweepSelection.rule sparsest_within needs max_drop (the tolerated zero-shot drop, "
                                  "percentage points)")
            if not self.metric.startswith("zeroshot"):
                raise ConfigError(f"SweepSelection.rule sparsest_within needs a zero-shot metric (its drop is "
                                  f"clean minus reconstruction accuracy), got metric {self.metric}")
        elif self.max_drop is not None:
            raise ConfigError(f"SweepSelection.max_drop ({self.max_drop:g}) applies only with rule sparsest_within; "
                              f"rule is {self.rule!r}: expected max_drop None with rule {self.rule} (visae demo: "
                              "--sweep.max_drop None; visae sweep: --max_drop None; YAML: max_drop: null)")


@dataclass(frozen=True)
class SweepConfig:
    """A grid of SAEs (lr x lambda x expansion factor), trained group-wise in one pass, selected by zero-shot accuracy.

    Every trainer setting is the trainer's own flag (--num_epochs, --architecture, ...: `visae train --help`
    says what each does), except those the sweep sets per trial (--out, --lr, --l1_coeff, --expansion_factor,
    --init_from, --resume, --overwrite, --synthetic*).
    """

    out: str = field(default="runs/sweep", metadata={"help": "sweep directory (trials/, groups/, leaderboard, best/)"})
    lrs: tuple[float, ...] = field(default=(1e-5, 5e-5, 1e-4, 5e-4, 1e-3),
                                   metadata={"help": "learning rates of the grid"})
    l1_coeffs: tuple[float, ...] = field(default=(3e-5, 1.5e-4, 3e-4, 1.5e-3, 3e-3),
                                         metadata={"help": "sparsity coefficients (lambda) of the grid"})
    expansion_factors: tuple[int, ...] = field(default=(2, 4, 8), metadata={"help": "d_sae / d_in of the grid"})
    max_group_size: int = field(default=0, metadata={"help": "at most this many trials in one stacked group "
                                                             "(0: a whole expansion factor); bounds memory"})
    select: bool = field(default=True, metadata={"help": "score every trial and select the best when all are done"})
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(keep_checkpoint=False),
        metadata={"help": "the trainer's settings, shared by every trial", "fixed": tuple(SET_BY_SWEEP),
                  "required": ("shards",)})
    selection: SweepSelection = field(default_factory=SweepSelection)

    def __post_init__(self) -> None:
        for name in ("lrs", "l1_coeffs", "expansion_factors"):
            vals = getattr(self, name)
            if not vals:
                raise ConfigError(f"SweepConfig.{name} is empty")
            if len(set(vals)) != len(vals):
                raise ConfigError(f"SweepConfig.{name} has repeated values {list(vals)}")
        if any(not (v > 0 and math.isfinite(v)) for v in self.lrs):
            raise ConfigError(f"SweepConfig.lrs must be positive and finite, got {list(self.lrs)}")
        if any(not (v >= 0 and math.isfinite(v)) for v in self.l1_coeffs):
            raise ConfigError(f"SweepConfig.l1_coeffs must be >= 0 and finite, got {list(self.l1_coeffs)}")
        if any(int(e) < 1 for e in self.expansion_factors):
            raise ConfigError(f"SweepConfig.expansion_factors must be >= 1, got {list(self.expansion_factors)}")
        if self.max_group_size < 0:
            raise ConfigError(f"SweepConfig.max_group_size must be >= 0, got {self.max_group_size}")
        trainer = TrainConfig()
        for name, why in SET_BY_SWEEP.items():
            if getattr(self.train, name) != getattr(trainer, name):
                raise ConfigError(f"SweepConfig.train.{name} is set by the sweep ({why}); leave it at the trainer's "
                                  f"default {getattr(trainer, name)!r}")


# ----------------------------------------------------------------------------- the plan


def _fmt(v: float) -> str:
    """Compact, exact-enough number for a directory name: 5e-4, 1.5e-4, 1e-3."""
    s = np.format_float_scientific(float(v), trim="-", exp_digits=1)
    return s.replace("e+0", "").replace("e+", "e") if "e+" in s else s


def trial_name(expansion: int, lr: float, l1_coeff: float) -> str:
    return f"exp{int(expansion)}_lr{_fmt(lr)}_lam{_fmt(l1_coeff)}"


@dataclass(frozen=True)
class Trial:
    name: str
    expansion: int
    lr: float
    l1_coeff: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Group:
    """Same-shape trials trained as one stack."""

    name: str
    expansion: int
    trials: tuple[Trial, ...]

    @property
    def cost(self) -> int:
        return self.expansion * len(self.trials)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "expansion": self.expansion, "trials": [t.name for t in self.trials]}


def plan_trials(cfg: SweepConfig) -> list[Trial]:
    """Every (expansion, lr, lambda) of the grid, in that nesting order."""
    return [Trial(trial_name(e, lr, l1), int(e), float(lr), float(l1))
            for e in cfg.expansion_factors for lr in cfg.lrs for l1 in cfg.l1_coeffs]


def _chunks(items: Sequence[Trial], parts: int) -> list[list[Trial]]:
    """Split into ``parts`` contiguous near-equal chunks."""
    n = len(items)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [list(items[bounds[i]:bounds[i + 1]]) for i in range(parts) if bounds[i + 1] > bounds[i]]


def plan_groups(trials: Sequence[Trial], max_group_size: int = 0, world_size: int = 1) -> list[Group]:
    """Groups of same-expansion trials; split (max_group_size, or more parts than ranks) deterministically.

    While there are fewer groups than ranks, the costliest splittable group is cut in two,
    so that every rank gets work; the plan depends only on the grid, max_group_size and
    the world size.
    """
    by_exp: dict[int, list[Trial]] = {}
    for t in trials:
        by_exp.setdefault(t.expansion, []).append(t)
    parts: dict[int, int] = {}
    for e, ts in by_exp.items():
        parts[e] = math.ceil(len(ts) / max_group_size) if max_group_size else 1

    def sizes() -> list[tuple[float, int]]:
        return [(e * len(by_exp[e]) / parts[e], e) for e in by_exp if parts[e] < len(by_exp[e])]

    while sum(parts.values()) < world_size and sizes():
        _, e = max(sizes())
        parts[e] += 1
    groups = []
    for e, ts in by_exp.items():
        chunks = _chunks(ts, parts[e])
        for i, ch in enumerate(chunks):
            name = f"exp{e}" if len(chunks) == 1 else f"exp{e}_part{i + 1}of{len(chunks)}"
            groups.append(Group(name, e, tuple(ch)))
    return groups


def assign_groups(groups: Sequence[Group], world_size: int) -> list[list[Group]]:
    """Longest-processing-time split of groups among ranks (cost = expansion x trials); deterministic."""
    loads = [0] * world_size
    out: list[list[Group]] = [[] for _ in range(world_size)]
    for g in sorted(groups, key=lambda g: (-g.cost, g.name)):
        r = min(range(world_size), key=lambda i: (loads[i], i))
        out[r].append(g)
        loads[r] += g.cost
    return out


def rank_and_world() -> tuple[int, int]:
    """``RANK`` / ``WORLD_SIZE`` as torchrun sets them (1 process otherwise)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise SweepError(f"RANK / WORLD_SIZE must be integers: {e}") from None
    if not 0 <= rank < world:
        raise SweepError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


# ----------------------------------------------------------------------------- trainer glue


def train_config_for(cfg: SweepConfig) -> Any:
    """The TrainConfig shared by every trial (lr / l1_coeff / expansion / out are set per group).

    ``cfg.train`` with ``resume`` on and the device resolved: ``auto`` is ``cuda:$LOCAL_RANK``
    (as torchrun sets it) when CUDA is there, else the CPU.
    """
    device = cfg.train.device
    if device == "auto":
        import torch

        local = os.environ.get("LOCAL_RANK")
        device = (f"cuda:{local}" if local is not None else "cuda") if torch.cuda.is_available() else "cpu"
    try:
        return dataclasses.replace(cfg.train, resume=True, device=device)
    except (TypeError, ValueError) as e:
        raise SweepError(f"trainer settings: {e}") from None


def _init_sample(train_view: Any, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EE9, 0xB0EC]))
    n = min(n, len(train_view))
    pos = np.sort(rng.choice(len(train_view), size=n, replace=False))
    return train_view.read(pos)


def prepare_init(out: Path, expansion: int, shards: ShardSet, tcfg: Any) -> Path:
    """``<out>/init/exp<E>/``: the initial SAE shared by every trial of expansion E (created once, atomically).

    Seeded weights (the trainer's recipe via ``build_sae``) and b_dec at the geometric median
    / mean of a seeded sample of the training split, as ``tcfg.b_dec_init`` says.
    """
    import torch

    from visae.sae import build_sae, load_sae
    from visae.train import sae_config_for

    path = SweepDir(out).init_dir(expansion)
    sae_cfg = sae_config_for(dataclasses.replace(tcfg, expansion_factor=int(expansion)), shards)
    if (path / "cfg.json").is_file():
        sae = load_sae(path)
        if sae.cfg != sae_cfg:
            raise SweepError(f"{path}: initial SAE has config {sae.cfg}, this sweep needs {sae_cfg}; "
                             "use a new --out")
        return path
    gen = torch.Generator().manual_seed(int(tcfg.seed))
    sae = build_sae(sae_cfg, generator=gen)
    if tcfg.b_dec_init != "zeros":
        train_view, _ = shards.split(tcfg.val_fraction, seed=tcfg.seed)
        sae.init_b_dec_(torch.from_numpy(_init_sample(train_view, tcfg.init_examples, tcfg.seed)),
                        method=tcfg.b_dec_init)
    with atomic_dir(path, if_exists="keep") as tmp:  # another rank may make it first: identical content
        sae.save(tmp, extra={"sweep_init": {"expansion": int(expansion), "seed": int(tcfg.seed),
                                            "b_dec_init": tcfg.b_dec_init}})
    return path


def _checkpoint_trials(ckpt_dir: Path, trials: list[Trial]) -> list[Trial]:
    """The group's trials a stack checkpoint holds, in its order (its recorded lrs and lambdas); all of ``trials``
    when it cannot be read or does not name them (the trainer then says what differs)."""
    from safetensors import safe_open

    from visae.train.config import CHECKPOINT_FILE

    try:
        with safe_open(str(ckpt_dir / CHECKPOINT_FILE), framework="pt") as f:
            state = json.loads((f.metadata() or {}).get("state", "{}"))
    except Exception:  # noqa: BLE001 - unreadable: the trainer's resume reports it
        return trials
    pairs = list(zip(state.get("lrs") or [], state.get("l1_coeffs") or []))
    by = {(t.lr, t.l1_coeff): t for t in trials}
    held = [by.get((float(a), float(b))) for a, b in pairs]
    return held if pairs and all(held) else trials


def train_group(out: Path, group: Group, shards: ShardSet, tcfg: Any, said: Sequence[str] = (), tag: str = "") -> bool:
    """Train (or resume) one group's stack; returns whether it finished.

    Trials already finished (e.g. by a run with another world size, whose split differed)
    are left alone; the rest train as one stack. ``said``: warnings the sweep has printed already
    (its plan's, ``visae sweep: warning: ...``); the trainer's UserWarning of the same text is not repeated.
    With the group's checkpoint kept (``train.keep_checkpoint``) the whole stack resumes from it and every trial's
    directory is written again (a damaged trial among them included). ``tag``: the rank's prefix of the messages.
    """
    from visae.train import sae_config_for, train_stack

    sd = SweepDir(out)
    gdir = sd.group_dir(group.name)
    trials = list(group.trials)
    if not sd.checkpoint_dir(group.name).exists():
        trials = [t for t in trials if not sd.trial_finished(t.name, t.lr, t.l1_coeff)]
    else:  # resume the members the checkpoint holds: all of them, or the trials retrained after damage
        trials = _checkpoint_trials(sd.checkpoint_dir(group.name), trials)
    for t in trials:  # a finished trial whose weights went missing or were damaged since: set aside, trained again
        why = sd.weights_problem(t.name)
        if (sd.trial_cfg(t.name).get("extra") or {}).get("finished") and why is not None:
            aside = sd.set_aside(t.name)
            print(f"visae sweep: {tag}trial {t.name} was finished but {why}: its directory is kept as {aside} (delete "
                  "it when done with it) and the trial trains again", file=sys.stderr, flush=True)
    if trials:
        part = f"{len(trials)} of {len(group.trials)}" if len(trials) < len(group.trials) else f"{len(trials)}"
        print(f"visae sweep: {tag}training group {group.name} ({part} trials, expansion {group.expansion})",
              file=sys.stderr, flush=True)
    if not trials:
        sd.write_done(group.name, [t.name for t in group.trials], note="every trial was already finished")
        return True
    init = prepare_init(out, group.expansion, shards, tcfg)
    gcfg = dataclasses.replace(tcfg, expansion_factor=group.expansion, out=str(gdir), init_from=str(init))
    sae_cfg = sae_config_for(gcfg, shards)
    extra = [{"sweep": {"trial": t.name, "group": group.name, "expansion": t.expansion, "lr": t.lr,
                        "l1_coeff": t.l1_coeff, "sweep_dir": str(out.resolve())}} for t in trials]
    with warnings.catch_warnings():
        for w in said:
            warnings.filterwarnings("ignore", message=re.escape(w), category=UserWarning)
        res = train_stack(shards, sae_cfg, [t.lr for t in trials], [t.l1_coeff for t in trials], gcfg,
                          [sd.trial_dir(t.name) for t in trials], extra=extra)
    if res.finished:
        sd.write_done(group.name, [t.name for t in group.trials], steps=res.steps, train_seconds=res.train_seconds,
                      act_per_s=res.act_per_s)
    return bool(res.finished)


def train_trial_alone(cfg: SweepConfig, trial: Trial | str, out_dir: str | Path) -> Path:
    """Train one trial of the grid by itself (S = 1), from the sweep's shared init: the reference the stack must equal.

    Used by tests and by ``benchmarks/bench_sweep.py`` (K sequential runs against one stacked pass).
    """
    from visae.train import sae_config_for, train_stack

    trials = {t.name: t for t in plan_trials(cfg)}
    t = trials[trial] if isinstance(trial, str) else trial
    shards = ShardSet(cfg.train.shards)
    tcfg = train_config_for(cfg)
    init = prepare_init(Path(cfg.out), t.expansion, shards, tcfg)
    gcfg = dataclasses.replace(tcfg, expansion_factor=t.expansion, out=str(out_dir), init_from=str(init))
    train_stack(shards, sae_config_for(gcfg, shards), [t.lr], [t.l1_coeff], gcfg, [Path(out_dir)],
                extra=[{"sweep": {"trial": t.name, "alone": True, "expansion": t.expansion, "lr": t.lr,
                                  "l1_coeff": t.l1_coeff}}])
    return Path(out_dir)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _resume_free(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in _RESUME_FREE)


# The file and directory arguments of sweep.json's "config" (dotted) and "train_config", recorded absolute: `visae
# select --sweep DIR` reads the shard sets from the record, and as typed (relative) it failed from another directory.
# A record of an older visae (paths as typed) is read as from the rerun's directory, so that a rerun there compares equal.
_PATH_FIELDS = ("out", "train.shards", "selection.val_shards", "selection.classifier.classnames_file",
                "selection.classifier.templates_file", "selection.classifier.text_cache")
_IF_FILE_FIELDS = ("selection.classifier.pretrained",)  # a checkpoint file, or a pretrained tag kept as typed
_TRAIN_PATH_FIELDS = ("shards",)


# The shard sets of a sweep (dotted config fields), recorded in sweep.json's "data" by content (ShardSet.fingerprint)
_DATA_FIELDS = ("train.shards", "selection.val_shards")


def _fingerprint(path: Any) -> str | None:
    """The content digest of the shard set at ``path`` (:meth:`visae.shards.ShardSet.fingerprint`), or None: no path,
    or not a readable shard set there."""
    if not path:
        return None
    try:
        return ShardSet(path).fingerprint()
    except (ShardError, OSError, ValueError, KeyError):
        return None


def _write_plan(out: Path, cfg: SweepConfig, tcfg: Any, trials: list[Trial], groups: list[Group], world: int) -> None:
    """Record (or check against) the sweep's config and plan: a rerun must describe the same trials."""
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
           "config": absolute_paths(config_to_dict(cfg), _PATH_FIELDS, if_file=_IF_FILE_FIELDS),
           "train_config": absolute_paths(config_to_dict(tcfg), _TRAIN_PATH_FIELDS), "world_size": world,
           "trials": [t.to_dict() for t in trials], "groups": [g.to_dict() for g in groups],
           "data": {k: _fingerprint(v) for k, v in _flat(config_to_dict(cfg)).items() if k in _DATA_FIELDS}}
    sd = SweepDir(out)
    path = sd.plan_file
    if sd.has_plan():
        old = sd.read_plan()
        old_cfg = {k: v for k, v in _flat(absolute_paths(old.get("config", {}), _PATH_FIELDS, if_file=_IF_FILE_FIELDS)).items()
                   if not _resume_free(k)}
        new_cfg = {k: v for k, v in _flat(doc["config"]).items() if not _resume_free(k)}
        for k in _DATA_FIELDS:  # a shard set moved or copied with the sweep (a copied demo directory): its content decides
            if old_cfg.get(k) != new_cfg.get(k) and old_cfg.get(k) and new_cfg.get(k):
                was = (old.get("data") or {}).get(k) or _fingerprint(old_cfg[k])
                if was is not None and was == doc["data"].get(k):
                    old_cfg[k] = new_cfg[k]
        was = (old.get("data") or {}).get("train.shards")
        if was and old_cfg.get("train.shards") == new_cfg.get("train.shards") and was != doc["data"]["train.shards"]:
            # re-extracted in place: the finished trials were trained on other data (their scores would be mixed)
            raise SweepError(f"--shards {cfg.train.shards}: the shard set changed since this sweep trained on it (its "
                             "content differs from the one sweep.json records under data); use a new --out, or keep "
                             "the new activations in another directory")
        if old_cfg != new_cfg:
            diff = {k: (old_cfg.get(k), new_cfg.get(k)) for k in sorted(old_cfg.keys() | new_cfg.keys())
                    if old_cfg.get(k, ...) != new_cfg.get(k, ...)}
            raise SweepError(f"{path}: this directory holds a sweep with another config (on disk, now): {diff}; "
                             "rerun with the same settings to resume, or use a new --out")
        if old.get("groups") != doc["groups"]:
            print(f"visae sweep: the group split changed (world size {old.get('world_size')} -> {world}); "
                  "finished trials are kept, unfinished groups of the old split restart", file=sys.stderr)
    sd.write_plan(doc)


# ----------------------------------------------------------------------------- the stage


def _check_model_name(name: str, pretrained: str | None) -> None:
    """A backbone name some family knows (open_clip's names are checked against its model list), without loading it."""
    from visae.backbones import BACKBONE_FAMILIES

    for fam in BACKBONE_FAMILIES:
        if fam.exact and name == fam.prefix:
            return
        if not fam.exact and fam.prefix and name.startswith(fam.prefix):
            return
    import open_clip

    if name not in open_clip.list_models():
        raise SweepError(f"--model {name!r}: not a known backbone (open_clip has {len(open_clip.list_models())} "
                         "models, e.g. ViT-B-32; see visae.backbones)")


def check_sweep(cfg: SweepConfig) -> tuple[ShardSet, Any]:
    """Everything a sweep can check before it writes anything; returns (training shards, shared TrainConfig).

    The shard set opens; every expansion factor gives a valid SAE config on it (architecture,
    k, ...); the device parses; wandb is installed when asked for; with ``select``, the
    selection set opens and the benchmark (its class-name / template files) can be read.

    Raises:
        SweepError: naming the flag and what is wrong.
    """

    from visae.train import sae_config_for

    if not cfg.train.shards:
        raise SweepError("--shards is required: the training shard set (from `visae extract`)")
    try:
        shards = ShardSet(cfg.train.shards)
    except ShardError as e:
        raise SweepError(f"--shards {cfg.train.shards}: {e}") from None
    tcfg = train_config_for(cfg)
    from visae.devices import resolve_device

    resolve_device(tcfg.device)  # a device this machine lacks (ConfigError): refused before sweep.json is written
    for e in cfg.expansion_factors:
        try:
            sae_config_for(dataclasses.replace(tcfg, expansion_factor=int(e)), shards)
        except ValueError as err:
            raise SweepError(f"expansion factor {e}: {err}") from None
    if tcfg.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise SweepError("--wandb: the wandb package is not installed (pip install wandb)")
    n_rows = len(shards)
    if n_rows - int(round(n_rows * tcfg.val_fraction)) <= 0:  # as ShardSet.split rounds; selecting or not
        raise SweepError(f"--val_fraction {tcfg.val_fraction:g} holds out all {n_rows} rows of --shards "
                         f"{tcfg.shards}: none left to train on; pass a smaller --val_fraction")
    if cfg.select:
        sel = cfg.selection
        if not sel.val_shards and not tcfg.val_fraction > 0:  # found by select after training every trial
            raise SweepError("no selection set: no --val_shards and --val_fraction 0 holds nothing out of --shards; "
                             "pass --val_shards, a --val_fraction > 0, or --no_select")
        if not sel.val_shards:
            if int(round(n_rows * tcfg.val_fraction)) == 0:  # as ShardSet.split rounds
                raise SweepError(f"no selection set: --val_fraction {tcfg.val_fraction:g} of the {n_rows} rows of "
                                 f"--shards {tcfg.shards} holds out none (rounded to 0); pass --val_shards, a larger "
                                 "--val_fraction, or --no_select")
        if sel.val_shards:
            try:
                val = ShardSet(sel.val_shards)
            except ShardError as e:
                raise SweepError(f"--val_shards {sel.val_shards}: {e}") from None
            from visae.zeroshot import site_mismatch

            diffs = site_mismatch(shards.source, val.source)  # found after training every trial, it was too late
            if diffs:
                raise SweepError(f"--val_shards {sel.val_shards} holds other activations than --shards "
                                 f"{shards.path}: {'; '.join(diffs)}")
        for flag in ("classnames_file", "templates_file"):
            path = getattr(sel.classifier, flag)
            if path is not None and not Path(path).is_file():
                raise SweepError(f"--{flag} {path}: no such file")
        if sel.metric != "explained_variance":
            from visae.backbones import parse_backbone_name
            from visae.zeroshot import resolve_benchmark

            try:
                if sel.classifier.model:
                    _check_model_name(*parse_backbone_name(sel.classifier.model, sel.classifier.pretrained))
                # the benchmark resolved and the selection set's label names checked as scoring will: found after
                # training every trial, it was too late
                resolve_benchmark(val if sel.val_shards else shards, sel.classifier.benchmark,
                                  sel.classifier.label_column, sel.classifier.classnames_file,
                                  sel.classifier.templates_file)
            except (ValueError, OSError) as e:
                raise SweepError(f"selection: {e}") from None
            _check_zeroshot_selectable(cfg, shards)
    return shards, tcfg


def _check_zeroshot_selectable(cfg: SweepConfig, shards: ShardSet) -> None:
    """Zero-shot selection on a selection set that is not the final image embedding runs through the splice; refuse
    one it cannot run on (token 'mean', images gone, ...) now, before any trial trains."""
    from visae.zeroshot import final_embedding_problem, splice_problem

    which = f"--val_shards {cfg.selection.val_shards}" if cfg.selection.val_shards else f"--shards {cfg.train.shards}"
    src = ShardSet(cfg.selection.val_shards).source if cfg.selection.val_shards else shards.source
    if final_embedding_problem(src) is None:
        return
    why = splice_problem(src)
    if why:
        raise SweepError(f"selection by {cfg.selection.metric}: {which} is not the final image embedding, and its "
                         f"SAEs cannot be scored spliced into the model: {why}. Nothing was trained; use --metric "
                         "explained_variance, or --no_select and score later")


def sweep(cfg: SweepConfig) -> Path:
    """Train this rank's groups (skipping finished ones, resuming half-finished ones), score, select; returns ``out``.

    Nothing is written before the whole config is checked (:func:`check_sweep`, and a rerun's
    config against the one recorded in ``sweep.json``).
    """
    from visae.atomic import output_lock

    shards, tcfg = check_sweep(cfg)
    out = Path(cfg.out)
    with output_lock(out, "visae sweep"):  # one sweep per --out (per rank); stale temp files of killed runs go
        return _sweep_locked(cfg, shards, tcfg, out)


def _sweep_locked(cfg: SweepConfig, shards: Any, tcfg: Any, out: Path) -> Path:
    rank, world = rank_and_world()
    trials = plan_trials(cfg)
    groups = plan_groups(trials, cfg.max_group_size, world)
    mine = assign_groups(groups, world)[rank]
    out.mkdir(parents=True, exist_ok=True)
    _write_plan(out, cfg, tcfg, trials, groups, world)  # also checks a rerun against the recorded config
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    print(f"visae sweep: {tag}{len(trials)} trials in {len(groups)} groups; this rank: "
          f"{', '.join(g.name for g in mine) or 'none'}", file=sys.stderr)
    from visae.train import plan_warnings, planned_steps

    said = plan_warnings(planned_steps(len(shards), tcfg), tcfg, shards.source)  # short schedule, random weights
    for w in said:  # printed once here; the trainer's UserWarning of the same text is silenced (train_group)
        print(f"visae sweep: {tag}warning: {w}", file=sys.stderr)
    unfinished = []
    for g in mine:
        if SweepDir(out).group_done(g.name, [t.name for t in g.trials]):
            print(f"visae sweep: {tag}group {g.name} already done, skipped", file=sys.stderr)
            continue
        if not train_group(out, g, shards, tcfg, said, tag=tag):
            unfinished.append(g.name)
    if unfinished:
        print(f"visae sweep: {tag}groups {unfinished} stopped before their last epoch (max_steps); rerun the same "
              "command to continue", file=sys.stderr)
        return out
    if cfg.select:
        from visae.select import score_trials, select_if_complete

        score_trials(out, [t.name for g in mine for t in g.trials], device=tcfg.device,
                     batch_size=cfg.selection.eval_batch_size, progress=tcfg.progress)
        select_if_complete(out)
    return out


def format_summary(out: str | Path) -> str:
    """The sweep's trials (finished by this run or an earlier one, of planned), the best one's held-out EV / L0 /
    dead fraction, where they are."""
    from visae.sweepdir import SweepDir

    out = Path(out)
    sd = SweepDir(out)
    try:
        names = [t["name"] for t in sd.read_plan().get("trials", [])]
    except (ValueError, OSError) as e:
        return f"no sweep plan in {out}: {e}"
    rows, flags = [], set()
    for name in names:
        try:
            extra = json.loads((sd.trial_dir(name) / "cfg.json").read_text()).get("extra", {}) or {}
        except (OSError, ValueError):
            continue
        if extra.get("finished"):
            rows.append((name, extra.get("val") or {}))
            flags |= set(extra.get("warnings") or [])  # the trainer's: random-weight backbone, warm-ups not done
    lines = [f"{len(rows)} of {len(names)} planned trials finished in {out / 'trials'}"]
    evs = [(n, v) for n, v in rows if v.get("explained_variance") is not None]  # null: undefined (no spread)
    if evs:
        name, val = max(evs, key=lambda r: r[1]["explained_variance"])
        lines.append(f"highest held-out EV: {name} (EV {val['explained_variance']:.4f}, "
                     f"L0 {val.get('l0', float('nan')):.1f}, dead {val.get('dead_fraction', float('nan')):.3f})")
    lines += [f"warning: {w}" for w in sorted(flags)]
    selection = sd.read_selection() if sd.has_plan() else None  # best/selection.json, the commit point
    if selection is not None:
        from visae.select import format_selection

        lines.append(format_selection(selection, out))
    elif len(rows) == len(names):
        lines.append(f"not selected yet: `visae select --sweep {out}` scores the trials and picks the best")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``visae sweep`` / ``scripts/sweep.py``: parse flags (defaults from configs/sweep_dncbm.yaml), sweep, summarise.

    Prints the summary (:func:`format_summary`) on stderr and the sweep directory on stdout.
    """
    from visae.errors import VisaeError, report

    try:
        cfg = parse_config(SweepConfig, argv, default_yaml=DEFAULT_YAML, prog="visae sweep")
        out = sweep(cfg)
    except VisaeError as e:  # ConfigError, ShardError, SweepError, TrainError, SelectError, ZeroShotError, ...
        return report("visae sweep", e)
    print(format_summary(out), file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    from visae.cli import run_main

    sys.exit(run_main("python -m visae.sweep", main))
