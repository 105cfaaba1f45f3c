"""The multi-epoch SAE trainer: many epochs over a shard set, Adam, resampling, checkpoints.

    python scripts/train_sae.py --shards runs/acts --out runs/sae --num_epochs 200
    python scripts/train_sae.py --synthetic true --out runs/planted      # generated planted data

One code path trains a stack of S same-shape SAEs (``train_stack``: per-member lr and
lambda, one batch read feeding all members, as the sweep does); ``train`` is the S = 1 case.
Per step: ``sae.training_loss`` on the shard batch -> backward -> ``remove_parallel_grad_``
-> :class:`visae.optim.StackedAdam` step with the scheduled lr [S] -> ``normalize_decoder_``.

Schedules: lr warm-up from lr/10 to lr over ``lr_warmup_steps``, and the same re-warm-up
after each resampling (per member, when it resampled any latent); lambda warm-up from 0
over ``l1_warmup_steps``. Every ``resample_every`` epochs (not in the last period) latents
that did not fire since the previous resampling are resampled (Anthropic, as in
Discover-then-Name). A checkpoint is written atomically after every epoch (and every
``checkpoint_every_steps``); ``--resume true`` continues a killed run bit-for-bit. The
checkpoint format and the metrics are described in docs/training.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch

from visae.atomic import atomic_write_bytes, atomic_write_text
from visae.config import ConfigError, config_to_dict, parse_config
from visae.errors import VisaeError
from visae.metrics import CURVES_FILE, METRICS_FILE, MetricsLogger, plot_curves
from visae.optim import StackedAdam
from visae.resources import REPO, config_yaml  # noqa: F401 - REPO: the checkout, for scripts and tests
from visae.shards import ShardError, ShardSet, ShardView

__all__ = ["TrainConfig", "TrainError", "TrainResult", "train", "train_stack", "main", "load_checkpoint", "l1_coeffs_used",
           "CHECKPOINT_DIR", "CHECKPOINT_FILE"]

DEFAULT_YAML = config_yaml("train_sae.yaml")
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "visae.train-checkpoint"
CHECKPOINT_VERSION = 2
READABLE_CHECKPOINT_VERSIONS = ("1", "2")  # 1: no kernel / logging state (resume is then not bit-identical)
SUMMARY_FILE = "train_summary.json"

# Fields that may differ between a run and its --resume without changing the result.
_RESUME_FREE_FIELDS = {"resume", "overwrite", "max_steps", "progress", "wandb", "wandb_project", "wandb_name",
                       "plot", "validate_shards", "prefetch", "device", "num_epochs", "log_every",
                       "checkpoint_every_steps", "keep_checkpoint", "shards"}  # shards: checked by content


class TrainError(VisaeError, ValueError):
    """Training cannot start or continue: bad config, data that does not fit, a broken checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    """Train a sparse autoencoder on a shard set of activations (ReLU + L1 by default, Discover-then-Name recipe)."""

    # -- data and output
    shards: str = field(default="", metadata={"help": "shard-set directory (manifest.json + shards) to train on; "
                                                      "required unless --synthetic true"})
    out: str = field(default="runs/sae", metadata={"help": "output directory: the SAE (cfg.json, weights.safetensors), "
                                                           "metrics.jsonl, curves.png, checkpoint/"})
    synthetic: bool = field(default=False, metadata={"help": "no --shards: generate a planted-sparse-dictionary shard set "
                                                             "in <out>/planted_shards and train on it"})
    synthetic_examples: int = field(default=65536, metadata={"help": "--synthetic: number of generated examples"})
    synthetic_d: int = field(default=64, metadata={"help": "--synthetic: activation width d"})
    synthetic_atoms: int = field(default=256, metadata={"help": "--synthetic: planted dictionary size"})
    val_fraction: float = field(default=0.1, metadata={"help": "fraction of examples held out for validation"})
    validate_shards: Literal["none", "meta", "full"] = field(
        default="meta", metadata={"help": "shard checks before training: meta (manifest, file sizes, metadata), "
                                          "full (also scan every row for NaN/Inf/zero), none"})
    # -- model
    architecture: Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"] = field(
        default="relu", metadata={"help": "SAE architecture"})
    expansion_factor: int = field(default=8, metadata={"help": "d_sae = expansion_factor * d_in"})
    k: int = field(default=32, metadata={"help": "topk / batchtopk / matryoshka: active latents per example"})
    matryoshka_levels: int = field(default=5, metadata={"help": "matryoshka: nested prefixes of sizes d_sae / "
                                                                "2^(L-1), ..., d_sae / 2, d_sae"})
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = field(
        default="geometric_median", metadata={"help": "decoder bias initialisation from a data sample"})
    init_examples: int = field(default=16384, metadata={"help": "examples sampled for the b_dec initialisation"})
    impl: Literal["auto", "reference", "fused", "sparse"] = field(
        default="auto", metadata={"help": "SAE training-step kernels: auto (fastest exact), reference (plain autograd), "
                                          "fused, sparse"})
    init_from: str = field(default="", metadata={"help": "start from the weights of this SAE directory instead of a "
                                                         "fresh initialisation (its d_in must match the shards)"})
    # -- optimisation
    num_epochs: int = field(default=200, metadata={"help": "passes over the training split"})
    batch_size: int = field(default=4096, metadata={"help": "examples per step"})
    lr: float = field(default=5e-4, metadata={"help": "Adam learning rate (after warm-up)"})
    l1_coeff: float = field(default=3e-5, metadata={"help": "sparsity coefficient lambda (relu: L1 on "
                                                            "decoder-norm-weighted codes; jumprelu: L0)"})
    l1_convention: Literal["unit", "raw"] = field(
        default="unit", metadata={"help": "what --l1_coeff means: unit = lambda of the loss on the SAE's own inputs "
                                          "(unit-norm rows), used as given; raw = lambda of the loss on raw "
                                          "activations (Discover-then-Name's), converted with the shards' stored "
                                          "norms (docs/training.md)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    lr_warmup_steps: int = field(default=200, metadata={"help": "lr rises linearly from lr/10 to lr over this many "
                                                                "steps, at the start and again after each resampling"})
    l1_warmup_steps: int = field(default=1000, metadata={"help": "lambda rises linearly from 0 over this many steps"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for the forward/backward pass "
                                                        "(weights and Adam state stay fp32)"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation, data order, split and resampling"})
    # -- dead latents
    resample_every: int = field(default=10, metadata={"help": "resample dead latents every this many epochs "
                                                              "(never in the last period); 0 = never"})
    resample_examples: int = field(default=131072, metadata={"help": "training examples scored to draw resampled "
                                                                     "directions from (prob. ~ loss^2, loss = "
                                                                     "squared error)"})
    resample_encoder_scale: float = field(default=0.2, metadata={"help": "resampled encoder column = input * this * "
                                                                         "mean norm of the alive encoder columns"})
    dead_window_steps: int = field(default=1000, metadata={"help": "a latent not fired for this many steps counts "
                                                                   "as dead (dead_fraction, topk aux-k loss)"})
    dense_threshold: float = field(default=0.1, metadata={"help": "a latent firing on more than this fraction of "
                                                                  "inputs counts as dense"})
    # -- runtime
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, cuda:1, ..."})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps in total (0 = no limit; "
                                                        "for benchmarks and tests); a checkpoint is written"})
    log_every: int = field(default=50, metadata={"help": "steps between training-metric records"})
    checkpoint_every_steps: int = field(default=0, metadata={"help": "extra mid-epoch checkpoints every this many "
                                                                     "steps (0 = only after each epoch)"})
    keep_checkpoint: bool = field(default=True, metadata={"help": "keep <out>/checkpoint after a finished run"})
    resume: bool = field(default=False, metadata={"help": "continue from <out>/checkpoint if there is one "
                                                          "(else start fresh)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier run in --out"})
    shuffle_buffer: int = field(default=262144, metadata={"help": "examples shuffled together in memory "
                                                                  "(whole shards are grouped up to this size)"})
    prefetch: int = field(default=4, metadata={"help": "batches prepared ahead by the loader thread"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})
    plot: bool = field(default=True, metadata={"help": "write curves.png at the end"})
    wandb: bool = field(default=False, metadata={"help": "also log to Weights & Biases (WANDB_MODE=offline works "
                                                         "without an account)"})
    wandb_project: str = field(default="visae", metadata={"help": "wandb project"})
    wandb_name: str = field(default="", metadata={"help": "wandb run name (default: the --out directory name)"})

    def __post_init__(self) -> None:
        positive = ("num_epochs", "batch_size", "expansion_factor", "k", "log_every", "init_examples",
                    "resample_examples", "dead_window_steps", "shuffle_buffer", "synthetic_examples", "synthetic_d",
                    "synthetic_atoms")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "lr_warmup_steps", "l1_warmup_steps", "resample_every", "checkpoint_every_steps",
                     "prefetch"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be positive, got {self.lr}")
        if not self.l1_coeff >= 0:
            raise ConfigError(f"TrainConfig.l1_coeff must be >= 0, got {self.l1_coeff}")
        if self.l1_convention not in ("unit", "raw"):
            raise ConfigError(f"TrainConfig.l1_convention must be 'unit' or 'raw', got {self.l1_convention!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"TrainConfig.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class TrainResult:
    """What ``train_stack`` returns; ``act_per_s`` is the hot loop's throughput (loading included)."""

    out_dirs: list[Path]
    steps: int
    examples: int
    train_seconds: float
    act_per_s: float
    finished: bool
    val: list[dict[str, float]]
    n_resampled: list[int]
    warnings: list[str] = field(default_factory=list)
    backbone_random_init: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dirs"] = [str(p) for p in self.out_dirs]
        return d


# ============================================================================ helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    return dev


def _latent_axis(name: str, p: torch.Tensor, d_sae: int) -> int | None:
    """Which axis of a stacked parameter indexes latents (for per-latent Adam resets)."""
    known = {"W_enc": 2, "W_dec": 1, "b_enc": 1, "b_dec": None}
    if name in known:
        return known[name]
    if p.dim() == 2 and p.shape[1] == d_sae:
        return 1
    return None


def _sparsity_metric(arch: str, l1: torch.Tensor, l0: torch.Tensor) -> torch.Tensor:
    """The metric lambda multiplies in the loss [S] (relu: l1; jumprelu: l0; others: none -> 0)."""
    if arch == "relu":
        return l1
    if arch == "jumprelu":
        return l0
    return torch.zeros_like(l1)


def _seed_int(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def member_key(lr: float, l1_coeff: float) -> int:
    """A stack member's identity for its random draws: the bits of its (lr, l1_coeff), all that tells members apart.

    Seeding a member's resampling from this (not from its position in the stack) makes a
    sweep's member draw exactly what the same trial trained alone draws.
    """
    lr_bits, l1_bits = np.array([lr, l1_coeff], dtype=np.float64).view(np.uint64).tolist()
    return (lr_bits << 64) | l1_bits


def backbone_random_init(source: dict[str, Any] | None) -> bool:
    """Whether a shard set's recorded provenance (manifest ``source.random_init``) says the backbone had random weights."""
    return bool((source or {}).get("random_init", False))


RANDOM_WEIGHTS_WARNING = ("the activations come from a backbone with random weights (shard manifest "
                          "source.random_init = true): its latents and their names are not concepts of a trained model")


def plan_warnings(total_steps: int, cfg: TrainConfig, source: dict[str, Any] | None) -> list[str]:
    """Why a planned run cannot have learnt anything meaningful, before it starts (empty list: nothing to say).

    A run of ``total_steps`` (all epochs) shorter than the lr warm-up (``lr_warmup_steps``) or the
    lambda warm-up (``l1_warmup_steps``) ends before its schedule reaches the configured values;
    a shard set whose provenance records ``random_init`` was extracted from random weights.
    """
    out = []
    short = [f"{name} warm-up ({n} steps, --{flag})" for name, n, flag in
             (("lr", cfg.lr_warmup_steps, "lr_warmup_steps"), ("lambda", cfg.l1_warmup_steps, "l1_warmup_steps"))
             if total_steps < n]
    if short:
        out.append(f"the run is {total_steps} steps ({cfg.num_epochs} epochs of batch {cfg.batch_size}), shorter than "
                   f"its {' and '.join(short)}: it cannot have learnt with the configured schedule (more --num_epochs, "
                   "a smaller --batch_size, or shorter warm-ups)")
    if backbone_random_init(source):
        out.append(RANDOM_WEIGHTS_WARNING)
    return out


def planned_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimiser steps of a full run on a shard set of ``n_examples`` split as ``ShardSet.split`` does."""
    n_train = n_examples - int(round(n_examples * cfg.val_fraction))
    return -(-n_train // cfg.batch_size) * cfg.num_epochs


def warmups_incomplete(step: int, sched: Any, cfg: TrainConfig) -> list[str]:
    """Which warm-ups had not completed at ``step``: "lr" (any member's, re-warm-ups included), "lambda"."""
    out = []
    if cfg.lr_warmup_steps > 0 and any(step - w < cfg.lr_warmup_steps for w in sched.warm_start.tolist()):
        out.append("lr")
    if step < cfg.l1_warmup_steps:
        out.append("lambda")
    return out


def open_shards(cfg: TrainConfig) -> ShardSet:
    """The shard set to train on: ``--shards``, or a generated planted one with ``--synthetic true``."""
    if cfg.shards:
        try:
            shards = ShardSet(cfg.shards)
        except ShardError as e:
            raise TrainError(f"--shards {cfg.shards}: {e}") from None
    elif cfg.synthetic:
        from visae.synthetic import make_planted_dictionary, write_planted_shards

        path = Path(cfg.out) / "planted_shards"
        want = {"n": cfg.synthetic_examples, "d": cfg.synthetic_d, "n_atoms": cfg.synthetic_atoms, "seed": cfg.seed}
        stamp = path / "visae_synthetic.json"
        try:
            ok = stamp.is_file() and json.loads(stamp.read_text()) == want and ShardSet(path, require_complete=True)
        except ShardError:
            ok = False
        if not ok:
            print(f"visae train: generating {cfg.synthetic_examples} planted-dictionary examples (d={cfg.synthetic_d}, "
                  f"{cfg.synthetic_atoms} atoms) in {path}", file=sys.stderr)
            dictionary = make_planted_dictionary(d=cfg.synthetic_d, n_atoms=cfg.synthetic_atoms, seed=cfg.seed)
            write_planted_shards(path, n=cfg.synthetic_examples, dictionary=dictionary, seed=cfg.seed,
                                 shard_size=16384)
            np.save(path / "planted_atoms.npy", dictionary.atoms)
            atomic_write_text(stamp, json.dumps(want))
        shards = ShardSet(path)
    else:
        raise TrainError("--shards is required: a shard-set directory (manifest.json + shards, e.g. from `visae extract`); "
                         "or pass --synthetic true to train on a generated planted-dictionary shard set")
    return shards


def _check_shards(shards: ShardSet, level: str) -> None:
    if level == "none":
        return
    try:
        shards.validate(full=(level == "full"))
    except ShardError as e:
        raise TrainError(f"shard set {shards.path} failed validation: {e}") from None


def sae_config_for(cfg: TrainConfig, shards: ShardSet, n_models: int = 1) -> "Any":
    """The SAEConfig that ``cfg`` asks for on ``shards`` (d_in from the manifest, its normalisation)."""
    from visae.sae import SAEConfig

    d_in = shards.d
    scale = 1.0
    if shards.normalization == "none":
        scale = _estimate_scale(shards, cfg)
    d_sae = d_in * cfg.expansion_factor
    k = cfg.k
    if cfg.architecture in ("topk", "batchtopk", "matryoshka") and k > d_sae:
        raise TrainError(f"--k {k} exceeds d_sae = {d_in} (shard d) x {cfg.expansion_factor} (--expansion_factor) = {d_sae}")
    try:
        return SAEConfig(architecture=cfg.architecture, d_in=d_in, d_sae=d_sae, n_models=n_models, k=k,
                         input_normalization="unit_norm" if shards.normalization == "unit_norm" else "none",
                         scale_factor=scale, impl=cfg.impl, matryoshka_levels=cfg.matryoshka_levels)
    except ValueError as e:
        raise TrainError(f"SAE config: {e}") from None


def _estimate_scale(shards: ShardSet, cfg: TrainConfig) -> float:
    """Dataset-wide factor so that scaled activations have mean squared norm 1 (for shards stored unnormalised)."""
    n = len(shards)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5CA1E]))
    idx = np.sort(rng.choice(n, size=min(n, cfg.init_examples), replace=False))
    x = shards.read(idx)
    msn = float((x.astype(np.float64) ** 2).sum(1).mean())
    return 1.0 / math.sqrt(msn) if msn > 0 else 1.0


