"""The training loop as a small class: :class:`Trainer` builds or restores a run, ``fit`` calls named steps.

    trainer = Trainer(shards, sae_cfg, lrs=[5e-4], l1_coeffs=[3e-5], cfg=cfg)
    result = trainer.fit()

``fit`` is the loop: per batch ``_step`` (loss, backward, decoder-gradient projection, Adam,
decoder normalisation, bookkeeping), ``_log_interval`` every ``log_every`` steps,
``_checkpoint`` every ``checkpoint_every_steps``; per epoch ``_end_of_epoch`` (validation,
resampling, checkpoint); at the end ``_save``. Everything the loop needs to know about an
architecture comes from the SAE class (``uses_aux``, ``sparsity_metric``, ``step_sparsity``,
``latent_axis``, ``reset_latents_``): the trainer names none. Formats: docs/training.md.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from visae.atomic import atomic_write_text
from visae.config import absolute_paths, config_to_dict
from visae.errors import Interrupted
from visae.metrics import CURVES_FILE, METRICS_FILE, MetricsLogger, plot_curves
from visae.optim import StackedAdam
from visae.train.config import CHECKPOINT_DIR, CHECKPOINT_FILE, SUMMARY_FILE, TrainConfig, TrainError, TrainResult
from visae.train.data import (RANDOM_WEIGHTS_WARNING, _Feeder, _sample_rows, _split, backbone_random_init,
                              l1_coeffs_used, member_key, plan_warnings, resolve_device)
from visae.train.dist import DataParallel, NullLogger
from visae.train.state import (_check_resume, _DeadTracker, _IntervalLog, _rng_state, _Schedules, _warn_undefined_ev,
                               load_checkpoint, save_checkpoint, warmups_incomplete)
from visae.train.steps import evaluate, resample_dead_latents

__all__ = ["Trainer", "train_stack"]

_RATE_KEYS = ("dead_fraction", "dead_since_resample_fraction", "lr", "l1_coeff")


class Trainer:
    """One run of a stack of S = len(lrs) same-shape SAEs over a shard set (arguments: :func:`train_stack`).

    Construction validates the arguments, opens the data, applies the resume policy (continue
    a checkpoint with ``cfg.resume``, replace it with ``cfg.overwrite``, else refuse) and builds
    or restores every piece of state; ``fit`` trains and saves. Raises TrainError before any
    expensive work for arguments that do not fit.
    """

    def __init__(self, data: Any, sae_cfg: Any, lrs: Sequence[float], l1_coeffs: Sequence[float], cfg: TrainConfig,
                 out_dirs: Sequence[str | Path] | None = None, *, extra: Sequence[dict[str, Any]] | None = None,
                 dp: DataParallel | None = None):
        self.cfg = cfg
        self.dp = dp if dp is not None else DataParallel()  # one process unless given ranks (visae.train.dist)
        self.lrs, self.l1_coeffs = [float(v) for v in lrs], [float(v) for v in l1_coeffs]
        self._check_args(out_dirs, extra)
        self._open_data(data, sae_cfg)
        resume_state = self._resume_policy()
        self._build()
        if resume_state is not None:
            self._restore(*resume_state)
            self._localise_interval()  # the checkpoint's interval sums are global: rank 0 holds them
        else:
            self._initialise()
        self.dp.broadcast_module_(self.sae)  # data-parallel: every rank starts from rank 0's weights
        self.dp.barrier()  # every rank has read the checkpoint before rank 0 replaces it
        if self._replace_checkpoint and self.dp.is_writer:  # --overwrite: only now that the request is valid
            shutil.rmtree(self.run_dir / CHECKPOINT_DIR)
        self._open_logger(resumed=resume_state is not None)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        """Train to ``num_epochs`` (or ``max_steps``), checkpointing as configured; save every member."""
        self.sae.train()
        try:
            while self.epoch < self.cfg.num_epochs and self.step < self.limit:
                with self._epoch_batches() as batches:
                    for x in batches:
                        self._step(x)
                        if self.step % self.cfg.log_every == 0 or self.step == self.limit:
                            self._log_interval()
                        if self.step >= self.limit:
                            break
                        self._checkpoint_if_due()
                if self.batch_in_epoch < self.steps_per_epoch:  # stopped by max_steps inside the epoch
                    self._checkpoint()
                    break
                self._end_of_epoch()
        except KeyboardInterrupt:
            self.logger.close()  # flush the log and finish a wandb run; the checkpoint is the resume point
            raise Interrupted(self._interrupted_note()) from None
        except BaseException:
            self.logger.close()  # flush the log and finish a wandb run; the checkpoint is the resume point
            raise
        finally:
            self.bar.close()
        return self._save()

    def _interrupted_note(self) -> str:
        """Ctrl-C: which checkpoint holds the run and how to continue it."""
        how = "rerun the same command" + ("" if self.cfg.resume else " with --resume") + " to continue from it"
        try:
            from safetensors import safe_open

            with safe_open(str(self.ckpt_path), framework="pt") as f:
                saved = json.loads((f.metadata() or {})["state"])["step"]
        except Exception:  # noqa: BLE001 - no (readable) checkpoint yet
            return (f"stopped at step {self.step} before the first checkpoint ({self.ckpt_path}); rerun the same "
                    "command to start again")
        return f"stopped at step {self.step}; the checkpoint {self.ckpt_path} holds step {saved}: {how}"

    # ------------------------------------------------------------------ construction
    def _check_args(self, out_dirs: Sequence[str | Path] | None, extra: Sequence[dict[str, Any]] | None) -> None:
        S = self.S = len(self.lrs)
        if S < 1 or len(self.l1_coeffs) != S:
            raise TrainError(f"train_stack: need as many l1_coeffs as lrs (>= 1), got {S} and {len(self.l1_coeffs)}")
        self.run_dir = Path(self.cfg.out)
        default = [self.run_dir] if S == 1 else []
        self.out_dirs = [Path(d) for d in (out_dirs if out_dirs is not None else default)]
        if len(self.out_dirs) != S:
            raise TrainError(f"train_stack: {S} members need {S} out_dirs, got {len(self.out_dirs)}")
        self.extra = list(extra) if extra is not None else [{} for _ in range(S)]

    def _open_data(self, data: Any, sae_cfg: Any) -> None:
        cfg = self.cfg
        self.shards, self.train_view, self.val_view = _split(data, cfg)
        if sae_cfg.d_in != self.shards.d:
            raise TrainError(f"SAE d_in={sae_cfg.d_in} but shard set {self.shards.path} has d={self.shards.d}")
        self.sae_cfg = dataclasses.replace(sae_cfg, n_models=self.S)
        # lambda as given (member identity: resume check, resampling seeds) -> lambda the loss uses
        self.l1_used, self.l1_conversion = l1_coeffs_used(self.l1_coeffs, cfg.l1_convention, self.train_view,
                                                          self.sae_cfg)
        self.device = self.dp.device(resolve_device(cfg.device))
        self.dp.check_batch(cfg.batch_size)
        # Every example once per epoch: the last batch of an epoch may be short (drop_last=False).
        self.steps_per_epoch = -(-len(self.train_view) // cfg.batch_size)
        if self.steps_per_epoch == 0:
            raise TrainError(f"training split of {self.shards.path} is empty ({len(self.shards)} examples, "
                             f"--val_fraction {cfg.val_fraction})")
        self.total_steps = self.steps_per_epoch * cfg.num_epochs
        self.limit = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        self.random_init = backbone_random_init(self.shards.source)
        self.planned = plan_warnings(self.total_steps, cfg, self.shards.source)
        for w in self.planned:
            warnings.warn(w, UserWarning, stacklevel=4)

    def _resume_policy(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        cfg = self.cfg
        self.ckpt_path = self.run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE
        self._replace_checkpoint = False
        if self.ckpt_path.exists():
            if cfg.resume and not cfg.overwrite:  # the default: continue (_check_resume: same config and data)
                return load_checkpoint(self.ckpt_path, device="cpu")
            if not cfg.overwrite:
                raise TrainError(f"{self.ckpt_path} exists from an earlier run: rerun without --no_resume to continue "
                                 "it, or --overwrite (or another --out) to start again")
            self._replace_checkpoint = True  # deleted in __init__ once everything else is validated
        elif not cfg.overwrite:
            for d in self.out_dirs:  # without a checkpoint there is nothing to continue
                if (d / "weights.safetensors").exists() and (not cfg.resume or _finished_sae(d)):
                    raise TrainError(f"{d} already holds a trained SAE: pass --overwrite or choose another --out")
        return None

    def _build(self) -> None:
        from visae.sae import build_sae

        cfg, S, dev = self.cfg, self.S, self.device
        torch.manual_seed(cfg.seed)
        sae = self.sae = build_sae(self.sae_cfg, generator=torch.Generator().manual_seed(cfg.seed)).to(dev)
        self.names = [n for n, _ in sae.named_parameters()]
        params = [p for _, p in sae.named_parameters()]
        self.opt = StackedAdam(params, lr=torch.tensor(self.lrs, dtype=torch.float64),
                               betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                               latent_axes=[sae.latent_axis(n) for n in self.names])
        self.sched = _Schedules(torch.tensor(self.lrs, dtype=torch.float64, device=dev),
                                torch.tensor(self.l1_used, dtype=torch.float32, device=dev),
                                cfg.lr_warmup_steps, cfg.l1_warmup_steps)
        self.dead = _DeadTracker(S, sae.d_sae, dev)
        self.interval = _IntervalLog(S, sae.d_in, dev)
        self.step = self.epoch = self.batch_in_epoch = self.examples = 0
        self.train_seconds = 0.0
        self.n_resampled = [0] * S
        self.last_val: list[dict[str, Any]] = [{} for _ in range(S)]
        self.wandb_id: str | None = None
        self.run_id = secrets.token_hex(6)
        # file and directory arguments recorded absolute (cfg.json's extra.train, the checkpoint), as typed they did not
        # say which from another directory; a resume does not compare them (_RESUME_FREE_FIELDS)
        self.cfg_dict = absolute_paths(config_to_dict(cfg), ("shards", "out", "init_from"))
        self.amp = torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if cfg.bf16 else None
        self.aux_coeff = float(self.sae_cfg.aux_coeff) if sae.uses_aux else 0.0
        self.lr_now, self.l1_now = self.sched.lr(0), self.sched.l1(0)

    def _restore(self, tensors: dict[str, torch.Tensor], st: dict[str, Any]) -> None:
        dev = self.device
        _check_resume(st, self.cfg_dict, self.sae_cfg, self.shards, self.ckpt_path, self.lrs, self.l1_coeffs,
                      self.out_dirs)
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        self.opt.load_state_dict({k[4:]: v.to(dev) for k, v in tensors.items() if k.startswith("opt.")})
        self.dead.load({k: v.to(dev) for k, v in tensors.items() if k.startswith("dead.")}, st["resample_step"])
        self.sched.load(tensors["sched.warm_start"])
        torch.set_rng_state(tensors.get(f"rng.torch.{self.dp.rank}", tensors["rng.torch"]))
        if "rng.cuda" in tensors and dev.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.sae.load_kernel_state(st.get("kernel"))
        self.interval.load(tensors, st.get("log"))
        self.step, self.epoch, self.batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
        self.examples, self.train_seconds = st["examples"], st["train_seconds"]
        self.n_resampled, self.last_val = st["n_resampled"], st["last_val"]
        self.wandb_id, self.run_id = st.get("wandb_id"), st.get("run_id", self.run_id)
        print(f"visae train: resuming {self.ckpt_path} at epoch {self.epoch}, step {self.step}", file=sys.stderr)

    def _initialise(self) -> None:
        cfg = self.cfg
        if cfg.init_from:
            self._init_from(cfg.init_from)
        elif cfg.b_dec_init != "zeros":
            _, sample = _sample_rows(self.train_view, cfg.init_examples, cfg.seed, 0xB0EC)
            self.sae.init_b_dec_(torch.from_numpy(sample), method=cfg.b_dec_init)

    def _init_from(self, path: str) -> None:
        from visae.sae import SAEFormatError, load_sae

        sae, shards = self.sae, self.shards
        try:
            src = load_sae(path)
        except SAEFormatError as e:
            raise TrainError(f"--init_from: {e}") from None
        if src.d_in != shards.d:
            raise TrainError(f"--init_from {path}: the SAE has d_in={src.d_in} but shard set {shards.path} "
                             f"has d={shards.d} (activations of another model or layer?)")
        if src.d_sae != sae.d_sae or src.architecture != sae.architecture:
            raise TrainError(f"--init_from {path}: the SAE is {src.architecture} with d_sae={src.d_sae}, "
                             f"this run trains {sae.architecture} with d_sae={sae.d_sae} (--architecture, "
                             "--expansion_factor)")
        sae.load_state_dict({k: v[:1].expand(self.S, *v.shape[1:]).clone().to(self.device)
                             for k, v in src.state_dict().items()})

    def _open_logger(self, resumed: bool) -> None:
        from tqdm.auto import tqdm

        cfg, S = self.cfg, self.S
        self.member_train_cfg = [self.cfg_dict | {"lr": self.lrs[i], "l1_coeff": self.l1_coeffs[i],
                                                  "l1_coeff_used": self.l1_used[i], "l1_conversion": self.l1_conversion}
                                 for i in range(S)]
        sh = self.shards
        self.shards_info = {"path": str(sh.path.resolve()), "source": sh.source, "d": sh.d, "num_examples": len(sh),
                            "normalization": sh.normalization, "val_fraction": cfg.val_fraction, "split_seed": cfg.seed,
                            "fingerprint": sh.fingerprint()}  # a resume compares the content, not the path
        wandb_cfg = None
        if cfg.wandb:
            wandb_cfg = {"project": cfg.wandb_project, "name": cfg.wandb_name or self.run_dir.name,
                         "dir": str(self.run_dir), "id": self.wandb_id,
                         "config": self.cfg_dict | {"sae": self.sae_cfg.to_dict(), "lrs": self.lrs,
                                                    "l1_coeffs": self.l1_coeffs}}
        try:
            self.logger = (MetricsLogger(self.out_dirs, wandb_cfg, truncate_after_step=self.step if resumed else None)
                           if self.dp.is_writer else NullLogger())
        except RuntimeError as e:
            raise TrainError(str(e)) from None
        self.wandb_id = self.logger.wandb_id if self.dp.is_writer else self.wandb_id
        self.bar = tqdm(total=self.limit, initial=min(self.step, self.limit), unit="step",
                        disable=not cfg.progress or not self.dp.is_writer,
                        dynamic_ncols=True, file=sys.stderr,
                        desc=f"train {self.run_dir.name}" + (f" (S={S})" if S > 1 else ""))
        self.t_interval, self.ex_interval = time.perf_counter(), 0

    # ------------------------------------------------------------------ per step
    @contextmanager
    def _epoch_batches(self) -> Iterator[Iterator[torch.Tensor]]:
        """The rest of the current epoch's batches on the device; the hot loop's clock runs while it is open."""
        cfg = self.cfg
        batches = self.train_view.epoch_batches(cfg.batch_size, epoch=self.epoch, seed=cfg.seed,
                                                start_batch=self.batch_in_epoch, prefetch=cfg.prefetch,
                                                buffer_size=max(cfg.shuffle_buffer, cfg.batch_size), drop_last=False,
                                                world_size=self.dp.world, rank=self.dp.rank)
        feeder = _Feeder(batches, self.device)
        self._t0 = time.perf_counter()
        try:
            yield iter(feeder)
        finally:
            feeder.close()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.train_seconds += time.perf_counter() - self._t0

    def _step(self, x: torch.Tensor) -> None:
        """One optimiser step of every member on the shard batch ``x`` [B, d_in], and its bookkeeping."""
        sae, cfg = self.sae, self.cfg
        self.lr_now, self.l1_now = self.sched.lr(self.step), self.sched.l1(self.step)
        dead_mask = self.dead.dead_mask(cfg.dead_window_steps, self.step) if sae.uses_aux else None
        out = None
        if x.shape[0]:  # data-parallel: a rank's slice of a short last batch may be empty
            with self.amp or nullcontext():
                out = sae.training_loss(x, self.l1_now, dead_mask=dead_mask)
            out.loss.backward()
        m = self._global_rows(x.shape[0])
        fired = self.dp.reduce_step_(sae, out, x.shape[0], m)  # global gradient and fired mask (no-op: 1 process)
        sae.remove_parallel_grad_()
        self.opt.step(self.lr_now)
        self.opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        self.dead.update(fired, self.step + 1)
        if out is not None:
            self.interval.add(out, x, sae.step_sparsity(out), self.l1_now)
        self.interval.steps += out is None  # (an empty rank counts the step; its sums are unchanged)
        self.step += 1
        self.batch_in_epoch += 1
        self.examples += m
        self.ex_interval += m
        self.bar.update(1)

    def _global_rows(self, local: int) -> int:
        """Rows of the current global batch (``local`` with one process): the batch size, or the epoch's rest."""
        if not self.dp.active:
            return local
        return min(self.cfg.batch_size, len(self.train_view) - self.batch_in_epoch * self.cfg.batch_size)

    def _log_interval(self) -> None:
        """One ``train`` record per member: interval means, dead fractions, the last step's lr and lambda."""
        self._reduce_interval()
        m, ev = self._interval_means()
        loss = m["mse"] + self.aux_coeff * m["aux"] + m["sparsity"]
        if ev[0] is None:
            _warn_undefined_ev(f"training interval ending at step {self.step}", self.interval.n)
        now = time.perf_counter()
        rate = self.ex_interval / max(now - self.t_interval, 1e-9)
        # An interval cut short by --max_steps: a resume drops this record and continues the
        # interval from the checkpointed sums (as if the run had never stopped).
        partial = self.step % self.cfg.log_every != 0 and self.step < self.total_steps
        self.logger.log([self._train_record(s, m, ev[s], float(loss[s]), rate, partial) for s in range(self.S)])
        if not np.isfinite(loss).all():
            raise TrainError(f"training diverged at step {self.step} (loss {loss.tolist()}): lower --lr, or check the "
                             f"data with --validate_shards full (NaN/Inf rows in {self.shards.path}?)")
        self.bar.set_postfix(act_s=f"{rate:,.0f}", mse=f"{m['mse'].mean():.3g}", l0=f"{m['l0'].mean():.3g}",
                             refresh=False)
        if not partial:
            self.interval.reset()
        self._localise_interval()
        self.t_interval, self.ex_interval = time.perf_counter(), 0

    def _interval_means(self) -> tuple[dict[str, np.ndarray], list[float | None]]:
        means, ev = self.interval.means(self.sae.cfg.scale_factor)  # the one host sync per interval
        m = dict(zip(_IntervalLog.KEYS, means))
        window = self.cfg.dead_window_steps
        rows = torch.stack([self.dead.dead_mask(window, self.step).float().mean(-1),
                            self.dead.not_fired_since_resample().float().mean(-1),
                            self.lr_now.float(), self.l1_now.float()]).cpu().numpy()
        return m | dict(zip(_RATE_KEYS, rows)), ev

    def _train_record(self, s: int, m: dict[str, np.ndarray], ev: float | None, loss: float, rate: float,
                      partial: bool) -> dict[str, Any]:
        r = {"type": "train", "step": self.step, "epoch": self.epoch, "examples": self.examples, "loss": loss,
             "mse": float(m["mse"][s]), "l1": float(m["l1"][s]), "l0": float(m["l0"][s]), "explained_variance": ev,
             "aux": float(m["aux"][s])}
        name = self.sae.sparsity_metric
        if name is not None and name not in r:  # an architecture's own sparsity metric
            r[name] = float(m["metric"][s])
        r |= {k: float(m[k][s]) for k in _RATE_KEYS}
        r["act_per_s"] = rate
        if partial:
            r["partial"] = True
        return r

    def _reduce_interval(self) -> None:
        """Data-parallel: the interval's sums become global on every rank; then only rank 0 keeps them (the others
        hold what they add from now on), so the next reduction counts every example once."""
        if not self.dp.active:
            return
        iv = self.interval
        n = torch.tensor([float(iv.n)], dtype=torch.float64, device=iv.sums.device)
        self.dp.sum_([iv.sums, iv.sse, iv.sx, iv.sxx, n])
        iv.n = int(n.item())

    def _localise_interval(self) -> None:
        """After a reduction was used (logged or checkpointed): ranks other than 0 drop the global sums."""
        if self.dp.active and not self.dp.is_writer:
            steps = self.interval.steps
            self.interval.reset()
            self.interval.steps = steps

    # ------------------------------------------------------------------ per epoch
    def _end_of_epoch(self) -> None:
        """Validate, resample (every ``resample_every`` epochs, not in the last period), checkpoint."""
        cfg = self.cfg
        self.last_val = evaluate(self.sae, self.val_view, cfg.batch_size, self.sched.l1(self.step), self.device,
                                 self.amp, cfg.dense_threshold, dp=self.dp)
        self.logger.log([{"type": "val", "step": self.step, "epoch": self.epoch} | v for v in self.last_val])
        done = self.epoch + 1
        R = cfg.resample_every
        if R and done % R == 0 and done + R <= cfg.num_epochs:
            self._resample(tag=done)
        self.epoch, self.batch_in_epoch = done, 0
        self.t_interval, self.ex_interval = time.perf_counter(), 0
        self._checkpoint()

    def _resample(self, tag: int) -> None:
        to_resample = self.dead.not_fired_since_resample()
        n = resample_dead_latents(self.sae, self.opt, to_resample, self.train_view, self.cfg, tag=tag,
                                  batch_size=self.cfg.batch_size,
                                  member_keys=[member_key(a, b) for a, b in zip(self.lrs, self.l1_coeffs)], dp=self.dp)
        self.dead.resampled(to_resample, self.step)  # the new directions get a fresh dead window
        self.sched.rewarm(n.to(self.device) > 0, self.step)
        self.n_resampled = [a + int(b) for a, b in zip(self.n_resampled, n.tolist())]
        self.logger.log([{"type": "resample", "step": self.step, "epoch": self.epoch, "n_resampled": int(c)}
                         for c in n.tolist()])

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_if_due(self) -> None:
        every = self.cfg.checkpoint_every_steps
        if every and self.step % every == 0:
            self.train_seconds += time.perf_counter() - self._t0  # checkpoint time is not hot-loop time
            self._checkpoint()
            self._t0 = time.perf_counter()

    def _checkpoint(self, finished: bool = False) -> None:
        """Write ``<out>/checkpoint/checkpoint.safetensors`` atomically (format: docs/training.md).

        Data-parallel: every rank takes part (the interval sums and RNG states are collected), rank 0 writes.
        """
        self._reduce_interval()
        rngs = self.dp.gather_rng()
        if not self.dp.is_writer:
            self._localise_interval()
            return
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        tensors |= {f"opt.{k}": v for k, v in self.opt.state_dict().items()}
        tensors |= self.dead.state()
        tensors["sched.warm_start"] = self.sched.warm_start
        tensors |= _rng_state()
        if self.dp.active:
            tensors |= {f"rng.torch.{r}": t for r, t in enumerate(rngs)}
        log_tensors, log_state = self.interval.state()
        tensors |= log_tensors
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "steps_per_epoch": self.steps_per_epoch, "resample_step": self.dead.resample_step,
                 "examples": self.examples, "train_seconds": self.train_seconds, "finished": finished,
                 "n_resampled": self.n_resampled, "last_val": self.last_val, "config": self.cfg_dict,
                 "sae_config": self.sae_cfg.to_dict(), "lrs": self.lrs, "l1_coeffs": self.l1_coeffs,
                 "out_dirs": [str(d) for d in self.out_dirs], "shards": self.shards_info, "param_names": self.names,
                 "wandb_id": self.wandb_id, "run_id": self.run_id, "kernel": self.sae.kernel_state(),
                 "log": log_state, "world_size": self.dp.world, "rank": self.dp.rank}
        save_checkpoint(self.ckpt_path, tensors, state)

    # ------------------------------------------------------------------ the end
    def _save(self) -> TrainResult:
        """Final checkpoint, every member's SAE directory, the summary records, curves and train_summary.json."""
        cfg = self.cfg
        finished = self.epoch >= cfg.num_epochs
        incomplete, flags = self._end_flags(finished)
        rate = self.examples / self.train_seconds if self.train_seconds > 0 else 0.0
        result = TrainResult(out_dirs=self.out_dirs, steps=self.step, examples=self.examples,
                             train_seconds=self.train_seconds, act_per_s=rate, finished=finished, val=self.last_val,
                             n_resampled=self.n_resampled, warnings=flags, backbone_random_init=self.random_init)
        if finished:
            self._checkpoint(finished=True)
        if not self.dp.is_writer:  # data-parallel: rank 0 writes the SAE directories and summaries
            self.dp.barrier()
            return result
        flagged = {"warmup_incomplete": incomplete, "backbone_random_init": self.random_init, "warnings": flags}
        for i, d in enumerate(self.out_dirs):
            member = self.sae.member(i) if self.S > 1 else self.sae
            member.save(d, extra={"train": self.member_train_cfg[i], "shards": self.shards_info, "val": self.last_val[i],
                                  "steps": self.step, "epochs_done": self.epoch, "finished": finished} | flagged
                        | self.extra[i])
        self.logger.log([{"type": "summary", "step": self.step, "epoch": self.epoch, "finished": finished,
                          "act_per_s": rate, "train_seconds": self.train_seconds, "examples": self.examples,
                          "n_resampled": self.n_resampled[i]} | flagged
                         | {f"val_{k}": v for k, v in self.last_val[i].items()} for i in range(self.S)])
        self.logger.close()
        if cfg.plot:
            for d in self.out_dirs:
                plot_curves(d / METRICS_FILE, d / CURVES_FILE)
        atomic_write_text(self.run_dir / SUMMARY_FILE, json.dumps(result.to_dict(), indent=1))
        if finished and not cfg.keep_checkpoint:
            shutil.rmtree(self.run_dir / CHECKPOINT_DIR, ignore_errors=True)
        self.dp.barrier()  # the other ranks return once the files exist
        return result

    def _end_flags(self, finished: bool) -> tuple[list[str], list[str]]:
        """(warm-ups not completed, the run's warnings for its summaries); warns once when the run ended."""
        incomplete = warmups_incomplete(self.step, self.sched, self.cfg)
        notes = ([f"the run ended at step {self.step}, before its {' and '.join(incomplete)} warm-up completed: it "
                  "cannot have learnt with the configured schedule (more --num_epochs, a smaller --batch_size, or "
                  "shorter --lr_warmup_steps / --l1_warmup_steps)"] if incomplete else [])
        # Warned at the start already when the plan was too short; a run stopped by --max_steps is paused, not ended.
        if notes and finished and all(w == RANDOM_WEIGHTS_WARNING for w in self.planned):
            warnings.warn(notes[0], UserWarning, stacklevel=4)
        return incomplete, [w for w in self.planned if w == RANDOM_WEIGHTS_WARNING] + notes


