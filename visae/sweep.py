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

Layout of ``<out>/``::

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
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from visae.config import ConfigError, config_to_dict, load_yaml_config, parse_config
from visae.resources import config_yaml
from visae.shards import ShardError, ShardSet, atomic_write_text

DEFAULT_YAML = config_yaml("sweep_dncbm.yaml")
SWEEP_FILE = "sweep.json"
DONE_FILE = "done.json"
FORMAT_NAME = "visae.sweep"
FORMAT_VERSION = 1

__all__ = ["SweepConfig", "SweepError", "Trial", "Group", "plan_trials", "plan_groups", "assign_groups", "train_trial_alone",
           "train_config_for", "prepare_init", "sweep", "main", "trial_name"]

# SweepConfig fields that may change between a sweep and its rerun without changing any trial
_RESUME_FREE = {"device", "progress", "plot", "select", "max_l0", "max_dead", "metric", "eval_batch_size", "text_cache",
                "keep_checkpoints", "model", "pretrained", "benchmark", "label_column", "val_shards",
                "classnames_file", "templates_file"}


class SweepError(ValueError):
    """A sweep config or sweep directory is unusable."""


@dataclass(frozen=True)
class SweepConfig:
    """A grid of SAEs (lr x lambda x expansion factor), trained group-wise in one pass, selected by zero-shot accuracy."""

    shards: str = field(default="", metadata={"help": "training shard set (manifest.json + shards)"})
    out: str = field(default="runs/sweep", metadata={"help": "sweep directory (trials/, groups/, leaderboard, best/)"})
    lrs: tuple[float, ...] = field(default=(1e-5, 5e-5, 1e-4, 5e-4, 1e-3),
                                   metadata={"help": "learning rates of the grid"})
    l1_coeffs: tuple[float, ...] = field(default=(3e-5, 1.5e-4, 3e-4, 1.5e-3, 3e-3),
                                         metadata={"help": "sparsity coefficients (lambda) of the grid"})
    expansion_factors: tuple[int, ...] = field(default=(2, 4, 8), metadata={"help": "d_sae / d_in of the grid"})
    train_config: str = field(default="", metadata={"help": "TrainConfig YAML for every other trainer setting "
                                                            "(empty: the trainer's defaults); the fields below "
                                                            "override it when set"})
    architecture: Optional[str] = field(default=None, metadata={"help": "relu | topk | batchtopk | jumprelu"})
    k: Optional[int] = field(default=None, metadata={"help": "topk / batchtopk: active latents"})
    num_epochs: Optional[int] = field(default=None, metadata={"help": "epochs per trial"})
    batch_size: Optional[int] = field(default=None, metadata={"help": "examples per step"})
    val_fraction: Optional[float] = field(default=None, metadata={"help": "held-out fraction of --shards (the "
                                                                          "trainer's validation split)"})
    seed: Optional[int] = field(default=None, metadata={"help": "seed of init, data order and split"})
    resample_every: Optional[int] = field(default=None, metadata={"help": "epochs between dead-latent resamplings "
                                                                          "(0: never)"})
    lr_warmup_steps: Optional[int] = field(default=None, metadata={"help": "lr warm-up steps"})
    l1_warmup_steps: Optional[int] = field(default=None, metadata={"help": "lambda warm-up steps"})
    checkpoint_every_steps: Optional[int] = field(default=None, metadata={"help": "extra mid-epoch checkpoints"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "stop each group after this many steps "
                                                                     "(a later rerun continues)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda:LOCAL_RANK if available), cpu, cuda, ..."})
    max_group_size: int = field(default=0, metadata={"help": "at most this many trials in one stacked group "
                                                             "(0: a whole expansion factor); bounds memory"})
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep each finished group's trainer "
                                                                    "checkpoint (stack weights + Adam state)"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    plot: bool = field(default=True, metadata={"help": "each trial's training curves (curves.png; about 2 s each on "
                                                       "a CPU)"})
    # ---- selection (visae.select; rerun it alone with scripts/select.py)
    select: bool = field(default=True, metadata={"help": "score every trial and select the best when all are done"})
    val_shards: str = field(default="", metadata={"help": "labelled shard set to select on (e.g. ImageNet val "
                                                          "embeddings); empty: the held-out split of --shards"})
    model: str = field(default="", metadata={"help": "zero-shot backbone (empty: the shard set's source model)"})
    pretrained: Optional[str] = field(default=None, metadata={"help": "its pretrained tag (null: the source's)"})
    benchmark: str = field(default="auto", metadata={"help": "zero-shot classes: auto, imagenet, toy, toy:<factor>"})
    classnames_file: Optional[str] = field(default=None, metadata={"help": "benchmark files: class names, one a line"})
    templates_file: Optional[str] = field(default=None, metadata={"help": "benchmark files: templates with '{}'"})
    label_column: str = field(default="", metadata={"help": "label column of the selection set (empty: the "
                                                            "benchmark's)"})
    metric: str = field(default="zeroshot_top1", metadata={"help": "selection score: zeroshot_top1, zeroshot_top5 "
                                                                   "(of reconstructions) or explained_variance "
                                                                   "(no text tower needed)"})
    max_l0: Optional[float] = field(default=None, metadata={"help": "constraint: mean L0 on the selection set at "
                                                                    "most this"})
    max_dead: Optional[float] = field(default=None, metadata={"help": "constraint: dead-latent fraction at most this"})
    eval_batch_size: int = field(default=4096, metadata={"help": "rows per batch when scoring"})
    text_cache: Optional[str] = field(default=None, metadata={"help": "text-embedding cache (null: "
                                                                      "$VISAE_TEXT_CACHE or ~/.cache/visae/text)"})

    def __post_init__(self) -> None:
        for name in ("lrs", "l1_coeffs", "expansion_factors"):
            vals = getattr(self, name)
            if not vals:
                raise ConfigError(f"SweepConfig.{name} is empty")
            if len(set(vals)) != len(vals):
                raise ConfigError(f"SweepConfig.{name} has repeated values {list(vals)}")
        if any(not v > 0 for v in self.lrs):
            raise ConfigError(f"SweepConfig.lrs must be positive, got {list(self.lrs)}")
        if any(v < 0 for v in self.l1_coeffs):
            raise ConfigError(f"SweepConfig.l1_coeffs must be >= 0, got {list(self.l1_coeffs)}")
        if any(int(e) < 1 for e in self.expansion_factors):
            raise ConfigError(f"SweepConfig.expansion_factors must be >= 1, got {list(self.expansion_factors)}")
        if self.max_group_size < 0:
            raise ConfigError(f"SweepConfig.max_group_size must be >= 0, got {self.max_group_size}")
        if self.metric not in ("zeroshot_top1", "zeroshot_top5", "explained_variance"):
            raise ConfigError(f"SweepConfig.metric must be zeroshot_top1, zeroshot_top5 or explained_variance, "
                              f"got {self.metric!r}")


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
    """The TrainConfig shared by every trial (lr / l1_coeff / expansion / out are set per group)."""
    from visae.train import TrainConfig

    base = load_yaml_config(TrainConfig, cfg.train_config) if cfg.train_config else TrainConfig()
    over = {name: getattr(cfg, name) for name in ("architecture", "k", "num_epochs", "batch_size", "val_fraction",
                                                  "seed", "resample_every", "lr_warmup_steps", "l1_warmup_steps",
                                                  "checkpoint_every_steps", "max_steps")
            if getattr(cfg, name) is not None}
    over.update(shards=cfg.shards, resume=True, overwrite=False, progress=cfg.progress, plot=cfg.plot,
                keep_checkpoint=cfg.keep_checkpoints, init_from="", synthetic=False)
    device = cfg.device
    if device == "auto":
        import torch

        local = os.environ.get("LOCAL_RANK")
        device = (f"cuda:{local}" if local is not None else "cuda") if torch.cuda.is_available() else "cpu"
    over["device"] = device
    try:
        return dataclasses.replace(base, **over)
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

    path = out / "init" / f"exp{expansion}"
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save(tmp, extra={"sweep_init": {"expansion": int(expansion), "seed": int(tcfg.seed),
                                        "b_dec_init": tcfg.b_dec_init}})
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, path)
    except OSError:  # another rank made it first: identical content
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def group_done(out: Path, group: Group) -> bool:
    """A group is done when its done.json lists its trials and each trial dir holds a finished SAE."""
    f = out / "groups" / group.name / DONE_FILE
    if not f.is_file():
        return False
    try:
        doc = json.loads(f.read_text())
    except json.JSONDecodeError:
        return False
    if doc.get("trials") != [t.name for t in group.trials]:
        return False
    return all((out / "trials" / t.name / "weights.safetensors").is_file() for t in group.trials)