def l1_coeffs_used(l1_coeffs: Sequence[float], convention: str, view: ShardView, sae_cfg: Any) -> tuple[list[float], dict[str, Any]]:
    """The sparsity coefficients the loss uses, from those given in ``convention`` ("unit" | "raw").

    visae's loss is computed on the SAE's inputs x = rho_i^-1 * raw_i, where rho_i = r_i / c for
    unit_norm shards (r_i: the example's original norm, kept in the shard metadata) and
    rho_i = 1 / c for shards stored as given (c = ``sae_cfg.scale_factor``). For one example
    the raw-space loss is loss_raw(lambda) = rho^2 * loss_unit(lambda / rho^(2-p)), with p = 1
    for an L1 term (relu) and p = 0 for an L0 term (jumprelu). Over the training ``view`` the
    raw loss weighs the reconstruction of example i by rho_i^2 and its sparsity term by
    rho_i^p, so the one coefficient that keeps their ratio is

        lambda_unit = lambda_raw * mean(rho^p) / mean(rho^2)     (relu: mean(r) / mean(r^2) when c = 1)

    exact when all norms are equal, the best single-lambda match otherwise (a per-example
    lambda would be needed to be exact). ``convention="unit"``: the coefficients are used as
    given. Returns (coefficients used [S], a JSON-able record of the conversion). Raises
    TrainError on an unknown convention or stored norms that are not positive and finite.
    """
    given = [float(v) for v in l1_coeffs]
    if convention == "unit":
        return given, {"convention": "unit", "factor": 1.0}
    if convention != "raw":
        raise TrainError(f"l1_convention must be 'unit' or 'raw', got {convention!r}")
    c = float(sae_cfg.scale_factor)
    if view.shards.normalization == "unit_norm":
        rho = view.shards.metadata()["norm"][view.index].astype(np.float64) / c
        if rho.size == 0 or not np.all(np.isfinite(rho) & (rho > 0)):
            raise TrainError(f"l1_convention raw: shard set {view.shards.path} has example norms (metadata 'norm') "
                             "that are not positive and finite; the raw-to-unit conversion needs them")
    else:
        rho = np.full(1, 1.0 / c)
    p = 0 if sae_cfg.architecture == "jumprelu" else 1
    factor = float(np.mean(rho ** p) / np.mean(rho ** 2))
    info = {"convention": "raw", "factor": factor, "sparsity_power": p, "mean_norm": float(rho.mean()),
            "mean_sq_norm": float(np.mean(rho ** 2)), "norm_cv": float(rho.std() / rho.mean()),
            "exact": bool(rho.max() == rho.min())}
    return [v * factor for v in given], info


