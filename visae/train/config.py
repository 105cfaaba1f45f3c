"""The trainer's configuration, result and error types, and the names of its files (docs/training.md).

This module holds the user-facing flags; architecture-specific flags (``k``, ...) are SAEConfig
fields of the same name, passed on by :func:`visae.train.data.sae_config_for`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from visae.config import ConfigError, check_bounds
from visae.errors import VisaeError
from visae.resources import config_yaml
from visae.sae.base import SAEConfig

__all__ = ["TrainConfig", "TrainError", "TrainResult", "DEFAULT_YAML", "CHECKPOINT_DIR", "CHECKPOINT_FILE",
           "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "READABLE_CHECKPOINT_VERSIONS", "SUMMARY_FILE"]

DEFAULT_YAML = config_yaml("train_sae.yaml")
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "visae.train-checkpoint"
CHECKPOINT_VERSION = 2
READABLE_CHECKPOINT_VERSIONS = ("1", "2")  # 1: no kernel / logging state (resume is then not bit-identical)
SUMMARY_FILE = "train_summary.json"

# Fields that may differ between a run and its --resume without changing the result.
_RESUME_FREE_FIELDS = {"resume", "overwrite", "max_steps", "progress", "wandb", "wandb_project", "wandb_name",
                       "plot", "validate_shards", "prefetch", "device", "dist_timeout", "num_epochs", "log_every",
                       "checkpoint_every_steps", "keep_checkpoint", "shards",  # shards: checked by content
                       "out",  # a moved run folder resumes: the data fingerprint and config decide, not the path
                       "init_from"}  # only the start of a run reads it; a resume restores the checkpoint's weights


class TrainError(VisaeError, ValueError):
    """Training cannot start or continue: bad config, data that does not fit, a broken checkpoint."""


def _sae_help(name: str) -> str:
    """The help text of SAEConfig's field ``name``: a flag passed on to the SAE says what the SAE package says."""
    return next(f.metadata["help"] for f in dataclasses.fields(SAEConfig) if f.name == name)


@dataclass(frozen=True)
class TrainConfig:
    """Train a sparse autoencoder on a shard set of activations (by default the Discover-then-Name recipe: L1 penalty)."""

    # -- data and output
    shards: str = field(default="", metadata={"help": "shard-set directory (manifest.json + shards) to train on; "
                                                      "required unless --synthetic"})
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
    architecture: str = field(
        default=SAEConfig.architecture, metadata={"help": _sae_help("architecture") + "; any name registered in "
                                                          "visae.sae.ARCHITECTURES (register_architecture adds more)"})
    expansion_factor: int = field(default=8, metadata={"help": "d_sae = expansion_factor * d_in"})
    k: int = field(default=32, metadata={"help": _sae_help("k")})
    matryoshka_levels: int = field(default=5, metadata={"help": _sae_help("matryoshka_levels")})
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
    l1_coeff: float = field(default=3e-5, metadata={"help": "sparsity coefficient lambda: the weight of the "
                                                            "architecture's sparsity metric (L1 of decoder-norm-"
                                                            "weighted codes, or L0; none for k-sparse ones)"})
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
                                                                   "as dead (dead_fraction, the aux-k loss)"})
    dense_threshold: float = field(default=0.1, metadata={"help": "a latent firing on more than this fraction of "
                                                                  "inputs counts as dense"})
    # -- runtime
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, cuda:1, ..."})
    dist_timeout: float = field(default=300.0, metadata={"help": "data-parallel (torchrun): seconds a collective "
                                                                 "waits for the other ranks before the run fails "
                                                                 "(a killed rank ends the run this fast)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps in total (0 = no limit; "
                                                        "for benchmarks and tests); a checkpoint is written"})
    log_every: int = field(default=50, metadata={"help": "steps between training-metric records"})
    checkpoint_every_steps: int = field(default=0, metadata={"help": "extra mid-epoch checkpoints every this many "
                                                                     "steps (0 = only after each epoch)"})
    keep_checkpoint: bool = field(default=True, metadata={"help": "keep <out>/checkpoint after a finished run"})
    resume: bool = field(default=True, metadata={"help": "continue the unfinished run of the same config and data "
                                                         "in --out (its checkpoint) when there is one, as sweep and "
                                                         "extract do; --no_resume: refuse to touch an earlier run"})
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
        from visae.devices import check_device

        check_device(self.device, "TrainConfig.device")
        positive = ("num_epochs", "batch_size", "expansion_factor", "k", "log_every", "init_examples",
                    "resample_examples", "dead_window_steps", "shuffle_buffer", "synthetic_examples", "synthetic_d",
                    "synthetic_atoms", "lr", "dist_timeout")
        for name in positive:
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):  # (not x > 0: a NaN is refused too; an inf lr trained NaN weights)
                raise ConfigError(f"TrainConfig.{name} must be positive and finite, got {v}")
        if self.l1_convention not in ("unit", "raw"):
            raise ConfigError(f"TrainConfig.l1_convention must be 'unit' or 'raw', got {self.l1_convention!r}")
        # taken silently before: a dense_threshold outside [0, 1] counted every latent or none as dense, a
        # negative resampling scale pointed resampled encoder columns away from their inputs, an Adam beta >= 1
        # froze the first moment (beta1) or divided by a zero bias correction (beta2); a negative seed was a numpy
        # traceback ("expected non-negative integer") after the output directory was locked
        check_bounds(self, {"seed": (0, None), "l1_coeff": (0.0, None), "dense_threshold": (0.0, 1.0), "adam_eps": (0.0, None),
                            "resample_encoder_scale": (0.0, None),
                            **{name: (0, None) for name in ("max_steps", "lr_warmup_steps", "l1_warmup_steps",
                                                            "resample_every", "checkpoint_every_steps", "prefetch")}})
        for name in ("val_fraction", "adam_beta1", "adam_beta2"):  # half-open [0, 1)
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"TrainConfig.{name} = {getattr(self, name)!r}: expected in [0, 1)")
        from visae.sae import ARCHITECTURES

        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"TrainConfig.architecture {self.architecture!r} is not a registered SAE architecture; "
                              f"registered: {', '.join(sorted(ARCHITECTURES))}")


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