def trial_finished(out: Path, trial: Trial) -> bool:
    """The trial's SAE dir holds the finished result of this very trial (from any group split)."""
    d = out / "trials" / trial.name
    try:
        extra = json.loads((d / "cfg.json").read_text()).get("extra", {}) or {}
    except (OSError, json.JSONDecodeError):
        return False
    sw = extra.get("sweep", {}) or {}
    return (bool(extra.get("finished")) and sw.get("trial") == trial.name and sw.get("lr") == trial.lr
            and sw.get("l1_coeff") == trial.l1_coeff and (d / "weights.safetensors").is_file())


def train_group(out: Path, group: Group, shards: ShardSet, tcfg: Any) -> bool:
    """Train (or resume) one group's stack; returns whether it finished.

    Trials already finished (e.g. by a run with another world size, whose split differed)
    are left alone; the rest train as one stack.
    """
    from visae.train import sae_config_for, train_stack

    gdir = out / "groups" / group.name
    trials = list(group.trials)
    if not (gdir / "checkpoint").exists():
        trials = [t for t in trials if not trial_finished(out, t)]
    if not trials:
        gdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(gdir / DONE_FILE, json.dumps({"trials": [t.name for t in group.trials],
                                                        "note": "every trial was already finished"}, indent=1))
        return True
    init = prepare_init(out, group.expansion, shards, tcfg)
    gcfg = dataclasses.replace(tcfg, expansion_factor=group.expansion, out=str(gdir), init_from=str(init))
    sae_cfg = sae_config_for(gcfg, shards)
    extra = [{"sweep": {"trial": t.name, "group": group.name, "expansion": t.expansion, "lr": t.lr,
                        "l1_coeff": t.l1_coeff, "sweep_dir": str(out.resolve())}} for t in trials]
    res = train_stack(shards, sae_cfg, [t.lr for t in trials], [t.l1_coeff for t in trials], gcfg,
                      [out / "trials" / t.name for t in trials], extra=extra)
    if res.finished:
        atomic_write_text(gdir / DONE_FILE,
                          json.dumps({"trials": [t.name for t in group.trials], "steps": res.steps,
                                      "train_seconds": res.train_seconds, "act_per_s": res.act_per_s}, indent=1))
    return bool(res.finished)