def _split(data: Any, cfg: TrainConfig) -> tuple[ShardSet, ShardView, ShardView]:
    if isinstance(data, (str, Path)):
        try:
            data = ShardSet(data)
        except ShardError as e:
            raise TrainError(str(e)) from None
    if isinstance(data, ShardSet):
        train_view, val_view = data.split(cfg.val_fraction, seed=cfg.seed)
        return data, train_view, val_view
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(v, ShardView) for v in data):
        return data[0].shards, data[0], data[1]
    raise TypeError("train_stack: data must be a shard-set path, a ShardSet, or a (train, val) pair of ShardViews")


def _sample_rows(view: ShardView, n: int, seed: int, tag: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct rows of ``view`` (sorted positions), seeded: (positions [n], acts [n, d])."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, tag]))
    n = min(n, len(view))
    pos = np.sort(rng.choice(len(view), size=n, replace=False))
    return pos, view.read(pos)


# ============================================================================ device feeding


class _Feeder:
    """Loader batches -> device tensors. On CUDA the numpy batch is copied into pinned memory
    by a background thread so the host-to-device copy is asynchronous; on CPU it is
    ``torch.from_numpy`` (no copy)."""

    def __init__(self, it: Iterator[Any], device: torch.device, depth: int = 2):
        self.device = device
        self.it = it
        if device.type == "cuda":
            import queue
            import threading

            self.q: Any = queue.Queue(maxsize=max(1, depth))
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._pin_worker, daemon=True)
            self._thread.start()

    def _pin_worker(self) -> None:
        try:
            for b in self.it:
                t = torch.from_numpy(b.acts).pin_memory()
                while not self._stop.is_set():
                    try:
                        self.q.put(t, timeout=0.1)
                        break
                    except Exception:  # noqa: BLE001 - queue.Full
                        continue
                if self._stop.is_set():
                    return
            self.q.put(None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self.q.put(e)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.device.type != "cuda":
            for b in self.it:
                yield torch.from_numpy(b.acts)
            return
        while True:
            item = self.q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item.to(self.device, non_blocking=True)

    def close(self) -> None:
        if self.device.type == "cuda":
            self._stop.set()
        close = getattr(self.it, "close", None)
        if close is not None and self.device.type != "cuda":
            close()


# ============================================================================ state kept across steps


class _DeadTracker:
    """When each (member, latent) last fired, as a completed-step count (0 = never); one on-device op per step.

    ``dead_mask``: not fired in the last ``window`` steps (the aux-k loss's mask); ``not_fired_since_resample``:
    not fired since the last resampling (or the start), the latents to resample.
    """

    def __init__(self, S: int, d_sae: int, device: torch.device):
        self.last_fired = torch.zeros(S, d_sae, dtype=torch.int64, device=device)
        self.resample_step = 0

    def update(self, fired: torch.Tensor, step_after: int) -> None:
        self.last_fired.masked_fill_(fired, step_after)

    def dead_mask(self, window: int, step: int) -> torch.Tensor:
        return self.last_fired <= step - window

    def not_fired_since_resample(self) -> torch.Tensor:
        return self.last_fired <= self.resample_step

    def resampled(self, mask: torch.Tensor, step: int) -> None:
        """After a resampling at ``step``: ``mask`` latents get a fresh window; 'since resampling' restarts."""
        self.last_fired.masked_fill_(mask, step)
        self.resample_step = step

    def state(self) -> dict[str, torch.Tensor]:
        return {"dead.last_fired": self.last_fired}

    def load(self, t: dict[str, torch.Tensor], resample_step: int) -> None:
        self.last_fired.copy_(t["dead.last_fired"])
        self.resample_step = int(resample_step)


class _IntervalLog:
    """On-device sums of one logging interval, example-weighted, checkpointed with the run.

    Per member [S]: batch-size-weighted sums of mse, l1, l0, aux and the sparsity term
    (lambda x the architecture's metric), and the SSE; shared by the members: sum x [d_in] and
    sum ||x||^2 (float64, shard space; times scale_factor (squared) in SAE space), examples
    ``n`` and ``steps``. The interval's explained variance is 1 - SSE / SST over all its
    examples (mean over the interval), so a 1-row batch is just one more example; null (with
    a warning) only when the interval's examples have no spread. Checkpointing these sums makes
    a resumed run log the records an uninterrupted run logs.
    """

    KEYS = ("mse", "l1", "l0", "aux", "sparsity")

    def __init__(self, S: int, d_in: int, device: torch.device):
        self.sums = torch.zeros(len(self.KEYS), S, dtype=torch.float64, device=device)
        self.sse = torch.zeros(S, dtype=torch.float64, device=device)
        self.sx = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.sxx = torch.zeros((), dtype=torch.float64, device=device)
        self.n = 0
        self.steps = 0

    def add(self, out: Any, x: torch.Tensor, sparsity: torch.Tensor) -> None:
        """One step: ``out`` the LossOutput, ``x`` the shard batch [B, d_in], ``sparsity`` [S] = lambda x metric."""
        B = x.shape[0]
        rows = torch.stack([out.mse.detach(), out.l1, out.l0, out.aux, sparsity.detach()]).double()
        self.sums.add_(rows, alpha=B)
        self.sse.add_(out.sq_err.sum(-1, dtype=torch.float64))
        self.sx.add_(x.sum(0, dtype=torch.float64))
        self.sxx.add_(torch.linalg.vector_norm(x, dtype=torch.float64).square())
        self.n += B
        self.steps += 1

    def means(self, scale: float) -> tuple[np.ndarray, list[float | None]]:
        """(interval means [5, S] in KEYS order, explained variance per member or None); one host transfer."""
        packed = torch.cat([self.sums.flatten(), self.sse, self.sx, self.sxx[None]]).cpu()
        k, S = self.sums.shape
        sums = packed[:k * S].reshape(k, S)
        sse, sx, sxx = packed[k * S:k * S + S], packed[k * S + S:-1], packed[-1]
        ev = _ev_or_none(sse, sx * scale, sxx * scale * scale, self.n, sx.numel())
        return (sums / max(self.n, 1)).numpy(), ev

    def reset(self) -> None:
        for t in (self.sums, self.sse, self.sx, self.sxx):
            t.zero_()
        self.n = self.steps = 0

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        return ({"log.sums": self.sums, "log.sse": self.sse, "log.sx": self.sx, "log.sxx": self.sxx},
                {"n": self.n, "steps": self.steps})

    def load(self, tensors: dict[str, torch.Tensor], st: dict[str, int] | None) -> None:
        if st is None:  # a version-1 checkpoint: the interval restarts at the resume point
            self.reset()
            return
        for name, t in (("sums", self.sums), ("sse", self.sse), ("sx", self.sx), ("sxx", self.sxx)):
            t.copy_(tensors[f"log.{name}"])
        self.n, self.steps = int(st["n"]), int(st["steps"])


class _Schedules:
    """lr [S]: warm-up from lr/10 over N steps, restarted per member after its resampling; lambda [S]: linear from 0.

    Past the warm-ups both return their constant tensors (no per-step kernels).
    """

    def __init__(self, lrs: torch.Tensor, l1s: torch.Tensor, lr_warmup: int, l1_warmup: int):
        self.lrs = lrs  # [S] float64, on device
        self.l1s = l1s  # [S] float32, on device
        self.lr_warmup = lr_warmup
        self.l1_warmup = l1_warmup
        self.warm_start = torch.zeros_like(lrs, dtype=torch.int64)  # step each member's (re)warm-up began
        self._warm_start_host = [0] * lrs.numel()

    def lr(self, step: int) -> torch.Tensor:
        if self.lr_warmup <= 0 or step - max(self._warm_start_host) >= self.lr_warmup:
            return self.lrs
        frac = ((step - self.warm_start).to(torch.float64) / self.lr_warmup).clamp_(0.0, 1.0)
        return self.lrs * (0.1 + 0.9 * frac)

    def l1(self, step: int) -> torch.Tensor:
        if self.l1_warmup <= 0 or step >= self.l1_warmup:
            return self.l1s
        return self.l1s * (step / self.l1_warmup)

    def rewarm(self, members: torch.Tensor, step: int) -> None:
        members = members.to("cpu", torch.bool)
        self.warm_start.masked_fill_(members.to(self.warm_start.device), step)
        self._warm_start_host = [step if m else w for m, w in zip(members.tolist(), self._warm_start_host)]

    def load(self, warm_start: torch.Tensor) -> None:
        self.warm_start.copy_(warm_start)
        self._warm_start_host = [int(v) for v in warm_start.tolist()]


# ============================================================================ evaluation and resampling


def _ev_or_none(sse: torch.Tensor, sx: torch.Tensor, sxx: torch.Tensor, n: int, d: int) -> list[float | None]:
    """Explained variance 1 - SSE / SST per member over ``n`` examples, None where SST is undefined.

    sse [S], sx [d_in] (sum of x), sxx [] (sum of ||x||^2), all float64 sums over the same n
    examples in SAE space. SST = sxx - ||sx||^2 / n = sum ||x - mean||^2. It is undefined (None)
    when n < 2 or when SST is within float64 rounding of 0: the cancellation error of
    ``sxx - ||sx||^2 / n`` is at most about (n * d) * eps64 * sxx (n * d summed terms).
    """
    S = sse.shape[0]
    if n < 2:
        return [None] * S
    sst = float(sxx - sx.square().sum() / n)
    tol = 4.0 * (n * d) * float(np.finfo(np.float64).eps) * float(sxx)
    if not sst > tol:
        return [None] * S
    return [float(1.0 - v / sst) for v in sse.tolist()]


def _warn_undefined_ev(where: str, n: int) -> None:
    warnings.warn(f"{where}: explained variance is undefined over {n} example(s) with no spread "
                  "(sum ||x - mean||^2 = 0); logged as null", RuntimeWarning, stacklevel=3)


@torch.no_grad()  # validation only: no autograd graphs
def evaluate(sae: Any, view: ShardView, batch_size: int, l1_coeff: torch.Tensor, device: torch.device,
             amp: Any = None, dense_threshold: float = 0.1, aux_coeff: float = 0.0) -> list[dict[str, float | None]]:
    """Metrics of every member on ``view`` (one pass) through the INFERENCE path, as the saved SAE computes them.

    Codes are ``sae._activate(sae.preacts(x))`` on the inputs normalised as ``SAE.forward``
    normalises raw activations (so BatchTopK uses its running threshold, not the batch top-k of
    training): the logged validation L0 / EV equal those of the exported SAE on the same rows.
    Returns per member: ``mse`` (mean over examples and d_in, SAE space), ``l1`` (mean of
    sum_j f_j ||W_dec_j||), ``l0`` (mean active latents per example), ``loss`` (mse + the
    architecture's sparsity term x lambda; no aux-k term: it needs the trainer's dead mask),
    ``explained_variance`` (1 - SSE / SST over the whole view; None with a warning when SST = 0,
    e.g. a 1-row split), ``dead_fraction`` (never fired on it), ``dense_fraction`` (fires on more
    than ``dense_threshold`` of it), ``examples``. ``aux_coeff`` is accepted for compatibility.
    """
    S, d_sae = sae.n_models, sae.d_sae
    n = 0
    sums = torch.zeros(4, S, dtype=torch.float64, device=device)
    sse = torch.zeros(S, dtype=torch.float64, device=device)
    fire = torch.zeros(S, d_sae, dtype=torch.float64, device=device)
    sx = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    sxx = torch.zeros((), dtype=torch.float64, device=device)
    coeff = torch.as_tensor(l1_coeff, dtype=torch.float64, device=device).reshape(-1).expand(S)
    was_training = sae.training
    sae.eval()
    dec_norm = sae.W_dec.detach().norm(dim=-1).double()  # [S, d_sae]
    for b in view.sequential_batches(batch_size):
        x = torch.from_numpy(b.acts).to(device)
        B = x.shape[0]
        with amp or nullcontext():
            xs, _ = sae.normalize_input(x.to(sae.W_enc.dtype))  # SAE.forward's input path
            f = sae._activate(sae.preacts(xs))  # [S, B, d_sae] inference codes
            x_hat = sae._decode_sae(f)
        xs = xs.double()
        f = f.double()
        sq = (x_hat.double() - xs).square().sum(-1)  # [S, B]
        l0 = (f > 0).sum(-1).double().sum(-1)  # [S]
        l1 = (f.sum(1) * dec_norm).sum(-1)  # [S]
        sums += torch.stack([sq.sum(-1) / sae.d_in, l1, l0, _sparsity_metric(sae.architecture, l1, l0)])
        sse += sq.sum(-1)
        fire += (f > 0).sum(dim=1).double()
        sx += xs.sum(0)
        sxx += xs.square().sum()
        n += B
    sae.train(was_training)
    if n == 0:
        return [{} for _ in range(S)]
    means = (sums / n).cpu()
    freq = fire / n
    dead_frac = (freq == 0).double().mean(-1).cpu().tolist()
    dense_frac = (freq > dense_threshold).double().mean(-1).cpu().tolist()
    ev = _ev_or_none(sse.cpu(), sx.cpu(), sxx.cpu(), n, sae.d_in)
    if ev[0] is None:
        _warn_undefined_ev(f"validation split ({n} examples)", n)
    out = []
    for s in range(S):
        mse, l1, l0, sp = (float(v) for v in means[:, s])
        out.append({"mse": mse, "l1": l1, "l0": l0, "loss": mse + float(coeff[s]) * sp, "explained_variance": ev[s],
                    "dead_fraction": dead_frac[s], "dense_fraction": dense_frac[s], "examples": n})
    return out


@torch.no_grad()
def resample_dead_latents(sae: Any, opt: StackedAdam, dead: torch.Tensor, view: ShardView, cfg: TrainConfig,
                          tag: int, batch_size: int, member_keys: Sequence[int] | None = None) -> torch.Tensor:
    """Anthropic resampling of ``dead [S, d_sae]`` latents; returns the number resampled per member [S] (CPU).

    Scores a seeded subset of ``view`` with the current SAE; each dead latent gets as decoder row a
    unit-normalised input drawn with probability proportional to loss^2, the square of the
    input's squared reconstruction error ``loss = ||x - x_hat||^2`` (Anthropic, "Towards
    Monosemanticity" (2023), appendix "Neuron Resampling"; the resampler Discover-then-Name
    uses), per member, as encoder column that input times ``resample_encoder_scale`` times the
    mean norm of the member's alive encoder columns, a zero encoder bias, and fresh Adam state.
    Member s draws from its own generator seeded by ``(cfg.seed, tag, member_keys[s])``
    (:func:`member_key`; default: the member index), so its draws do not depend on the other members.
    """
    dead = dead.to(sae.W_enc.device)
    n_dead = dead.sum(-1).cpu()
    if int(n_dead.sum()) == 0:
        return n_dead
    S = sae.n_models
    dev = sae.W_enc.device
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, tag, 0x2E5A]))
    n = min(cfg.resample_examples, len(view))
    pos = np.sort(rng.choice(len(view), size=n, replace=False))
    sub = ShardView(view.shards, view.index[pos])
    errs = []
    was_training = sae.training
    kernel_state = sae.kernel_state()  # scoring must not change the training kernels' choice
    sae.eval()  # scoring must not move running statistics (e.g. BatchTopK's threshold)
    for b in sub.sequential_batches(batch_size):
        out = sae.training_loss(torch.from_numpy(b.acts).to(dev), 0.0)
        errs.append(out.sq_err.float().cpu())
    sae.train(was_training)
    sae.load_kernel_state(kernel_state)
    sq_err = torch.cat(errs, dim=1).clamp_min(0)  # [S, n], positions in `pos` order
    keys = list(member_keys) if member_keys is not None else list(range(S))
    if len(keys) != S:
        raise TrainError(f"resample_dead_latents: {S} members need {S} member_keys, got {len(keys)}")
    for s in range(S):
        idx = torch.nonzero(dead[s]).flatten()
        m = idx.numel()
        if m == 0:
            continue
        gen = torch.Generator().manual_seed(_seed_int(cfg.seed, tag, 0x51E, keys[s]))
        p = sq_err[s].double().square()  # loss^2, loss = per-input squared error
        if not torch.isfinite(p).all() or p.sum() <= 0:
            p = torch.ones_like(p)
        replace = m > int((p > 0).sum())
        choice = torch.multinomial(p, m, replacement=replace, generator=gen).numpy()
        x = torch.from_numpy(sub.read(choice)).to(dev, torch.float32) * sae.cfg.scale_factor
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        alive = ~dead[s]
        enc_norm = sae.W_enc[s].norm(dim=0)  # [d_sae] column norms
        scale = enc_norm[alive].mean() if bool(alive.any()) else torch.tensor(1.0, device=dev)
        sae.W_dec[s, idx, :] = x.to(sae.W_dec.dtype)
        sae.W_enc[s, :, idx] = (x * (cfg.resample_encoder_scale * scale)).T.to(sae.W_enc.dtype)
        sae.b_enc[s, idx] = 0.0
    hook = getattr(sae, "reset_latents_", None)
    if callable(hook):  # architecture extras, when the SAE offers a hook
        hook(dead)
    elif isinstance(getattr(sae, "log_threshold", None), torch.Tensor):
        # JumpReLU: a learned threshold could keep the new direction silent; restart it at its init value.
        sae.log_threshold.masked_fill_(dead, math.log(sae.cfg.jumprelu_init_threshold))
    opt.reset_latents_(dead)
    return n_dead