def train_stack(
    data: Any,
    sae_cfg: Any,
    lrs: Sequence[float],
    l1_coeffs: Sequence[float],
    cfg: TrainConfig,
    out_dirs: Sequence[str | Path] | None = None,
    *,
    extra: Sequence[dict[str, Any]] | None = None,
    dp: DataParallel | None = None,
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
        dp: the ranks of a data-parallel run (:class:`visae.train.dist.DataParallel`; default one process):
            ``cfg.batch_size`` is then the global batch, each rank takes ``batch_size / world_size`` rows.

    Every member's directory gets ``cfg.json`` + ``weights.safetensors`` (``extra`` holds
    ``train`` = the config with the member's lr / l1_coeff, ``shards`` = where the data came
    from, ``val`` = final validation metrics), ``metrics.jsonl`` and ``curves.png``.
    Raises TrainError for arguments, data or checkpoints that do not fit.
    """
    return Trainer(data, sae_cfg, lrs, l1_coeffs, cfg, out_dirs, extra=extra, dp=dp).fit()



def _finished_sae(d: Path) -> bool:
    """The SAE directory's cfg.json says its run finished (extra.finished)."""
    try:
        return bool((json.loads((d / "cfg.json").read_text()).get("extra") or {}).get("finished"))
    except (OSError, ValueError, AttributeError):
        return False
