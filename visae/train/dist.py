"""Data-parallel training of one SAE over ``torch.distributed`` ranks (docs/training.md, "Data-parallel training").

:class:`DataParallel` is the trainer's only view of the process group. With one process
(``DataParallel()``, the default) every method is a no-op and the trainer runs exactly as
before. With W ranks (``DataParallel.from_env()`` under ``torchrun``, or ``DataParallel(group)``):

- the user sets the **global** batch B; rank r takes rows ``[m*r//W, m*(r+1)//W)`` of every
  global batch of m rows of the epoch's permutation (``ShardView.epoch_batches(world_size=,
  rank=)``), so B/W rows per step when W divides B (required) and a split last batch;
- per step one all-reduce (sum) of one flat buffer: every parameter gradient times
  ``m_r / m`` (the rank's share of the batch: the loss is a batch mean, so the weighted sum
  is the gradient of the global batch), the fired masks (a latent fired if it fired on any
  rank) and the per-member active-code counts (the ``impl="auto"`` kernel choice then sees
  the global fraction, so every rank takes the same kernel). Gradients are reduced after
  ``backward`` of the fused / sparse kernels, so those kernels are used unchanged;
- floating-point buffers (running statistics: BatchTopK's threshold, updated from each
  rank's rows) are averaged in the same buffer, so they too stay identical on every rank;
- the decoder projection, Adam and the decoder normalisation then run on identical
  gradients on every rank, so the SAE stays identical (replicated) without broadcasts;
- sums (logging interval, validation, resampling scores) are all-reduced where they are
  used; rank 0 writes checkpoints, metrics and the SAE directories.

The process group gets a finite timeout (``TrainConfig.dist_timeout``), so a rank that dies
ends the others' collectives with an error instead of gloo's / NCCL's 30-minute default.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence

import torch

from visae.train.config import TrainError

__all__ = ["DataParallel", "env_world_size"]


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset). Raises TrainError when it is not a positive integer."""
    try:
        w = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise TrainError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None
    if w < 1:
        raise TrainError(f"WORLD_SIZE must be >= 1, got {w}")
    return w