# ============================================================================ checkpoints


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """One safetensors file (tensors + JSON state in its metadata), written atomically."""
    from safetensors.torch import save as st_save

    path.parent.mkdir(parents=True, exist_ok=True)
    t = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION), "state": json.dumps(state)}
    atomic_write_bytes(path, st_save(t, metadata=meta))


def load_checkpoint(path: str | Path, device: Any = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, state) of a trainer checkpoint file or its directory (see docs/training.md)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise TrainError(f"checkpoint {path} is not a readable safetensors file ({e}); delete it or start a new --out") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a visae trainer checkpoint (format {meta.get('format')!r})")
    if meta.get("version") not in READABLE_CHECKPOINT_VERSIONS:
        raise TrainError(f"{path}: checkpoint version {meta.get('version')!r}, this visae reads versions "
                         f"{', '.join(READABLE_CHECKPOINT_VERSIONS)}")
    return tensors, json.loads(meta["state"])


# ============================================================================ the training loop


def train_stack(
    data: Any,
    sae_cfg: Any,
    lrs: Sequence[float],
    l1_coeffs: Sequence[float],
    cfg: TrainConfig,
    out_dirs: Sequence[str | Path] | None = None,
    *,
    extra: Sequence[dict[str, Any]] | None = None,
) -> TrainResult:
    """Train a stack of S = len(lrs) same-shape SAEs in one pass over the data; save member i to ``out_dirs[i]``.

    Args:
        data: shard-set path, :class:`ShardSet` (split with ``cfg.val_fraction``/``cfg.seed``),
            or a ``(train, val)`` pair of :class:`ShardView`.
        sae_cfg: the :class:`visae.sae.SAEConfig` (``n_models`` is set to S here).
        lrs, l1_coeffs: per-member learning rate and sparsity coefficient (length S each).
        cfg: the :class:`TrainConfig` (``cfg.lr`` / ``cfg.l1_coeff`` are ignored in favour of the lists).
            The run's checkpoint lives in ``<cfg.out>/checkpoint/``.
        out_dirs: one SAE directory per member (default: ``[cfg.out]`` for S = 1).
        extra: per-member dicts added to each member's cfg.json ``extra``.

    Every member's directory gets ``cfg.json`` + ``weights.safetensors`` (``extra`` holds
    ``train`` = the config with the member's lr / l1_coeff, ``shards`` = where the data came
    from, ``val`` = final validation metrics), ``metrics.jsonl`` and ``curves.png``.
    """
    from visae.sae import SAEFormatError, build_sae, load_sae

    S = len(lrs)
    if S < 1 or len(l1_coeffs) != S:
        raise TrainError(f"train_stack: need as many l1_coeffs as lrs (>= 1), got {len(lrs)} and {len(l1_coeffs)}")
    run_dir = Path(cfg.out)
    out_dirs = [Path(d) for d in (out_dirs if out_dirs is not None else ([run_dir] if S == 1 else []))]
    if len(out_dirs) != S:
        raise TrainError(f"train_stack: {S} members need {S} out_dirs, got {len(out_dirs)}")
    extra = list(extra) if extra is not None else [{} for _ in range(S)]
    shards, train_view, val_view = _split(data, cfg)
    if sae_cfg.d_in != shards.d:
        raise TrainError(f"SAE d_in={sae_cfg.d_in} but shard set {shards.path} has d={shards.d}")
    sae_cfg = dataclasses.replace(sae_cfg, n_models=S)
    # lambda as given (member identity: resume check, resampling seeds) -> lambda the loss uses
    l1_used, l1_conversion = l1_coeffs_used(l1_coeffs, cfg.l1_convention, train_view, sae_cfg)
    device = resolve_device(cfg.device)
    B = cfg.batch_size
    # Every example once per epoch: the last batch of an epoch may be short (drop_last=False).
    steps_per_epoch = -(-len(train_view) // B)
    if steps_per_epoch == 0:
        raise TrainError(f"training split of {shards.path} is empty ({len(shards)} examples, "
                         f"--val_fraction {cfg.val_fraction})")
    total_steps = steps_per_epoch * cfg.num_epochs
    random_init = backbone_random_init(shards.source)
    planned = plan_warnings(total_steps, cfg, shards.source)
    for w in planned:
        warnings.warn(w, UserWarning, stacklevel=2)

    ckpt_path = run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE
    cfg_dict = config_to_dict(cfg)
    resume_state = None
    if ckpt_path.exists():
        if cfg.resume:
            resume_state = load_checkpoint(ckpt_path, device="cpu")
        elif cfg.overwrite:
            shutil.rmtree(run_dir / CHECKPOINT_DIR)
        else:
            raise TrainError(f"{ckpt_path} exists from an earlier run: pass --resume true to continue it, or "
                             "--overwrite true (or another --out) to start again")
    elif not cfg.overwrite and not cfg.resume:
        for d in out_dirs:
            if (d / "weights.safetensors").exists():
                raise TrainError(f"{d} already holds a trained SAE: pass --overwrite true or choose another --out")

    # ---------------------------------------------------------------- build or restore
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    sae = build_sae(sae_cfg, generator=gen).to(device)
    names = [n for n, _ in sae.named_parameters()]
    params = [p for _, p in sae.named_parameters()]
    opt = StackedAdam(params, lr=torch.tensor(list(lrs), dtype=torch.float64), betas=(cfg.adam_beta1, cfg.adam_beta2),
                      eps=cfg.adam_eps, latent_axes=[_latent_axis(n, p, sae.d_sae) for n, p in zip(names, params)])
    sched = _Schedules(torch.tensor(list(lrs), dtype=torch.float64, device=device),
                       torch.tensor(l1_used, dtype=torch.float32, device=device),
                       cfg.lr_warmup_steps, cfg.l1_warmup_steps)
    dead = _DeadTracker(S, sae.d_sae, device)
    interval = _IntervalLog(S, sae.d_in, device)
    step, epoch, batch_in_epoch = 0, 0, 0
    examples, train_seconds = 0, 0.0
    n_resampled = [0] * S
    last_val: list[dict[str, float]] = [{} for _ in range(S)]
    wandb_id = None
    run_id = secrets.token_hex(6)

    if resume_state is not None:
        tensors, st = resume_state
        _check_resume(st, cfg_dict, sae_cfg, shards, ckpt_path, lrs, l1_coeffs, out_dirs)
        sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        opt.load_state_dict({k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("opt.")})
        dead.load({k: v.to(device) for k, v in tensors.items() if k.startswith("dead.")}, st["resample_step"])
        sched.load(tensors["sched.warm_start"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        sae.load_kernel_state(st.get("kernel"))
        interval.load(tensors, st.get("log"))
        step, epoch, batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
        examples, train_seconds = st["examples"], st["train_seconds"]
        n_resampled, last_val = st["n_resampled"], st["last_val"]
        wandb_id, run_id = st.get("wandb_id"), st.get("run_id", run_id)
        print(f"visae train: resuming {ckpt_path} at epoch {epoch}, step {step}", file=sys.stderr)
    else:
        if cfg.init_from:
            try:
                src = load_sae(cfg.init_from)
            except SAEFormatError as e:
                raise TrainError(f"--init_from: {e}") from None
            if src.d_in != shards.d:
                raise TrainError(f"--init_from {cfg.init_from}: the SAE has d_in={src.d_in} but shard set {shards.path} "
                                 f"has d={shards.d} (activations of another model or layer?)")
            if src.d_sae != sae.d_sae or src.architecture != sae.architecture:
                raise TrainError(f"--init_from {cfg.init_from}: the SAE is {src.architecture} with d_sae={src.d_sae}, "
                                 f"this run trains {sae.architecture} with d_sae={sae.d_sae} (--architecture, "
                                 "--expansion_factor)")
            st0 = src.state_dict()
            sae.load_state_dict({k: v[:1].expand(S, *v.shape[1:]).clone().to(device) for k, v in st0.items()})
        elif cfg.b_dec_init != "zeros":
            _, sample = _sample_rows(train_view, cfg.init_examples, cfg.seed, 0xB0EC)
            sae.init_b_dec_(torch.from_numpy(sample), method=cfg.b_dec_init)

    # ---------------------------------------------------------------- logging
    member_train_cfg = [cfg_dict | {"lr": float(lrs[i]), "l1_coeff": float(l1_coeffs[i]), "l1_coeff_used": l1_used[i],
                                    "l1_conversion": l1_conversion} for i in range(S)]
    shards_info = {"path": str(shards.path.resolve()), "source": shards.source, "d": shards.d,
                   "num_examples": len(shards), "normalization": shards.normalization,
                   "val_fraction": cfg.val_fraction, "split_seed": cfg.seed}
    wandb_cfg = None
    if cfg.wandb:
        wandb_cfg = {"project": cfg.wandb_project, "name": cfg.wandb_name or run_dir.name, "dir": str(run_dir),
                     "config": cfg_dict | {"sae": sae_cfg.to_dict(), "lrs": list(lrs), "l1_coeffs": list(l1_coeffs)},
                     "id": wandb_id}
    try:
        logger = MetricsLogger(out_dirs, wandb_cfg, truncate_after_step=step if resume_state is not None else None)
    except RuntimeError as e:
        raise TrainError(str(e)) from None
    wandb_id = logger.wandb_id

    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if cfg.bf16 else None
    aux_coeff = float(getattr(sae_cfg, "aux_coeff", 0.0)) if getattr(sae, "uses_aux", False) else 0.0
    wants_dead = bool(getattr(sae, "uses_aux", False))

    def checkpoint(finished: bool = False) -> None:
        tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()}
        tensors |= {f"opt.{k}": v for k, v in opt.state_dict().items()}
        tensors |= dead.state()
        tensors["sched.warm_start"] = sched.warm_start
        tensors |= _rng_state()
        log_tensors, log_state = interval.state()
        tensors |= log_tensors
        state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "steps_per_epoch": steps_per_epoch,
                 "resample_step": dead.resample_step,
                 "examples": examples, "train_seconds": train_seconds, "finished": finished,
                 "n_resampled": n_resampled, "last_val": last_val, "config": cfg_dict, "sae_config": sae_cfg.to_dict(),
                 "lrs": [float(v) for v in lrs], "l1_coeffs": [float(v) for v in l1_coeffs],
                 "out_dirs": [str(d) for d in out_dirs], "shards": shards_info, "param_names": names,
                 "wandb_id": wandb_id, "run_id": run_id, "kernel": sae.kernel_state(), "log": log_state,
                 "world_size": 1, "rank": 0}
        save_checkpoint(ckpt_path, tensors, state)

    # ---------------------------------------------------------------- loop
    from tqdm.auto import tqdm

    limit = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    bar = tqdm(total=limit, initial=min(step, limit), unit="step", disable=not cfg.progress, dynamic_ncols=True,
               desc=f"train {run_dir.name}" + (f" (S={S})" if S > 1 else ""), file=sys.stderr)
    t_interval, ex_interval = time.perf_counter(), 0
    stopped = False
    sae.train()
    try:
        while epoch < cfg.num_epochs and not stopped:
            if step >= limit:
                stopped = True
                break
            batches = train_view.epoch_batches(B, epoch=epoch, seed=cfg.seed, start_batch=batch_in_epoch,
                                               buffer_size=max(cfg.shuffle_buffer, B), prefetch=cfg.prefetch,
                                               drop_last=False)
            feeder = _Feeder(batches, device)
            t0 = time.perf_counter()
            try:
                for x in feeder:
                    lr_now = sched.lr(step)
                    l1_now = sched.l1(step)
                    dead_mask = dead.dead_mask(cfg.dead_window_steps, step) if wants_dead else None
                    with amp or nullcontext():
                        out = sae.training_loss(x, l1_now, dead_mask=dead_mask)
                    out.loss.backward()
                    sae.remove_parallel_grad_()
                    opt.step(lr_now)
                    opt.zero_grad(set_to_none=True)
                    sae.normalize_decoder_()
                    dead.update(out.fired, step + 1)
                    interval.add(out, x, l1_now * _sparsity_metric(sae.architecture, out.l1, out.l0))
                    step += 1
                    batch_in_epoch += 1
                    examples += x.shape[0]
                    ex_interval += x.shape[0]
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == limit:
                        # Interval means, then the dead fractions and the last step's lr and lambda.
                        means, ev = interval.means(sae.cfg.scale_factor)  # the one sync per interval
                        extra_stats = torch.stack([dead.dead_mask(cfg.dead_window_steps, step).float().mean(-1),
                                                   dead.not_fired_since_resample().float().mean(-1),
                                                   lr_now.float(), l1_now.float()]).cpu().numpy()
                        m = dict(zip(_IntervalLog.KEYS, means))
                        loss = m["mse"] + aux_coeff * m["aux"] + m["sparsity"]
                        if ev[0] is None:
                            _warn_undefined_ev(f"training interval ending at step {step}", interval.n)
                        now = time.perf_counter()
                        rate = ex_interval / max(now - t_interval, 1e-9)
                        # An interval cut short by --max_steps: a resume drops this record and
                        # continues the interval from the checkpointed sums (as if never stopped).
                        partial = step % cfg.log_every != 0 and step < total_steps
                        recs = []
                        for s in range(S):
                            r = {"type": "train", "step": step, "epoch": epoch, "examples": examples,
                                 "loss": float(loss[s])}
                            r |= {k: float(m[k][s]) for k in ("mse", "l1", "l0")}
                            r["explained_variance"] = ev[s]
                            r["aux"] = float(m["aux"][s])
                            r |= {k: float(extra_stats[i, s]) for i, k in enumerate(
                                ["dead_fraction", "dead_since_resample_fraction", "lr", "l1_coeff"])}
                            r["act_per_s"] = rate
                            if partial:
                                r["partial"] = True
                            recs.append(r)
                        logger.log(recs)
                        if not np.isfinite(loss).all():
                            raise TrainError(f"training diverged at step {step} (loss {loss.tolist()}): lower --lr, "
                                             f"or check the data with --validate_shards full (NaN/Inf rows in {shards.path}?)")
                        bar.set_postfix(act_s=f"{rate:,.0f}", mse=f"{m['mse'].mean():.3g}", l0=f"{m['l0'].mean():.3g}",
                                        refresh=False)
                        if not partial:
                            interval.reset()
                        t_interval, ex_interval = time.perf_counter(), 0
                    if step >= limit:
                        stopped = True
                        break
                    if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                        train_seconds += time.perf_counter() - t0
                        checkpoint()
                        t0 = time.perf_counter()
            finally:
                feeder.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - t0
            if batch_in_epoch < steps_per_epoch:  # stopped by max_steps inside the epoch
                checkpoint()
                break
            # ---- end of epoch: validate, resample, checkpoint
            last_val = evaluate(sae, val_view, B, sched.l1(step), device, amp, cfg.dense_threshold, aux_coeff)
            logger.log([{"type": "val", "step": step, "epoch": epoch} | v for v in last_val])
            ep_done = epoch + 1
            if (cfg.resample_every and ep_done % cfg.resample_every == 0 and ep_done + cfg.resample_every <= cfg.num_epochs):
                to_resample = dead.not_fired_since_resample()
                n = resample_dead_latents(sae, opt, to_resample, train_view, cfg, tag=ep_done, batch_size=B,
                                          member_keys=[member_key(a, b) for a, b in zip(lrs, l1_coeffs)])
                dead.resampled(to_resample, step)  # the new directions get a fresh dead window
                sched.rewarm(n.to(device) > 0, step)
                n_resampled = [a + int(b) for a, b in zip(n_resampled, n.tolist())]
                logger.log([{"type": "resample", "step": step, "epoch": epoch, "n_resampled": int(c)} for c in n.tolist()])
            epoch, batch_in_epoch = ep_done, 0
            t_interval, ex_interval = time.perf_counter(), 0
            checkpoint()
    except BaseException:
        logger.close()  # flush the log and finish a wandb run; the checkpoint is the resume point
        raise
    finally:
        bar.close()

    finished = epoch >= cfg.num_epochs
    rate = examples / train_seconds if train_seconds > 0 else 0.0
    incomplete = warmups_incomplete(step, sched, cfg)
    notes = ([f"the run ended at step {step}, before its {' and '.join(incomplete)} warm-up completed: it cannot "
              "have learnt with the configured schedule (more --num_epochs, a smaller --batch_size, or shorter "
              "--lr_warmup_steps / --l1_warmup_steps)"] if incomplete else [])
    for w in notes:
        if finished and not any(w != RANDOM_WEIGHTS_WARNING for w in planned):  # else warned at the start already;
            # a run stopped by --max_steps is paused, not ended
            warnings.warn(w, UserWarning, stacklevel=2)
    flags = [w for w in planned if w == RANDOM_WEIGHTS_WARNING] + notes
    result = TrainResult(out_dirs=out_dirs, steps=step, examples=examples, train_seconds=train_seconds,
                         act_per_s=rate, finished=finished, val=last_val, n_resampled=n_resampled,
                         warnings=flags, backbone_random_init=random_init)
    if finished:
        checkpoint(finished=True)
    for i, d in enumerate(out_dirs):
        member = sae.member(i) if S > 1 else sae
        member.save(d, extra={"train": member_train_cfg[i], "shards": shards_info, "val": last_val[i],
                              "steps": step, "epochs_done": epoch, "finished": finished,
                              "warmup_incomplete": incomplete, "backbone_random_init": random_init,
                              "warnings": flags, **extra[i]})
    logger.log([{"type": "summary", "step": step, "epoch": epoch, "finished": finished, "act_per_s": rate,
                 "train_seconds": train_seconds, "examples": examples, "n_resampled": n_resampled[i],
                 "warmup_incomplete": incomplete, "backbone_random_init": random_init, "warnings": flags}
                | {f"val_{k}": v for k, v in last_val[i].items()} for i in range(S)])
    logger.close()
    if cfg.plot:
        for d in out_dirs:
            plot_curves(d / METRICS_FILE, d / CURVES_FILE)
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(result.to_dict(), indent=1))
    if finished and not cfg.keep_checkpoint:
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    return result


