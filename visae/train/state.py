"""State the trainer keeps across steps and checkpoints: dead-latent tracking, the open logging interval,
the schedules, and the checkpoint file (format: docs/training.md)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from visae.atomic import atomic_write_bytes
from visae.shards import ShardSet
from visae.train.config import (_RESUME_FREE_FIELDS, CHECKPOINT_FILE, CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                                READABLE_CHECKPOINT_VERSIONS, TrainConfig, TrainError)


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

    Per member [S]: batch-size-weighted sums of mse, l1, l0, aux, the sparsity term
    (lambda x the architecture's metric) and that metric, and the SSE; shared by the members: sum x [d_in] and
    sum ||x||^2 (float64, shard space; times scale_factor (squared) in SAE space), examples
    ``n`` and ``steps``. The interval's explained variance is 1 - SSE / SST over all its
    examples (mean over the interval), so a 1-row batch is just one more example; null (with
    a warning) only when the interval's examples have no spread. Checkpointing these sums makes
    a resumed run log the records an uninterrupted run logs.
    """

    KEYS = ("mse", "l1", "l0", "aux", "sparsity", "metric")

    def __init__(self, S: int, d_in: int, device: torch.device):
        self.sums = torch.zeros(len(self.KEYS), S, dtype=torch.float64, device=device)
        self.sse = torch.zeros(S, dtype=torch.float64, device=device)
        self.sx = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.sxx = torch.zeros((), dtype=torch.float64, device=device)
        self.n = 0
        self.steps = 0

    def add(self, out: Any, x: torch.Tensor, metric: torch.Tensor, coeff: torch.Tensor) -> None:
        """One step: ``out`` the LossOutput, ``x`` the shard batch [B, d_in], ``metric`` [S] the architecture's
        sparsity metric (before lambda), ``coeff`` [S] the step's lambda."""
        B = x.shape[0]
        metric = metric.detach()
        rows = torch.stack([out.mse.detach(), out.l1, out.l0, out.aux, coeff * metric, metric]).double()
        self.sums.add_(rows, alpha=B)
        self.sse.add_(out.sq_err.sum(-1, dtype=torch.float64))
        self.sx.add_(x.sum(0, dtype=torch.float64))
        self.sxx.add_(torch.linalg.vector_norm(x, dtype=torch.float64).square())
        self.n += B
        self.steps += 1

    def means(self, scale: float) -> tuple[np.ndarray, list[float | None]]:
        """(interval means [6, S] in KEYS order, explained variance per member or None); one host transfer."""
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


def warmups_incomplete(step: int, sched: Any, cfg: TrainConfig) -> list[str]:
    """Which warm-ups had not completed at ``step``: "lr" (any member's, re-warm-ups included), "lambda"
    (only for an architecture with a sparsity term: see :func:`has_lambda`)."""
    out = []
    if cfg.lr_warmup_steps > 0 and any(step - w < cfg.lr_warmup_steps for w in sched.warm_start.tolist()):
        out.append("lr")
    if step < cfg.l1_warmup_steps and has_lambda(cfg.architecture):
        out.append("lambda")
    return out


def has_lambda(architecture: str) -> bool:
    """Whether ``architecture`` trains with a sparsity term weighted by lambda (``SAE.sparsity_metric`` is
    not None: ReLU's L1, JumpReLU's L0); TopK-style SAEs fix L0 by k and have no lambda to warm up."""
    from visae.sae import ARCHITECTURES

    return getattr(ARCHITECTURES.get(architecture), "sparsity_metric", None) is not None


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



def _rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """One safetensors file (tensors + JSON state in its metadata), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    from visae.integrity import safetensors_bytes, tensors_digest

    t = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    state_json = json.dumps(state)
    meta = {"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION), "state": state_json,
            "sha256": tensors_digest(t, state_json)}  # of its own tensors and state; verified by load_checkpoint
    atomic_write_bytes(path, safetensors_bytes(t, meta))


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
    _verify_checkpoint(path, tensors, meta)
    return tensors, json.loads(meta["state"])


def _verify_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """The checksum in the checkpoint's metadata must match its tensors and state; its weights must be finite."""
    from visae.integrity import check_finite, tensors_digest

    if "sha256" not in meta:
        warnings.warn(f"checkpoint {path} records no checksum (written by an older visae): it cannot be verified",
                      UserWarning, stacklevel=3)
    elif tensors_digest(tensors, meta.get("state", "")) != meta["sha256"]:
        raise TrainError(f"checkpoint {path} is damaged: its tensors or state do not match the checksum recorded "
                         "when it was written; delete it (the run restarts) or restore it")
    check_finite({k: v for k, v in tensors.items() if k.startswith("sae.")}, f"checkpoint {path}", TrainError)


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
    old_fp = st.get("shards", {}).get("fingerprint")
    if old_fp is not None and old_fp != shards.fingerprint():
        raise TrainError(f"{ckpt}: shard set {shards.path} holds other data than the run was trained on "
                         f"({st['shards'].get('path')}; fingerprint of its content differs); resume with the same "
                         "data, --overwrite to start over, or a new --out")
    if old_sae != sae_cfg.to_dict():
        diff = {k: (old_sae.get(k), v) for k, v in sae_cfg.to_dict().items() if old_sae.get(k) != v}
        raise TrainError(f"{ckpt}: SAE config differs from this run's (checkpoint, now): {diff}")
    diff = {k: (st["config"].get(k), v) for k, v in cfg_dict.items()
            if k not in _RESUME_FREE_FIELDS and st["config"].get(k) != v}
    if diff:
        raise TrainError(f"{ckpt}: cannot resume with a different config (checkpoint, now): {diff}; "
                         "use the original flags, --overwrite to start over, or a new --out")
    if [float(v) for v in lrs] != st["lrs"] or [float(v) for v in l1s] != st["l1_coeffs"]:
        raise TrainError(f"{ckpt}: lrs/l1_coeffs {list(lrs)}/{list(l1s)} differ from the checkpoint's "
                         f"{st['lrs']}/{st['l1_coeffs']}")


def _latent_axis(name: str, p: torch.Tensor, d_sae: int) -> int | None:
    """Which axis of the stacked parameter ``name`` indexes latents, as the registered architectures declare it
    (``SAE.latent_axes``); the trainer asks its SAE (``sae.latent_axis``). Raises TrainError for an undeclared name."""
    from visae.sae import ARCHITECTURES

    for cls in ARCHITECTURES.values():
        if name in cls.latent_axes:
            return cls.latent_axes[name]
    raise TrainError(f"parameter {name!r} (shape {list(p.shape)}, d_sae {d_sae}) is in no registered architecture's "
                     "latent_axes")