class DataParallel:
    """The ranks of one data-parallel run (``group`` None: a single process, every method a no-op)."""

    def __init__(self, group: Any = None):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        on = group is not None
        self.world = dist.get_world_size(group) if on else 1
        self.rank = dist.get_rank(group) if on else 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank)) if on else 0
        self.backend = dist.get_backend(group) if on else None
        self.owns_group = False  # set by from_env when it joined the default group itself (close() leaves it)

    @property
    def reduce_device(self) -> torch.device:
        """Where host-side tensors go to be reduced: this rank's GPU for NCCL, the CPU for gloo."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    @classmethod
    def from_env(cls, timeout_s: float, device: str = "auto") -> "DataParallel":
        """Join the process group torchrun describes (``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``...).

        Backend NCCL when the run trains on CUDA, gloo otherwise; ``timeout_s`` bounds every
        collective. Returns the single-process instance when ``WORLD_SIZE`` is 1.
        """
        import torch.distributed as dist

        if env_world_size() == 1:
            return cls()
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        joined = not dist.is_initialized()
        if joined:
            dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        dp = cls(dist.group.WORLD)
        dp.owns_group = joined
        return dp

    def close(self) -> None:
        """Leave the process group :meth:`from_env` joined (``destroy_process_group``); a no-op otherwise.

        Call it before the process exits: a gloo group left alive aborts the interpreter's teardown now and then
        ("terminate called without an active exception", SIGABRT, pytorch/pytorch#190489), and NCCL warns.
        """
        if self.owns_group and self.dist.is_initialized():
            try:
                self.dist.destroy_process_group()
            except Exception as e:  # in a finally after a failed collective: never hide the error that ended the run
                import warnings

                warnings.warn(f"leaving the process group failed: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
        self.owns_group = False

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the run's files."""
        return self.rank == 0

    def device(self, dev: torch.device) -> torch.device:
        """A CUDA device without an index becomes this rank's (``LOCAL_RANK``)."""
        if self.active and dev.type == "cuda" and dev.index is None:
            return torch.device("cuda", self.local_rank)
        return dev

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise TrainError(f"--batch_size {batch_size} (the global batch) is not divisible by the world size "
                             f"{self.world}: each rank takes batch_size / world_size rows; choose a multiple")

    def rows(self, m: int) -> int:
        """How many rows of a global batch of ``m`` this rank takes."""
        return m * (self.rank + 1) // self.world - m * self.rank // self.world

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier(group=self.group)

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Every parameter and buffer from rank 0 (an identical start however each rank initialised)."""
        if not self.active:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                self.dist.broadcast(t.data, src=0, group=self.group)

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """All-reduce (sum) ``tensors`` in place, packed into one buffer per dtype."""
        if not self.active:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            self.dist.all_reduce(flat, group=self.group)
            at = 0
            for t in ts:
                t.copy_(flat[at:at + t.numel()].view_as(t))
                at += t.numel()

    def reduce_step_(self, sae: Any, out: Any, m_local: int, m_global: int) -> torch.Tensor:
        """After ``backward`` on this rank's ``m_local`` rows of a global batch of ``m_global``: the global
        gradient in every ``p.grad``, the global fired mask [S, d_sae] (returned), and the kernel choice's
        active fraction of the global batch. ``out`` is None for a rank with no rows in this batch."""
        if not self.active:
            return out.fired
        params = [p for p in sae.parameters() if p.requires_grad]
        w = m_local / m_global
        S, d_sae = sae.n_models, sae.d_sae
        dev, dt = params[0].device, params[0].dtype  # the buffer in the parameters' dtype (fp32; fp64 in tests)
        grads = [(p.grad.reshape(-1).to(dt) * w) if (out is not None and p.grad is not None)
                 else torch.zeros(p.numel(), device=dev, dtype=dt) for p in params]
        fired = (out.fired.reshape(-1).to(dt) if out is not None else torch.zeros(S * d_sae, device=dev, dtype=dt))
        counts = (out.l0.to(dt) * m_local) if out is not None else torch.zeros(S, device=dev, dtype=dt)
        tracks = torch.tensor([float("_last_active_frac" in sae.__dict__ and out is not None)], device=dev, dtype=dt)
        bufs = [b for b in sae.buffers() if b.is_floating_point()]  # running statistics (BatchTopK's threshold)
        flat = torch.cat(grads + [b.reshape(-1).to(dt) / self.world for b in bufs] + [fired, counts, tracks])
        self.dist.all_reduce(flat, group=self.group)
        at = 0
        for p in params:
            p.grad = flat[at:at + p.numel()].view_as(p).to(p.dtype)
            at += p.numel()
        for b in bufs:  # the mean over ranks: identical on every rank
            b.copy_(flat[at:at + b.numel()].view_as(b))
            at += b.numel()
        fired_g = flat[at:at + S * d_sae].view(S, d_sae) > 0
        if float(flat[-1]) > 0:  # the auto dispatch tracks the active fraction (set by some rank's kernel)
            l0 = flat[at + S * d_sae:-1].round().float() / m_global  # integer counts, divided as one process does
            sae.__dict__["_last_active_frac"] = float(l0.max()) / d_sae
        return fired_g

    def gather_rng(self) -> list[torch.Tensor]:
        """Every rank's torch RNG state (rank order); on rank != 0 the list is returned too (collective)."""
        state = torch.get_rng_state()
        if not self.active:
            return [state]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, state, group=self.group)
        return out

    def my_batches(self, j: int) -> bool:
        """Whether sequential batch ``j`` (validation, resampling scores) is this rank's: j mod W."""
        return j % self.world == self.rank


class NullLogger:
    """What a rank other than 0 logs to: nothing (rank 0 writes metrics.jsonl and wandb)."""

    wandb_id: str | None = None

    def log(self, records: Any) -> None:
        pass

    def close(self) -> None:
        pass
