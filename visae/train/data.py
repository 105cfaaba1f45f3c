"""Data for the trainer: the shard set, its split, the SAE config it implies, the device feed, and warnings.

Also the seeds of a stack member's random draws (:func:`member_key`) and the lambda
convention (:func:`l1_coeffs_used`, docs/training.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from visae.atomic import atomic_write_text
from visae.shards import ShardError, ShardSet, ShardView
from visae.train.config import TrainConfig, TrainError

__all__ = ["resolve_device", "member_key", "backbone_random_init", "plan_warnings", "planned_steps", "open_shards",
           "sae_config_for", "l1_coeffs_used", "RANDOM_WEIGHTS_WARNING"]


def resolve_device(name: str) -> torch.device:
    """``--device`` on this machine (:func:`visae.devices.resolve_device`; ConfigError for one it lacks). ``auto``
    with CUDA is ``cuda`` without an index: a data-parallel run's :class:`visae.train.dist.DataParallel` then puts
    each rank on its own GPU (``cuda:LOCAL_RANK``); with an index every rank landed on GPU 0."""
    from visae.devices import resolve_device as resolve

    dev = resolve(name)
    return torch.device("cuda") if name == "auto" and dev.type == "cuda" else dev


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
    lambda warm-up (``l1_warmup_steps``; only for architectures with a sparsity term, ``SAE.sparsity_metric``:
    TopK-style SAEs have no lambda) ends before its schedule reaches the configured values;
    a shard set whose provenance records ``random_init`` was extracted from random weights.
    """
    from visae.train.state import has_lambda

    out = []
    warmups = [("lr", cfg.lr_warmup_steps, "lr_warmup_steps")]
    if has_lambda(cfg.architecture):
        warmups.append(("lambda", cfg.l1_warmup_steps, "l1_warmup_steps"))
    short = [f"{name} warm-up ({n} steps, --{flag})" for name, n, flag in warmups if total_steps < n]
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


def open_shards(cfg: TrainConfig) -> ShardSet:
    """The shard set to train on: ``--shards``, or a generated planted one with ``--synthetic``."""
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
                         "or pass --synthetic to train on a generated planted-dictionary shard set")
    return shards


def _check_shards(shards: ShardSet, level: str) -> None:
    if level == "none":
        return
    try:
        shards.validate(full=(level == "full"))
    except ShardError as e:
        raise TrainError(f"shard set {shards.path} failed validation: {e}") from None


def sae_config_for(cfg: TrainConfig, shards: ShardSet, n_models: int = 1) -> "Any":
    """The SAEConfig that ``cfg`` asks for on ``shards``: d_in from the manifest, its normalisation, and every
    TrainConfig field that is also an SAEConfig field (architecture, k, impl, architecture-specific ones)."""
    from visae.sae import SAEConfig
    from visae.sae.base import K_ARCHITECTURES

    d_in = shards.d
    scale = 1.0
    if shards.normalization == "none":
        scale = _estimate_scale(shards, cfg)
    d_sae = d_in * cfg.expansion_factor
    if cfg.architecture in K_ARCHITECTURES and cfg.k > d_sae:
        raise TrainError(f"--k {cfg.k} exceeds d_sae = {d_in} (shard d) x {cfg.expansion_factor} (--expansion_factor) "
                         f"= {d_sae}")
    shared = {f.name for f in dataclasses.fields(SAEConfig)} & {f.name for f in dataclasses.fields(cfg)}
    try:
        return SAEConfig(**{name: getattr(cfg, name) for name in sorted(shared)}, d_in=d_in, d_sae=d_sae,
                         n_models=n_models,
                         input_normalization="unit_norm" if shards.normalization == "unit_norm" else "none",
                         scale_factor=scale)
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
    for an L1 term and p = 0 for an L0 term (``SAE.sparsity_degree``). Over the training ``view`` the
    raw loss weighs the reconstruction of example i by rho_i^2 and its sparsity term by
    rho_i^p, so the one coefficient that keeps their ratio is

        lambda_unit = lambda_raw * mean(rho^p) / mean(rho^2)     (L1: mean(r) / mean(r^2) when c = 1)

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
    from visae.sae import sae_class

    p = sae_class(sae_cfg.architecture).sparsity_degree
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