def _check_resume(st: dict[str, Any], cfg_dict: dict[str, Any], sae_cfg: Any, shards: ShardSet, ckpt: Path,
                  lrs: Sequence[float], l1s: Sequence[float], out_dirs: Sequence[Path]) -> None:
    """The checkpoint must be of the same run: same SAE shape, data width, result-relevant config."""
    old_sae = st["sae_config"]
    if old_sae.get("d_in") != shards.d:
        raise TrainError(f"{ckpt}: the checkpointed SAE has d_in={old_sae.get('d_in')} but shard set {shards.path} "
                         f"has d={shards.d}; resume with the shard set it was trained on, or start a new --out")
    old_n = st.get("shards", {}).get("num_examples")
    if old_n is not None and old_n != len(shards):
        raise TrainError(f"{ckpt}: the run was trained on {old_n} examples ({st['shards'].get('path')}), shard set "
                         f"{shards.path} has {len(shards)}; resume with the same data or start a new --out")
    if old_sae != sae_cfg.to_dict():
        diff = {k: (old_sae.get(k), v) for k, v in sae_cfg.to_dict().items() if old_sae.get(k) != v}
        raise TrainError(f"{ckpt}: SAE config differs from this run's (checkpoint, now): {diff}")
    diff = {k: (st["config"].get(k), v) for k, v in cfg_dict.items()
            if k not in _RESUME_FREE_FIELDS and st["config"].get(k) != v}
    if diff:
        raise TrainError(f"{ckpt}: cannot resume with a different config (checkpoint, now): {diff}; "
                         "use the original flags or a new --out")
    if [float(v) for v in lrs] != st["lrs"] or [float(v) for v in l1s] != st["l1_coeffs"]:
        raise TrainError(f"{ckpt}: lrs/l1_coeffs {list(lrs)}/{list(l1s)} differ from the checkpoint's "
                         f"{st['lrs']}/{st['l1_coeffs']}")


