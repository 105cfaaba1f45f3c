"""The multi-epoch trainer on planted sparse dictionaries: quality, resampling, resume, errors, CLI."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tolerances import assert_bitwise_equal, assert_close_derived
from visae import train as T
from visae.metrics import read_metrics
from visae.sae import ARCHITECTURES, SAEConfig, build_sae, load_sae
from visae.shards import ShardSet, ShardWriter
from visae.synthetic import atom_recovery, make_planted_dictionary, write_planted_shards

D_IN, ATOMS, N = 32, 64, 8192


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted") / "shards"
    dictionary = make_planted_dictionary(d=D_IN, n_atoms=ATOMS, mean_active=3, seed=0)
    write_planted_shards(path, n=N, dictionary=dictionary, shard_size=2048)
    return path, dictionary


def _cfg(shards, out, **kw):
    base = dict(shards=str(shards), out=str(out), num_epochs=4, batch_size=256, expansion_factor=4, lr=3e-3,
                l1_coeff=1e-2, lr_warmup_steps=10, l1_warmup_steps=100, resample_every=2, log_every=10,
                progress=False, plot=False, resample_examples=2048, init_examples=2048)
    base.update(kw)
    return T.TrainConfig(**base)


def _dead_start_sae(path, n_dead=16, d_sae=D_IN * 4):
    """An SAE whose first n_dead latents can never fire (zero encoder column and bias, zero b_dec)."""
    sae = build_sae(SAEConfig(architecture="relu", d_in=D_IN, d_sae=d_sae), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        sae.W_enc[:, :, :n_dead] = 0
        sae.b_enc.zero_()
    sae.save(path)
    return path


def _weights(d):
    return {k: v.clone() for k, v in load_sae(d).state_dict().items()}


# ----------------------------------------------------------------------------- quality


def test_relu_on_planted_dictionary_reaches_stated_quality(planted, tmp_path):
    shards, dictionary = planted
    cfg = _cfg(shards, tmp_path / "run", num_epochs=40, resample_every=5, plot=True)
    out = T.train(cfg)
    assert out == tmp_path / "run"
    sae = load_sae(out)
    recs = read_metrics(out)
    val = [r for r in recs if r["type"] == "val"]
    summary = [r for r in recs if r["type"] == "summary"][0]
    assert len(val) == 40 and summary["finished"]
    # Stated targets on this data (d=32, 64 atoms, ~3 active per example, 4x dictionary):
    assert val[-1]["explained_variance"] >= 0.80, val[-1]
    assert 1.0 <= val[-1]["l0"] <= 10.0, val[-1]
    assert atom_recovery(sae.W_dec[0].detach().numpy(), dictionary.atoms, threshold=0.9) >= 0.9
    assert val[-1]["l0"] < val[0]["l0"] / 2  # sparser as lambda warms up and training goes on
    # Metrics: every train record carries the full set; lr and lambda follow their warm-ups.
    train = [r for r in recs if r["type"] == "train"]
    keys = {"loss", "mse", "l1", "l0", "explained_variance", "dead_fraction", "dead_since_resample_fraction", "lr",
            "l1_coeff", "act_per_s", "step", "epoch"}
    assert keys <= set(train[0]) and {"dense_fraction", "dead_fraction"} <= set(val[0])
    _sched_close(train[0]["lr"], 3e-3 * (0.1 + 0.9 * 9 / 10), "lr during warm-up")
    _sched_close(train[-1]["lr"], 3e-3, "lr after warm-up")
    _sched_close(train[0]["l1_coeff"], 1e-2 * 9 / 100, "lambda during warm-up")
    _sched_close(train[-1]["l1_coeff"], 1e-2, "lambda after warm-up")
    assert summary["act_per_s"] > 0
    assert (out / "curves.png").stat().st_size > 1000
    # The SAE dir records its training config and data source.
    doc = json.loads((out / "cfg.json").read_text())
    assert doc["extra"]["train"]["lr"] == 3e-3 and doc["extra"]["train"]["num_epochs"] == 40
    assert doc["extra"]["shards"]["source"]["model"] == "planted-dictionary" and doc["d_in"] == D_IN
    assert json.loads((out / T.SUMMARY_FILE).read_text())["finished"]


def test_stack_members_equal_separate_runs(planted, tmp_path):
    """train_stack: one batch stream, per-member lr and lambda; member i == a single run with (lr_i, l1_i)."""
    shards, _ = planted
    init = _dead_start_sae(tmp_path / "init", n_dead=0)
    lrs, l1s = [1e-3, 4e-3], [3e-3, 2e-2]
    cfg = _cfg(shards, tmp_path / "stack", init_from=str(init), max_steps=25, resample_every=0)
    ss = ShardSet(shards)
    res = T.train_stack(ss, T.sae_config_for(cfg, ss), lrs, l1s, cfg, [tmp_path / "m0", tmp_path / "m1"])
    assert res.steps == 25 and not res.finished
    singles = []
    for i in range(2):
        c = _cfg(shards, tmp_path / f"single{i}", init_from=str(init), max_steps=25, resample_every=0, lr=lrs[i],
                 l1_coeff=l1s[i])
        singles.append(_weights(T.train(c)))
    for i in range(2):
        got = _weights(tmp_path / f"m{i}")
        for k in got:  # 25 Adam steps: bit-identical by construction (per-member GEMMs/GEMVs, kernels._mv_s)
            assert_bitwise_equal(got[k], singles[i][k], msg=f"member {i} {k}")
        m = json.loads((tmp_path / f"m{i}" / "cfg.json").read_text())["extra"]["train"]
        assert (m["lr"], m["l1_coeff"]) == (lrs[i], l1s[i])
    assert not torch.allclose(_weights(tmp_path / "m0")["W_enc"], _weights(tmp_path / "m1")["W_enc"])  # asserts a change
    assert len(read_metrics(tmp_path / "m1")) > 0


# ----------------------------------------------------------------------------- resampling


def test_resampling_revives_dead_latents_and_resets_their_adam_state(planted, tmp_path):
    shards, _ = planted
    init = _dead_start_sae(tmp_path / "init", n_dead=16)
    cfg = _cfg(shards, tmp_path / "run", init_from=str(init), l1_coeff=1e-3, log_every=1)
    out = T.train(cfg)
    recs = read_metrics(out)
    res = [r for r in recs if r["type"] == "resample"]
    assert len(res) == 1 and res[0]["epoch"] == 1  # after epoch 2 of 4; none in the last period
    assert res[0]["n_resampled"] >= 16
    train_recs = [r for r in recs if r["type"] == "train"]
    before = [r for r in train_recs if r["step"] == res[0]["step"]][0]
    assert before["dead_since_resample_fraction"] >= 16 / 128
    # Re-warm-up: the lr right after resampling restarts from lr/10.
    after = [r for r in train_recs if r["step"] == res[0]["step"] + 1][0]
    _sched_close(after["lr"], 3e-3 * 0.1, "lr after resampling")
    _sched_close(before["lr"], 3e-3, "lr before resampling")
    # The forced-dead latents fire again.
    sae = load_sae(out)
    x = torch.from_numpy(ShardSet(shards).read(np.arange(N)))
    fires = (sae.encode(x) > 0).sum(0)
    assert bool((fires[:16] > 0).all()), fires[:16]
    # Their Adam state restarted at the resampling step (per-latent step counts), the others did not.
    tensors, state = T.load_checkpoint(out / T.CHECKPOINT_DIR)
    names = state["param_names"]
    steps_enc = tensors[f"opt.step.{names.index('W_enc')}"][0, 0]  # [d_sae]
    total, at = state["step"], res[0]["step"]
    assert torch.all(steps_enc[:16] == total - at)
    never = [j for j in range(16, 128) if steps_enc[j] == total]
    assert len(never) > 50


def test_resample_draws_inputs_with_error_and_sets_recipe_norms(tmp_path):
    """Only badly reconstructed inputs can be drawn; encoder column = 0.2 x mean alive norm; b_enc = 0; Adam reset."""
    d, d_sae = 4, 8
    rows = [np.eye(d)[0]] * 40 + [np.eye(d)[1]] * 40 + [np.eye(d)[2]] * 3 + [-np.eye(d)[3]] * 3
    with ShardWriter(tmp_path / "s", d, dtype="float32", shard_size=32) as w:
        w.add(np.asarray(rows, np.float32), ids=[str(i) for i in range(len(rows))])
    view = ShardSet(tmp_path / "s").all()
    sae = build_sae(SAEConfig(d_in=d, d_sae=d_sae, k=4))
    params = [p for _, p in sae.named_parameters()]
    names = [n for n, _ in sae.named_parameters()]
    opt = T.StackedAdam(params, lr=1e-3, latent_axes=[T._latent_axis(n, p, d_sae) for n, p in zip(names, params)])
    for p in params:  # give every latent some Adam state
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        for j in range(2):  # latents 0, 1 reconstruct e0, e1 exactly
            sae.W_enc[0, j, j] = 1.0
            sae.W_dec[0, j, j] = 1.0
        sae.W_enc[0, :, 7] = torch.tensor([0.5, 0.0, 0.0, 0.0])  # an alive column that its bias keeps off
        sae.b_enc[0, 7] = -10.0
        sae.W_dec[0, 7, 0] = 1.0
    dead = torch.zeros(1, d_sae, dtype=torch.bool)
    dead[0, 2:7] = True
    cfg = T.TrainConfig(resample_examples=10_000, seed=3)
    alive_norm = sae.W_enc[0][:, [0, 1, 7]].norm(dim=0).mean().item()
    n = T.resample_dead_latents(sae, opt, dead, view, cfg, tag=1, batch_size=16)
    assert n.tolist() == [5]
    W_dec = sae.W_dec[0, 2:7].detach()
    # Each new direction is one of the badly reconstructed inputs (e2 or -e3), unit norm.
    # (unit-normalising a unit input: its d-term norm and a division, d + 3 roundings of size 1 at most)
    e2, e3 = torch.tensor([0.0, 0, 1, 0]), torch.tensor([0.0, 0, 0, -1])
    for row in W_dec:
        target = e2 if (row - e2).abs().max() < (row - e3).abs().max() else e3
        assert_close_derived(row, target, n_terms=row.numel() + 3, scale=1.0, dtype=torch.float32, computations=1,
                             msg="resampled decoder direction")
    enc = sae.W_enc[0, :, 2:7].detach()
    # encoder rows = decoder rows x 0.2 x the mean alive encoder norm (d-term norms, a mean of 3, two products),
    # the norm computed here and in the resampler: two computations
    want = W_dec * 0.2 * alive_norm
    assert_close_derived(enc.T, want, n_terms=W_dec.shape[1] + 3 + 3 + 2, scale=want.abs(), dtype=torch.float32,
                         msg="resampled encoder rows")
    assert torch.all(sae.b_enc[0, 2:7] == 0) and sae.b_enc[0, 7] == -10.0
    assert torch.all(opt.exp_avg[names.index("W_enc")][0, :, 2:7] == 0)
    assert torch.all(opt.exp_avg[names.index("W_enc")][0, :, 0] != 0)


def _sched_close(actual, expected, what, dtype=torch.float32):
    """A schedule value (base x (a + b step / warm-up)): at most 4 roundings of its own size, float32 at worst
    (the coefficients and the optimiser's lr are float32 or float64), vs the exact value."""
    assert_close_derived(actual, expected, n_terms=4, scale=abs(torch.as_tensor(expected, dtype=torch.float64)),
                         dtype=dtype, computations=1, msg=what)


def test_schedules_warmup_and_rewarm():
    s = T._Schedules(torch.tensor([1e-3, 2e-3], dtype=torch.float64), torch.tensor([1.0, 2.0]), lr_warmup=10, l1_warmup=4)
    _sched_close(s.lr(0), torch.tensor([1e-4, 2e-4], dtype=torch.float64), "lr(0)", torch.float64)
    _sched_close(s.lr(5), torch.tensor([5.5e-4, 11e-4], dtype=torch.float64), "lr(5)", torch.float64)
    _sched_close(s.lr(10), torch.tensor([1e-3, 2e-3], dtype=torch.float64), "lr(10)", torch.float64)
    _sched_close(s.l1(1), torch.tensor([0.25, 0.5]), "l1(1)", torch.float32)
    _sched_close(s.l1(100), torch.tensor([1.0, 2.0]), "l1(100)", torch.float32)
    s.rewarm(torch.tensor([False, True]), 50)
    _sched_close(s.lr(50), torch.tensor([1e-3, 2e-4], dtype=torch.float64), "lr(50)", torch.float64)
    _sched_close(s.lr(60), torch.tensor([1e-3, 2e-3], dtype=torch.float64), "lr(60)", torch.float64)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("how", ["max_steps", "exception"])
def test_resumed_run_equals_uninterrupted(planted, tmp_path, monkeypatch, how):
    shards, _ = planted
    init = _dead_start_sae(tmp_path / "init", n_dead=16)  # so that resampling happens (and must replay)
    kw = dict(init_from=str(init), l1_coeff=3e-3)
    ref = T.train(_cfg(shards, tmp_path / "ref", **kw))
    steps_per_epoch = -(-int(round(N * 0.9)) // 256)
    cut = steps_per_epoch * 2 + 7  # inside epoch 3, after the resampling at the end of epoch 2
    out = tmp_path / "resumed"
    if how == "max_steps":
        r = T.train_stack(ShardSet(shards), T.sae_config_for(_cfg(shards, out), ShardSet(shards)), [3e-3], [3e-3],
                          _cfg(shards, out, max_steps=cut, **kw))
        assert r.steps == cut and not r.finished
        _, st = T.load_checkpoint(out / T.CHECKPOINT_DIR)
        assert (st["step"], st["epoch"], st["batch_in_epoch"]) == (cut, 2, 7)
    else:
        calls = {"n": 0}
        orig = T.StackedAdam.step

        def flaky(self, lr=None):
            calls["n"] += 1
            if calls["n"] == cut:
                raise KeyboardInterrupt("simulated kill")
            return orig(self, lr)

        monkeypatch.setattr(T.StackedAdam, "step", flaky)
        with pytest.raises(KeyboardInterrupt):
            T.train(_cfg(shards, out, **kw))
        monkeypatch.setattr(T.StackedAdam, "step", orig)
        _, st = T.load_checkpoint(out / T.CHECKPOINT_DIR)
        assert (st["epoch"], st["batch_in_epoch"]) == (2, 0)  # the last end-of-epoch checkpoint
    with pytest.raises(T.TrainError, match="rerun without --no_resume to continue"):
        T.train(_cfg(shards, out, resume=False, **kw))
    T.train(_cfg(shards, out, **kw))  # the same command continues (resume is the default, issue 11 item 9)
    a, b = _weights(ref), _weights(out)
    for k in a:
        assert_bitwise_equal(a[k], b[k], msg=f"resumed {k}")
    ta, _ = T.load_checkpoint(ref / T.CHECKPOINT_DIR)
    tb, _ = T.load_checkpoint(out / T.CHECKPOINT_DIR)
    for k in ta:
        if not k.startswith("rng."):
            assert_bitwise_equal(ta[k], tb[k], msg=f"resumed checkpoint {k}")
    # The log reads as if the run had never stopped.
    va = [r for r in read_metrics(ref) if r["type"] in ("val", "resample")]
    vb = [r for r in read_metrics(out) if r["type"] in ("val", "resample")]
    assert va == vb and len(va) == 5


def test_mid_epoch_checkpoints_resume_via_start_batch(planted, tmp_path, monkeypatch):
    shards, _ = planted
    kw = dict(num_epochs=2, resample_every=0, checkpoint_every_steps=10)
    ref = T.train(_cfg(shards, tmp_path / "ref", **kw))
    orig = T.StackedAdam.step
    calls = {"n": 0}

    def flaky(self, lr=None):
        calls["n"] += 1
        if calls["n"] == 45:
            raise RuntimeError("simulated crash")
        return orig(self, lr)

    monkeypatch.setattr(T.StackedAdam, "step", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        T.train(_cfg(shards, tmp_path / "run", **kw))
    monkeypatch.setattr(T.StackedAdam, "step", orig)
    _, st = T.load_checkpoint(tmp_path / "run" / T.CHECKPOINT_DIR)
    assert st["step"] == 40 and st["batch_in_epoch"] == 40 - 29
    T.train(_cfg(shards, tmp_path / "run", resume=True, **kw))
    a, b = _weights(ref), _weights(tmp_path / "run")
    for k in a:
        assert_bitwise_equal(a[k], b[k], msg=f"resumed mid-epoch {k}")


# ----------------------------------------------------------------------------- bad inputs (through main)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _main(capsys, *argv):
    rc = T.main([str(a) for a in argv] + ["--no_progress", "--no_plot"])
    return rc, capsys.readouterr().err


def test_bad_inputs_give_clear_errors(planted, tmp_path, capsys):
    shards, _ = planted
    common = ["--num_epochs", "1", "--batch_size", "256", "--expansion_factor", "2"]
    # --shards missing
    rc, err = _main(capsys, *common)
    assert rc == 2 and "--shards is required" in err and "--synthetic" in err
    # a directory without a manifest
    (tmp_path / "empty").mkdir()
    rc, err = _main(capsys, "--shards", tmp_path / "empty", "--out", tmp_path / "o1", *common)
    assert rc == 2 and "manifest.json is missing" in err
    # a truncated shard file
    bad = _copy(shards, tmp_path / "trunc")
    f = bad / "shard_00001.acts.npy"
    f.write_bytes(f.read_bytes()[:-100])
    rc, err = _main(capsys, "--shards", bad, "--out", tmp_path / "o2", *common)
    assert rc == 2 and "shard_00001.acts.npy is truncated" in err
    # NaN rows: found by --validate_shards full (naming shard and row) ...
    nan = _copy(shards, tmp_path / "nan")
    mm = np.load(nan / "shard_00002.acts.npy", mmap_mode="r+")
    mm[5, 3] = np.nan
    mm.flush()
    del mm
    rc, err = _main(capsys, "--shards", nan, "--out", tmp_path / "o3", "--validate_shards", "full", *common)
    assert rc == 2 and "shard_00002.acts.npy is damaged" in err  # its checksum, recorded by the writer, differs
    m = json.loads((nan / "manifest.json").read_text())
    for entry in m["shards"]:  # a set made by a tool that records no checksums: the row scan names the row
        entry.pop("files")
    (nan / "manifest.json").write_text(json.dumps(m))
    rc, err = _main(capsys, "--shards", nan, "--out", tmp_path / "o3", "--validate_shards", "full", *common)
    assert rc == 2 and "shard_00002.acts.npy row 5" in err and "NaN" in err
    # ... and without the full scan, training stops at the first log with a pointer to it.
    rc, err = _main(capsys, "--shards", nan, "--out", tmp_path / "o4", "--log_every", "1", "--val_fraction", "0", *common)
    assert rc == 2 and "diverged" in err and "--validate_shards full" in err
    # an SAE (init_from) whose d_in differs from the shards
    other = _dead_start_sae(tmp_path / "sae32", n_dead=0)
    small = tmp_path / "d16"
    write_planted_shards(small, n=1024, dictionary=make_planted_dictionary(d=16, n_atoms=32, seed=1), shard_size=512)
    rc, err = _main(capsys, "--shards", small, "--out", tmp_path / "o5", "--init_from", other, *common)
    assert rc == 2 and "d_in=32" in err and "d=16" in err
    # a bad value
    rc, err = _main(capsys, "--shards", shards, "--out", tmp_path / "o6", "--batch_size", "0")
    assert rc == 2 and "batch_size must be positive" in err


def test_resume_with_shards_of_another_width_is_refused(planted, tmp_path, capsys):
    shards, _ = planted
    out = tmp_path / "run"
    rc, _ = _main(capsys, "--shards", shards, "--out", out, "--max_steps", "3", "--batch_size", "256",
                  "--expansion_factor", "2")
    assert rc == 0 and (out / "checkpoint" / "checkpoint.safetensors").exists()
    small = tmp_path / "d16"
    write_planted_shards(small, n=1024, dictionary=make_planted_dictionary(d=16, n_atoms=32, seed=1), shard_size=512)
    rc, err = _main(capsys, "--shards", small, "--out", out, "--resume", "--batch_size", "256",
                    "--expansion_factor", "2")
    assert rc == 2 and "d_in=32" in err and "has d=16" in err
    rc, err = _main(capsys, "--shards", shards, "--out", out, "--resume", "--batch_size", "128",
                    "--expansion_factor", "2")
    assert rc == 2 and "batch_size" in err and "different config" in err


def test_the_run_records_its_paths_absolute_and_resumes_under_another_spelling(planted, tmp_path, monkeypatch,
                                                                              capsys):
    """cfg.json's extra.train recorded --shards / --out as typed (relative): it did not say which from elsewhere.
    Recorded absolute; a rerun naming them another way (absolute now) continues the run (paths are not compared)."""
    shards, _ = planted
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(shards, tmp_path)
    rc, _ = _main(capsys, "--shards", rel, "--out", "run", "--max_steps", "2", "--batch_size", "256")
    rec = json.loads((tmp_path / "run" / "cfg.json").read_text())["extra"]["train"]
    assert rc == 0 and rec["shards"] == os.path.abspath(rel) and rec["out"] == str(tmp_path / "run"), rec
    rc, err = _main(capsys, "--shards", shards, "--out", tmp_path / "run", "--max_steps", "4", "--batch_size", "256")
    assert rc == 0 and json.loads((tmp_path / "run" / "cfg.json").read_text())["extra"]["steps"] == 4, err


# ----------------------------------------------------------------------------- CLI, options


def test_help_lists_every_option_with_default(capsys):
    import dataclasses

    with pytest.raises(SystemExit) as e:
        T.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(T.TrainConfig):
        assert f"--{f.name}" in out
        assert f.metadata.get("help"), f"{f.name} has no help text"
    assert "(default: 200)" in out and "(default: 4096)" in out and "(default: 0.0005)" in out


def test_yaml_defaults_match_the_dataclass():
    from visae.config import load_yaml_config

    path = T.DEFAULT_YAML
    assert path.read_text().splitlines()[0] == "# config: visae.train:TrainConfig"
    assert load_yaml_config(T.TrainConfig, path) == T.TrainConfig()


def test_script_synthetic_job_end_to_end(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "job"
    cmd = [sys.executable, str(T.REPO / "scripts" / "train_sae.py"), "--synthetic", "--out", str(out),
           "--synthetic_examples", "4096", "--synthetic_d", "16", "--synthetic_atoms", "32", "--num_epochs", "2",
           "--batch_size", "512", "--no_progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                               "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()) == out
    assert (out / "planted_shards" / "manifest.json").exists() and (out / "curves.png").exists()
    assert load_sae(out).d_in == 16


def test_bf16_autocast_trains_close_to_fp32(planted, tmp_path):
    shards, _ = planted
    kw = dict(num_epochs=3, resample_every=0)
    fp32 = read_metrics(T.train(_cfg(shards, tmp_path / "fp32", **kw)))
    bf16 = read_metrics(T.train(_cfg(shards, tmp_path / "bf16", bf16=True, **kw)))
    ev32 = [r for r in fp32 if r["type"] == "val"][-1]["explained_variance"]
    ev16 = [r for r in bf16 if r["type"] == "val"][-1]["explained_variance"]
    assert np.isfinite(ev16) and abs(ev16 - ev32) < 0.05, (ev32, ev16)
    assert load_sae(tmp_path / "bf16").W_enc.dtype == torch.float32


@pytest.mark.skipif("topk" not in ARCHITECTURES, reason="TopK SAE not registered yet (visae/sae/topk.py)")
def test_topk_gets_the_dead_mask(planted, tmp_path, monkeypatch):
    shards, _ = planted
    seen = []
    cls = ARCHITECTURES["topk"]
    orig = cls.training_loss

    def spy(self, x, l1_coeff=0.0, dead_mask=None, **kw):
        seen.append(None if dead_mask is None else dead_mask.clone())
        return orig(self, x, l1_coeff, dead_mask=dead_mask, **kw)

    monkeypatch.setattr(cls, "training_loss", spy)
    out = T.train(_cfg(shards, tmp_path / "topk", architecture="topk", k=4, num_epochs=2, dead_window_steps=5))
    masks = [m for m in seen if m is not None]  # training steps (evaluation passes no mask)
    steps = [r for r in read_metrics(out) if r["type"] == "summary"][0]["step"]
    assert len(masks) == steps and all(m.shape == (1, D_IN * 4) for m in masks)
    assert not masks[0].any()  # nothing is dead at step 0
    val = [r for r in read_metrics(out) if r["type"] == "val"][-1]
    assert val["l0"] <= 4.0 + 1e-6


def test_wandb_offline(planted, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (optional dependency)")
    shards, _ = planted
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = T.train(_cfg(shards, tmp_path / "wb", num_epochs=1, wandb=True, wandb_project="visae-test"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs, list(out.iterdir())
    assert any(p.suffix == ".wandb" for p in runs[0].iterdir())
    assert read_metrics(out)


def test_wandb_missing_gives_a_clear_error(planted, tmp_path, monkeypatch):
    import sys

    shards, _ = planted
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(T.TrainError, match=r"pip install wandb.*--no_wandb"):
        T.train(_cfg(shards, tmp_path / "nowb", num_epochs=1, wandb=True))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_every_architecture_trains_and_resamples_through_the_trainer(planted, tmp_path, arch):
    if arch not in ARCHITECTURES:
        pytest.skip(f"{arch} SAE not registered yet")
    shards, _ = planted
    l1 = {"jumprelu": 1e-3}.get(arch, 0.0)
    out = T.train(_cfg(shards, tmp_path / arch, architecture=arch, k=4, l1_coeff=l1, num_epochs=3, resample_every=1,
                       dead_window_steps=20))
    recs = read_metrics(out)
    val = [r for r in recs if r["type"] == "val"]
    assert len(val) == 3 and all(np.isfinite(r["mse"]) for r in val)
    assert [r["epoch"] for r in recs if r["type"] == "resample"] == [0, 1]  # not in the last period
    assert val[-1]["explained_variance"] > 0.5, val[-1]
    if arch in ("topk", "batchtopk"):
        assert val[-1]["l0"] <= 4.0 * 1.5
    sae = load_sae(out)
    assert sae.architecture == arch and torch.isfinite(sae.W_dec).all()