def train_trial_alone(cfg: SweepConfig, trial: Trial | str, out_dir: str | Path) -> Path:
    """Train one trial of the grid by itself (S = 1), from the sweep's shared init: the reference the stack must equal.

    Used by tests and by ``scripts/bench_sweep.py`` (K sequential runs against one stacked pass).
    """
    from visae.train import sae_config_for, train_stack

    trials = {t.name: t for t in plan_trials(cfg)}
    t = trials[trial] if isinstance(trial, str) else trial
    shards = ShardSet(cfg.shards)
    tcfg = train_config_for(cfg)
    init = prepare_init(Path(cfg.out), t.expansion, shards, tcfg)
    gcfg = dataclasses.replace(tcfg, expansion_factor=t.expansion, out=str(out_dir), init_from=str(init))
    train_stack(shards, sae_config_for(gcfg, shards), [t.lr], [t.l1_coeff], gcfg, [Path(out_dir)],
                extra=[{"sweep": {"trial": t.name, "alone": True, "expansion": t.expansion, "lr": t.lr,
                                  "l1_coeff": t.l1_coeff}}])
    return Path(out_dir)


def _write_plan(out: Path, cfg: SweepConfig, tcfg: Any, trials: list[Trial], groups: list[Group], world: int) -> None:
    """Record (or check against) the sweep's config and plan: a rerun must describe the same trials."""
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config_to_dict(cfg),
           "train_config": config_to_dict(tcfg), "world_size": world,
           "trials": [t.to_dict() for t in trials], "groups": [g.to_dict() for g in groups]}
    path = out / SWEEP_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SweepError(f"{path} is not valid JSON ({e}); delete it to start the sweep again") from None
        old_cfg = {k: v for k, v in old.get("config", {}).items() if k not in _RESUME_FREE}
        new_cfg = {k: v for k, v in doc["config"].items() if k not in _RESUME_FREE}
        if old_cfg != new_cfg:
            diff = {k: (old_cfg.get(k), v) for k, v in new_cfg.items() if old_cfg.get(k) != v}
            raise SweepError(f"{path}: this directory holds a sweep with another config (on disk, now): {diff}; "
                             "rerun with the same settings to resume, or use a new --out")
        if old.get("groups") != doc["groups"]:
            print(f"visae sweep: the group split changed (world size {old.get('world_size')} -> {world}); "
                  "finished trials are kept, unfinished groups of the old split restart", file=sys.stderr)
    atomic_write_text(path, json.dumps(doc, indent=1))


