"""The multi-epoch SAE trainer: many epochs over a shard set, Adam, resampling, checkpoints.

    python scripts/train_sae.py --shards runs/acts --out runs/sae --num_epochs 200
    python scripts/train_sae.py --synthetic --out runs/planted      # generated planted data

One code path trains a stack of S same-shape SAEs (``train_stack``: per-member lr and
lambda, one batch read feeding all members, as the sweep does); ``train`` is the S = 1 case.
Per step: ``sae.training_loss`` on the shard batch -> backward -> ``remove_parallel_grad_``
-> :class:`visae.optim.StackedAdam` step with the scheduled lr [S] -> ``normalize_decoder_``.

Schedules: lr warm-up from lr/10 to lr over ``lr_warmup_steps``, and the same re-warm-up
after each resampling (per member, when it resampled any latent); lambda warm-up from 0
over ``l1_warmup_steps``. Every ``resample_every`` epochs (not in the last period) latents
that did not fire since the previous resampling are resampled (Anthropic, as in
Discover-then-Name). A checkpoint is written atomically after every epoch (and every
``checkpoint_every_steps``); ``--resume`` continues a killed run bit-for-bit. The
checkpoint format and the metrics are described in docs/training.md.

The package, one module per concern (no module imports the package itself):

- :mod:`visae.train.config`: ``TrainConfig``, ``TrainResult``, ``TrainError``, file names;
- :mod:`visae.train.data`: shard set, split, SAE config, device feed, lambda convention, warnings;
- :mod:`visae.train.state`: dead-latent tracking, logging interval, schedules, checkpoint file;
- :mod:`visae.train.steps`: validation (inference path) and resampling;
- :mod:`visae.train.trainer`: the :class:`Trainer` class whose ``fit`` is the loop, and ``train_stack``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from visae.config import parse_config
from visae.metrics import CURVES_FILE, METRICS_FILE
from visae.optim import StackedAdam  # noqa: F401 - part of the trainer's namespace (tests patch its step)
from visae.resources import REPO  # noqa: F401 - REPO: the checkout, for scripts and tests
from visae.shards import ShardError, ShardSet, ShardView  # noqa: F401
from visae.train.config import (CHECKPOINT_DIR, CHECKPOINT_FILE, CHECKPOINT_FORMAT,  # noqa: F401
                                CHECKPOINT_VERSION, DEFAULT_YAML, READABLE_CHECKPOINT_VERSIONS, SUMMARY_FILE,
                                TrainConfig, TrainError, TrainResult)
from visae.train.data import (RANDOM_WEIGHTS_WARNING, _check_shards, backbone_random_init,  # noqa: F401
                              l1_coeffs_used, member_key, open_shards, plan_warnings, planned_steps, resolve_device,
                              sae_config_for)
from visae.train.state import (_DeadTracker, _IntervalLog, _latent_axis, _Schedules,  # noqa: F401
                               load_checkpoint, save_checkpoint, warmups_incomplete)
from visae.train.steps import evaluate, resample_dead_latents  # noqa: F401
from visae.train.trainer import Trainer, train_stack

__all__ = ["TrainConfig", "TrainError", "TrainResult", "Trainer", "train", "train_stack", "main", "load_checkpoint",
           "l1_coeffs_used", "sae_config_for", "evaluate", "resample_dead_latents", "CHECKPOINT_DIR", "CHECKPOINT_FILE"]


def train(cfg: TrainConfig) -> Path:
    """Train one SAE as ``cfg`` says; returns its directory (``cfg.out``).

    Holds the lock of ``cfg.out`` while it runs (:func:`visae.atomic.output_lock`: a second
    writer of the same --out is refused at once; stale temporary files there are removed).
    """
    from contextlib import nullcontext

    from visae.atomic import output_lock
    from visae.train.dist import DataParallel

    if not cfg.out:
        raise TrainError("--out is required: the directory for the SAE")
    # Under torchrun (WORLD_SIZE > 1): one SAE trained data-parallel; rank 0 holds the lock and writes.
    dp = DataParallel.from_env(cfg.dist_timeout, cfg.device)
    try:
        with output_lock(cfg.out, "visae train") if dp.is_writer else nullcontext():
            if not dp.is_writer:
                dp.barrier()  # rank 0 has generated --synthetic data and validated the shards
            shards = open_shards(cfg)
            if dp.is_writer:
                _check_shards(shards, cfg.validate_shards)
                dp.barrier()
            sae_cfg = sae_config_for(cfg, shards)
            result = train_stack(shards, sae_cfg, [cfg.lr], [cfg.l1_coeff], cfg, [Path(cfg.out)], dp=dp)
    finally:
        dp.close()  # leave the process group before the interpreter's teardown
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
    state = "finished" if extra.get("finished") else "stopped early (rerun the same command to continue)"
    line = (f"trained {doc.get('architecture', '?')} SAE {doc.get('d_in', '?')} -> {doc.get('d_sae', '?')} latents, "
            f"{extra.get('steps', '?')} steps, {state}")
    if val:
        line += (f"; held-out EV {_fmt(val.get('explained_variance'), '.4f')}, L0 {_fmt(val.get('l0'), '.1f')}, "
                 f"dead {_fmt(val.get('dead_fraction'), '.3f')}")
    flags = "".join(f"\nwarning: {w}" for w in extra.get("warnings") or [])
    curves = f"   curves: {d / CURVES_FILE}" if (d / CURVES_FILE).is_file() else ""  # --no_plot draws none
    return f"{line}\nSAE: {d}{curves}   metrics: {d / METRICS_FILE}{flags}"


def _fmt(v: float | None, spec: str) -> str:
    """A metric for the summary; null (undefined, e.g. EV of a 1-row split) prints as "undefined"."""
    return "undefined" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    """``visae train`` / ``scripts/train_sae.py``: parse flags (defaults from configs/train_sae.yaml), train, summarise.

    Prints the summary (:func:`format_summary`) on stderr and the SAE directory on stdout.
    """
    from visae.errors import VisaeError, report

    try:
        cfg = parse_config(TrainConfig, argv, default_yaml=DEFAULT_YAML, prog="visae train",
                           description=(TrainConfig.__doc__ or "").strip())
        out = train(cfg)
    except VisaeError as e:  # a bad flag, shard set or --out (exit 2), a lock held (1): visae.errors
        return report("visae train", e)
    import os

    if os.environ.get("RANK", "0") != "0":  # data-parallel: rank 0 speaks for the run
        return 0
    print(format_summary(out), file=sys.stderr)
    print(out)
    return 0
