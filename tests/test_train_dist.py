"""Data-parallel training (issue 16): 2 gloo ranks on CPU equal one process with the same global batch.

The ranks are started with ``torch.multiprocessing`` (the environment torchrun would set:
MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE), faster than torchrun. The SAEs are trained in
float64 (``build_sae`` patched to return a float64 module, reference kernels), so two runs that
differ only in the order of the gradient sums agree to a bound derived from float64 rounding:

    per step and element, the gradient differs by at most  B * d * eps64 * G   (B * d summed terms of
    size <= G = 1: unit-norm inputs, unit-norm decoder rows, |loss terms| <= 1 here);
    Adam's update u = lr * m / (sqrt(v) + eps_adam) moves by at most lr / eps_adam times that,
    so after T steps the weights differ by at most  T * lr * B * d * eps64 / eps_adam.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from visae.shards import ShardSet, ShardWriter
from visae.train import TrainConfig, Trainer, resample_dead_latents, sae_config_for

D, EXP, BATCH = 8, 8, 32
# 252 examples: 227 training rows, 7 batches of 32 and a last one of 3 rows (1 + 2 on 2 ranks: unequal weights);
# 250 examples: 225 training rows, a last batch of 1 row (rank 0 has none: the empty-rank step)
N_UNEVEN, N_EMPTY = 252, 250


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_shards(path: Path, n: int) -> Path:
    x = np.random.default_rng(3).standard_normal((n, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with ShardWriter(path, D, dtype="float32", shard_size=40) as w:
        w.add(x, ids=[str(i) for i in range(n)])
    return path


def _cfg(shards: Path, out: Path, **kw) -> TrainConfig:
    base = dict(shards=str(shards), out=str(out), architecture="relu", expansion_factor=EXP, batch_size=BATCH,
                num_epochs=3, lr=1e-3, l1_coeff=1e-3, lr_warmup_steps=3, l1_warmup_steps=4, impl="reference",
                resample_every=1, resample_examples=100, init_examples=64, shuffle_buffer=96, prefetch=0,
                log_every=5, progress=False, plot=False, device="cpu", validate_shards="none", dist_timeout=15.0)
    return TrainConfig(**(base | kw))


def _float64_sae(monkeypatch_target=None):
    """Patch ``visae.sae.build_sae`` (the trainer's factory) to return float64 modules."""
    import visae.sae as sae_pkg

    orig = sae_pkg.build_sae

    def build(*a, **k):
        return orig(*a, **k).double()

    sae_pkg.build_sae = build
    return orig


def _run(cfg: TrainConfig, dp=None) -> dict[str, torch.Tensor]:
    shards = ShardSet(cfg.shards)
    t = Trainer(shards, sae_config_for(cfg, shards), [cfg.lr], [cfg.l1_coeff], cfg, [Path(cfg.out)], dp=dp)
    t.fit()
    return {k: v.detach().clone() for k, v in t.sae.state_dict().items()} | {
        "dead.last_fired": t.dead.last_fired.clone(), "n_resampled": torch.tensor(t.n_resampled)}


def _resample_case(shards: Path, dp=None) -> dict[str, torch.Tensor]:
    """A resampling of a fixed dead mask on a fixed SAE over the global training split."""
    from visae.optim import StackedAdam
    from visae.sae import SAEConfig, build_sae

    ss = ShardSet(shards)
    view, _ = ss.split(0.1, seed=0)
    sae = build_sae(SAEConfig(d_in=D, d_sae=D * EXP), generator=torch.Generator().manual_seed(5))
    names = [n for n, _ in sae.named_parameters()]
    opt = StackedAdam([p for _, p in sae.named_parameters()], lr=1e-3, latent_axes=[sae.latent_axis(n) for n in names])
    dead = torch.zeros(1, D * EXP, dtype=torch.bool)
    dead[0, ::3] = True
    cfg = _cfg(shards, shards.parent / "unused", resample_examples=150)
    n = resample_dead_latents(sae, opt, dead, view, cfg, tag=7, batch_size=BATCH, dp=dp)
    return {"W_dec": sae.W_dec.detach().clone(), "W_enc": sae.W_enc.detach().clone(), "n": n}


def _worker(rank: int, world: int, port: int, job: str, shards: str, out: str, kill_at: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from visae.train.dist import DataParallel

    _float64_sae()
    cfg = _cfg(Path(shards), Path(out), checkpoint_every_steps=2 if job == "kill" else 0)
    if job == "train_fn":  # visae.train.train under torchrun: joins the group, trains, leaves the group
        import torch.distributed as dist

        from visae.train import train

        train(cfg)
        (Path(out) / f"left{rank}.txt").write_text(str(not dist.is_initialized()))
        return
    dp = DataParallel.from_env(cfg.dist_timeout, "cpu")
    if job == "kill" and rank == 1:
        orig = Trainer._step

        def step(self, x):
            if self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # a rank dies mid-run
            orig(self, x)

        Trainer._step = step
    try:
        res = _run(cfg, dp)
        if job == "train":
            res |= {f"resample.{k}": v for k, v in _resample_case(Path(shards), dp).items()}
            # BatchTopK: its running threshold (a buffer updated from each rank's rows) must stay replicated
            btk = _run(_cfg(Path(shards), Path(out) / "btk", architecture="batchtopk", k=4, num_epochs=1), dp)
            res |= {f"batchtopk.{k}": v for k, v in btk.items()}
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dp.close()  # leaving the group after a peer died must not hang either (the kill test times rank 0)


def _bound(steps: int, cfg: TrainConfig) -> float:
    return steps * cfg.lr * BATCH * D * EXP * float(np.finfo(np.float64).eps) / cfg.adam_eps


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a loaded machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return _make_shards(tmp_path_factory.mktemp("ddp") / "s", N_UNEVEN)


@pytest.fixture(scope="module")
def shards_empty_rank(tmp_path_factory):
    return _make_shards(tmp_path_factory.mktemp("ddp") / "s", N_EMPTY)


def _compare(a: dict, b: dict, tol: float, what: str) -> None:
    for k in a:
        if k.startswith(("resample.", "batchtopk.")):
            continue
        diff = float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
        assert diff <= tol, f"{what}: {k} differs by {diff:.3g} > bound {tol:.3g}"


def test_two_ranks_equal_one_process_and_resample_agrees(shards, tmp_path):
    out2 = tmp_path / "two"
    out2.mkdir()
    mp.start_processes(_worker, args=(2, _free_port(), "train", str(shards), str(out2), -1), nprocs=2,
                       start_method="spawn")
    r0, r1 = (torch.load(out2 / f"rank{r}.pt") for r in (0, 1))
    # replicated state: bit-identical on the two ranks (BatchTopK's threshold buffer too)
    assert "batchtopk.threshold" in r0 and float(r0["batchtopk.threshold"].min()) > 0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
    orig = _float64_sae()
    try:
        cfg = _cfg(shards, tmp_path / "one")
        one = _run(cfg)
    finally:
        import visae.sae as sae_pkg

        sae_pkg.build_sae = orig
    steps = 3 * 8
    assert r0["W_dec"].dtype == torch.float64
    assert int(r0["n_resampled"].sum()) == int(one["n_resampled"].sum())
    assert torch.equal(r0["dead.last_fired"], one["dead.last_fired"])  # fired masks: OR over ranks = one batch
    _compare(one, r0, _bound(steps, cfg), "2 ranks vs 1 process")
    # the SAE directory and metrics are rank 0's, written once
    assert (out2 / "weights.safetensors").is_file() and (out2 / "metrics.jsonl").is_file()
    # resampling: identical on both ranks (checked above, bit for bit) and equal to one process's draw
    single = _resample_case(shards)
    assert int(single["n"].sum()) > 0
    for k in ("W_dec", "W_enc", "n"):
        assert torch.equal(single[k], r0[f"resample.{k}"]), f"resampled {k} differs from one process's"


def test_killed_rank_ends_run_promptly_and_resume_continues(shards_empty_rank, tmp_path):
    shards = shards_empty_rank
    out = tmp_path / "k"
    out.mkdir()
    ctx = mp.start_processes(_worker, args=(2, _free_port(), "kill", str(shards), str(out), 11), nprocs=2,
                             start_method="spawn", join=False)
    p0, p1 = ctx.processes
    p1.join(120)
    assert p1.exitcode == -signal.SIGKILL
    t_dead = time.monotonic()
    p0.join(60)
    waited = time.monotonic() - t_dead
    if p0.is_alive():
        p0.kill()
        pytest.fail("rank 0 still runs 60 s after rank 1 was killed")
    assert p0.exitcode != 0
    cfg = _cfg(shards, tmp_path / "one")
    print(f"rank 0 stopped {waited:.1f} s after rank 1 was killed")
    assert waited < cfg.dist_timeout + 10, f"rank 0 took {waited:.1f} s to stop"
    ckpt = out / "checkpoint" / "checkpoint.safetensors"
    assert ckpt.is_file()
    from visae.train import load_checkpoint

    _, st = load_checkpoint(ckpt)
    assert st["world_size"] == 2 and st["step"] == 10  # the last checkpoint before step 11
    orig = _float64_sae()
    try:
        one = _run(cfg)  # uninterrupted, one process
        resumed = _run(_cfg(shards, out, checkpoint_every_steps=2, resume=True))  # resumed with 1 process
    finally:
        import visae.sae as sae_pkg

        sae_pkg.build_sae = orig
    _compare(one, resumed, _bound(3 * 8, cfg), "killed 2-rank run resumed on 1 process vs uninterrupted")


@pytest.mark.parametrize("buffer_size", [96, 10 ** 6])  # shuffle groups of a few shards / one global permutation
def test_rank_slices_of_every_epoch_make_the_one_process_batches(shards, buffer_size):
    """Each rank's slices, concatenated in rank order, are the one-process batches (rows and indices), resumed too."""
    view, _ = ShardSet(shards).split(0.1, seed=0)
    for start in (0, 3):
        kw = dict(epoch=2, seed=1, buffer_size=buffer_size, drop_last=False, start_batch=start, prefetch=0)
        one = list(view.epoch_batches(BATCH, **kw))
        assert len(one) == 8 - start and one[-1].acts.shape[0] == 3  # the short last batch
        for world in (2, 3):
            parts = [list(view.epoch_batches(BATCH, world_size=world, rank=r, **kw)) for r in range(world)]
            assert [len(p) for p in parts] == [len(one)] * world
            for j, b in enumerate(one):
                sizes = [p[j].acts.shape[0] for p in parts]
                assert max(sizes) - min(sizes) <= 1  # as even as the rows allow (a rank may get none)
                assert np.array_equal(np.concatenate([p[j].index for p in parts]), b.index)
                assert np.array_equal(np.concatenate([p[j].acts for p in parts]), b.acts)


def test_train_under_torchrun_leaves_the_process_group(shards, tmp_path):
    """``visae.train.train`` destroys the group it joined (a gloo group alive at exit aborts the teardown now and then)."""
    mp.start_processes(_worker, args=(2, _free_port(), "train_fn", str(shards), str(tmp_path), -1), nprocs=2,
                       start_method="spawn")
    assert [(tmp_path / f"left{r}.txt").read_text() for r in (0, 1)] == ["True", "True"]
    assert (tmp_path / "weights.safetensors").is_file()