def load_sweep(path: str | Path) -> dict[str, Any]:
    """``<sweep>/sweep.json`` with a clear error when it is not a sweep directory."""
    f = Path(path) / SWEEP_FILE
    if not f.is_file():
        raise SweepError(f"{f} is missing: {path} is not a sweep directory (made by `visae sweep`)")
    try:
        doc = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise SweepError(f"{f} is not valid JSON: {e}") from None
    if doc.get("format") != FORMAT_NAME:
        raise SweepError(f"{f}: field 'format' is {doc.get('format')!r}, expected {FORMAT_NAME!r}")
    return doc


# ----------------------------------------------------------------------------- the stage


def sweep(cfg: SweepConfig) -> Path:
    """Train this rank's groups (skipping finished ones, resuming half-finished ones), score, select; returns ``out``."""
    if not cfg.shards:
        raise SweepError("--shards is required: the training shard set (from `visae extract`)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        shards = ShardSet(cfg.shards)
    except ShardError as e:
        raise SweepError(f"--shards {cfg.shards}: {e}") from None
    rank, world = rank_and_world()
    tcfg = train_config_for(cfg)
    trials = plan_trials(cfg)
    groups = plan_groups(trials, cfg.max_group_size, world)
    mine = assign_groups(groups, world)[rank]
    _write_plan(out, cfg, tcfg, trials, groups, world)  # also checks a rerun against the recorded config
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    print(f"visae sweep: {tag}{len(trials)} trials in {len(groups)} groups; this rank: "
          f"{', '.join(g.name for g in mine) or 'none'}", file=sys.stderr)
    unfinished = []
    for g in mine:
        if group_done(out, g):
            print(f"visae sweep: {tag}group {g.name} already done, skipped", file=sys.stderr)
            continue
        print(f"visae sweep: {tag}training group {g.name} ({len(g.trials)} trials, expansion {g.expansion})",
              file=sys.stderr)
        if not train_group(out, g, shards, tcfg):
            unfinished.append(g.name)
    if unfinished:
        print(f"visae sweep: {tag}groups {unfinished} stopped before their last epoch (max_steps); rerun the same "
              "command to continue", file=sys.stderr)
        return out
    if cfg.select:
        from visae.select import score_trials, select_if_complete

        score_trials(out, [t.name for g in mine for t in g.trials], device=tcfg.device, batch_size=cfg.eval_batch_size,
                     progress=cfg.progress)
        select_if_complete(out)
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(SweepConfig, argv, default_yaml=DEFAULT_YAML, prog="visae sweep",
                           description=(SweepConfig.__doc__ or "").strip())
        out = sweep(cfg)
    except ValueError as e:  # ConfigError, ShardError, SweepError, TrainError, SelectError, ZeroShotError, ...
        print(f"visae sweep: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