def train(cfg: TrainConfig) -> Path:
    """Train one SAE as ``cfg`` says; returns its directory (``cfg.out``)."""
    shards = open_shards(cfg)
    _check_shards(shards, cfg.validate_shards)
    sae_cfg = sae_config_for(cfg, shards)
    result = train_stack(shards, sae_cfg, [cfg.lr], [cfg.l1_coeff], cfg, [Path(cfg.out)])
    return result.out_dirs[0]


def format_summary(sae_dir: str | Path) -> str:
    """What was trained, its final held-out EV / L0 / dead fraction and where it is (from its cfg.json)."""
    d = Path(sae_dir)
    try:
        doc = json.loads((d / "cfg.json").read_text())
    except (OSError, json.JSONDecodeError):
        return f"no finished SAE in {d} yet (cfg.json missing)"
    extra = doc.get("extra", {}) or {}
    val = extra.get("val") or {}
    state = "finished" if extra.get("finished") else "stopped early (rerun with --resume to continue)"
    line = (f"trained {doc.get('architecture', '?')} SAE {doc.get('d_in', '?')} -> {doc.get('d_sae', '?')} latents, "
            f"{extra.get('steps', '?')} steps, {state}")
    if val:
        line += (f"; held-out EV {val.get('explained_variance', float('nan')):.4f}, "
                 f"L0 {val.get('l0', float('nan')):.1f}, dead {val.get('dead_fraction', float('nan')):.3f}")
    return f"{line}\nSAE: {d}   curves: {d / CURVES_FILE}   metrics: {d / METRICS_FILE}"


def main(argv: list[str] | None = None) -> int:
    """``visae train`` / ``scripts/train_sae.py``: parse flags (defaults from configs/train_sae.yaml), train, summarise.

    Prints the summary (:func:`format_summary`) on stderr and the SAE directory on stdout.
    """
    cfg = parse_config(TrainConfig, argv, default_yaml=DEFAULT_YAML, prog="visae train",
                       description=(TrainConfig.__doc__ or "").strip())
    try:
        out = train(cfg)
    except (ConfigError, ShardError, TrainError) as e:
        print(f"visae train: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(out), file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
