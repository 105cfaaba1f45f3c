"""Sweeps: the plan and rank split, one stacked pass equals each trial alone, resume after a kill, selection."""

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import REPO  # noqa: E402
from tolerances import assert_bitwise_equal  # noqa: E402
from visae.backbones import load_backbone, register_tiny_clip  # noqa: E402
from visae.sae import load_sae  # noqa: E402
from visae.select import SelectConfig, SelectError, select  # noqa: E402
from visae.shards import ShardSet, ShardWriter  # noqa: E402
from visae.sweep import (SweepConfig, SweepError, SweepSelection, assign_groups, plan_groups, plan_trials,  # noqa: E402
                         sweep, train_trial_alone)
from visae.zeroshot import ClassifierConfig, build_classifier  # noqa: E402

CLASSES = ["cat", "dog", "car", "tree", "house"]
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")



# ----------------------------------------------------------------------------- the plan


def test_default_grid_is_discover_then_name():
    trials = plan_trials(SweepConfig())
    assert len(trials) == 75 and len({t.name for t in trials}) == 75
    assert sorted({t.lr for t in trials}) == [1e-5, 5e-5, 1e-4, 5e-4, 1e-3]
    assert sorted({t.l1_coeff for t in trials}) == [3e-5, 1.5e-4, 3e-4, 1.5e-3, 3e-3]
    assert sorted({t.expansion for t in trials}) == [2, 4, 8]
    assert "exp8_lr5e-4_lam1.5e-4" in {t.name for t in trials}
    groups = plan_groups(trials)
    assert [(g.name, len(g.trials)) for g in groups] == [("exp2", 25), ("exp4", 25), ("exp8", 25)]


@pytest.mark.parametrize("world,max_group", [(1, 0), (2, 0), (8, 0), (3, 10), (100, 0)])
def test_groups_split_among_ranks_cover_every_trial_once(world, max_group):
    trials = plan_trials(SweepConfig())
    groups = plan_groups(trials, max_group, world)
    assert groups == plan_groups(trials, max_group, world)  # deterministic: every rank computes the same plan
    per_rank = assign_groups(groups, world)
    names = [t.name for rank in per_rank for g in rank for t in g.trials]
    assert sorted(names) == sorted(t.name for t in trials)
    for g in groups:
        assert len({t.expansion for t in g.trials}) == 1  # a group is one shape
        if max_group:
            assert len(g.trials) <= max_group
    if world <= 75:
        assert all(per_rank), "a rank got no work although there are enough trials"
        loads = [sum(g.cost for g in r) for r in per_rank]
        assert max(loads) <= 2.5 * (sum(loads) / world)


def test_changed_grid_in_the_same_directory_is_refused(tmp_path, planted):
    cfg = _cfg(planted, tmp_path / "sw", lrs=(1e-3,), l1_coeffs=(1e-4,), expansion_factors=(2,), num_epochs=1,
               select=False)
    sweep(cfg)
    with pytest.raises(SweepError, match="another config"):
        sweep(_cfg(planted, tmp_path / "sw", lrs=(2e-3,), l1_coeffs=(1e-4,), expansion_factors=(2,), num_epochs=1,
                   select=False))


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from visae.synthetic import make_planted_dictionary, write_planted_shards

    d = tmp_path_factory.mktemp("planted")
    write_planted_shards(d / "s", n=1536, dictionary=make_planted_dictionary(d=16, n_atoms=48, seed=0),
                         shard_size=512, seed=0)
    return d / "s"


def _cfg(shards, out, **kw):
    """A SweepConfig from flat settings: each goes to the sweep, its trainer config or its selection settings."""
    base = dict(shards=str(shards), out=str(out), lrs=(1e-3, 4e-3), l1_coeffs=(1e-4, 2e-3), expansion_factors=(2,),
                num_epochs=3, batch_size=128, val_fraction=0.25, seed=0, resample_every=0, lr_warmup_steps=5,
                l1_warmup_steps=5, device="cpu", progress=False, plot=False, metric="explained_variance")
    base.update(kw)
    own = {f.name for f in dataclasses.fields(SweepConfig)}
    sel = {f.name for f in dataclasses.fields(SweepSelection)}
    clf = {f.name for f in dataclasses.fields(ClassifierConfig)}
    train = dataclasses.replace(SweepConfig().train, **{k: v for k, v in base.items() if k not in own | sel | clf})
    selection = SweepSelection(classifier=ClassifierConfig(**{k: v for k, v in base.items() if k in clf}),
                               **{k: v for k, v in base.items() if k in sel})
    return SweepConfig(train=train, selection=selection, **{k: v for k, v in base.items() if k in own})


def _setting(cfg, k):
    """A flat setting of ``cfg`` (the sweep's own, its trainer's or its selection's)."""
    for c in (cfg, cfg.train, cfg.selection, cfg.selection.classifier):
        if hasattr(c, k):
            return getattr(c, k)
    raise AttributeError(k)


def _weights(d):
    sae = load_sae(d)
    return {k: getattr(sae, k).detach().clone() for k in PARAMS}


def test_one_stacked_pass_equals_each_trial_alone(planted, tmp_path):
    cfg = _cfg(planted, tmp_path / "sw", select=False)
    sweep(cfg)
    trials = plan_trials(cfg)
    assert len(trials) == 4
    init = _weights(tmp_path / "sw" / "init" / "exp2")
    for t in trials:
        stacked = _weights(tmp_path / "sw" / "trials" / t.name)
        alone = _weights(train_trial_alone(cfg, t, tmp_path / "alone" / t.name))
        for k in PARAMS:  # bit-identical by construction: member s runs the same calls as S = 1 (kernels._mv_s)
            assert_bitwise_equal(stacked[k], alone[k], msg=f"{t.name}.{k}")
        assert not torch.allclose(stacked["W_dec"], init["W_dec"], atol=1e-3), "the trial did not train"
    # the members really differ (lr and lambda reached each of them)
    a, b = (_weights(tmp_path / "sw" / "trials" / t.name)["W_dec"] for t in trials[:2])
    assert not torch.allclose(a, b, atol=1e-4)
    extra = json.loads((tmp_path / "sw" / "trials" / trials[3].name / "cfg.json").read_text())["extra"]
    assert extra["sweep"]["lr"] == trials[3].lr and extra["train"]["l1_coeff"] == trials[3].l1_coeff


def _n_resampled(trial_dir):
    rows = [json.loads(line) for line in (trial_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(r["n_resampled"] for r in rows if r["type"] == "resample")


def test_stacked_member_equals_trial_alone_with_resampling(planted, tmp_path):
    # TopK with k=1 and a high lr leaves latents unfired, so every member resamples (after epoch 2);
    # each member draws from its own generator (seeded by seed, epoch, its lr and lambda), so the
    # later members' draws no longer depend on the members before them.
    cfg = _cfg(planted, tmp_path / "sw", architecture="topk", k=1, expansion_factors=(4,), lrs=(1e-2, 3e-2),
               l1_coeffs=(1e-4, 1e-3), resample_every=1, select=False)
    sweep(cfg)
    trials = plan_trials(cfg)
    assert len(trials) == 4
    for t in trials:
        assert _n_resampled(tmp_path / "sw" / "trials" / t.name) > 0, f"{t.name} did not resample"
        stacked = _weights(tmp_path / "sw" / "trials" / t.name)
        alone_dir = train_trial_alone(cfg, t, tmp_path / "alone" / t.name)
        assert _n_resampled(alone_dir) == _n_resampled(tmp_path / "sw" / "trials" / t.name)
        alone = _weights(alone_dir)
        # Bit-identical by construction: every per-member GEMM / GEMV is the same call on the same operands
        # whatever the stack size (a batched GEMV that rounded differently from the S = 1 one made 2 of 1024
        # elements differ by 8.8e-5 after 36 Adam steps on another machine: issue 10).
        for k in PARAMS:
            assert_bitwise_equal(stacked[k], alone[k], msg=f"{t.name}.{k}")
    # members with the same lr train alike until the resampling; their own draws then tell them apart
    a, b = (_weights(tmp_path / "sw" / "trials" / t.name)["W_dec"] for t in trials[:2])
    assert trials[0].lr == trials[1].lr and not torch.allclose(a, b, atol=1e-3)


def _checkpoint_step(path):
    """The step recorded in a trainer checkpoint (its safetensors metadata), or -1."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int(json.loads(f.metadata()["state"])["step"])
    except Exception:  # noqa: BLE001 - not there yet
        return -1


def _run_and_kill(cfg_args, out, wait_for, forbid):
    """Start scripts/sweep.py, SIGKILL it as soon as ``wait_for()`` holds (and ``forbid`` does not exist)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as the in-process reference run
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "sweep.py"), *cfg_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env=env)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if wait_for():
                break
            if proc.poll() is not None:
                raise AssertionError(f"sweep ended before the kill: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not forbid.exists(), "the group finished before the kill; the test did not interrupt it"


def test_killed_sweep_resumes_to_the_uninterrupted_result(planted, tmp_path):
    grid = dict(lrs=(1e-3, 4e-3), l1_coeffs=(1e-4,), expansion_factors=(2, 4), num_epochs=4,
                checkpoint_every_steps=1, select=True)
    ref = _cfg(planted, tmp_path / "ref", **grid)
    sweep(ref)
    out = tmp_path / "killed"
    cfg = _cfg(planted, out, **grid)
    args = ["--shards", str(planted), "--out", str(out)]
    for k in ("lrs", "l1_coeffs", "expansion_factors"):
        args += [f"--{k}", *map(str, getattr(cfg, k))]
    for k in ("num_epochs", "batch_size", "val_fraction", "seed", "resample_every", "lr_warmup_steps",
              "l1_warmup_steps", "checkpoint_every_steps", "device", "progress", "plot", "metric",
              "l1_convention"):  # (configs/sweep_dncbm.yaml, under the flags, sets l1_convention: raw)
        v = _setting(cfg, k)
        args += [f"--{k}" if v else f"--no_{k}"] if isinstance(v, bool) else [f"--{k}", str(v)]
    # groups run costliest first: exp4, then exp2; kill exp2 a third of the way (step 12 of 36)
    ckpt2 = out / "groups" / "exp2" / "checkpoint" / "checkpoint.safetensors"
    _run_and_kill(args, out, lambda: _checkpoint_step(ckpt2) >= 12, out / "groups" / "exp2" / "done.json")
    assert 12 <= _checkpoint_step(ckpt2) < 36
    assert (out / "groups" / "exp4" / "done.json").is_file()
    exp4 = [t for t in plan_trials(cfg) if t.expansion == 4]
    stamps = {t.name: (out / "trials" / t.name / "weights.safetensors").stat().st_mtime_ns for t in exp4}
    sweep(cfg)  # rerun the same sweep: exp4 skipped, exp2 resumed from its checkpoint
    for t in exp4:
        assert (out / "trials" / t.name / "weights.safetensors").stat().st_mtime_ns == stamps[t.name], "retrained"
    for t in plan_trials(cfg):
        got, want = _weights(out / "trials" / t.name), _weights(tmp_path / "ref" / "trials" / t.name)
        for k in PARAMS:
            assert_bitwise_equal(got[k], want[k], msg=f"{t.name}.{k}")  # resume restores every state: same steps
    assert json.loads((out / "selection.json").read_text())["trial"] == \
        json.loads((tmp_path / "ref" / "selection.json").read_text())["trial"]


def test_a_sweep_copied_with_its_shard_set_continues_from_the_copy(planted, tmp_path):
    """sweep.json records the shard set's absolute path; a sweep directory copied together with its shards (a demo
    directory copied elsewhere) was refused as "another config". The set's content (its fingerprint, recorded in
    sweep.json's data) decides now; a set with other content at the new path is still refused."""
    import shutil

    grid = dict(lrs=(1e-3,), l1_coeffs=(1e-4,), expansion_factors=(2,), num_epochs=1, select=False)
    (tmp_path / "a").mkdir()
    shutil.copytree(planted, tmp_path / "a" / "shards")
    sweep(_cfg(tmp_path / "a" / "shards", tmp_path / "a" / "sweep", **grid))
    plan = json.loads((tmp_path / "a" / "sweep" / "sweep.json").read_text())
    assert plan["data"]["train.shards"] == ShardSet(tmp_path / "a" / "shards").fingerprint()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    t = plan_trials(_cfg(planted, tmp_path, **grid))[0].name
    stamp = (tmp_path / "b" / "sweep" / "trials" / t / "weights.safetensors").stat().st_mtime_ns
    sweep(_cfg(tmp_path / "b" / "shards", tmp_path / "b" / "sweep", **grid))  # the copy: same data, other paths
    assert (tmp_path / "b" / "sweep" / "trials" / t / "weights.safetensors").stat().st_mtime_ns == stamp  # kept
    assert json.loads((tmp_path / "b" / "sweep" / "sweep.json").read_text())["train_config"]["shards"] == \
        str(tmp_path / "b" / "shards")
    from visae.synthetic import make_planted_dictionary, write_planted_shards

    write_planted_shards(tmp_path / "other", n=1536, dictionary=make_planted_dictionary(d=16, n_atoms=48, seed=1),
                         shard_size=512, seed=1)
    with pytest.raises(SweepError, match="train.shards"):
        sweep(_cfg(tmp_path / "other", tmp_path / "b" / "sweep", **grid))


def test_stale_data_and_a_same_size_swap_are_not_selected_silently(planted, tmp_path):
    """Three stale results a newcomer found (2026-12-02): (1) the training shards re-extracted in place: the sweep's
    rerun skipped its finished groups and select scored them on the new held-out split, exit 0; (2) the selection set
    re-extracted in place (same path and size): cached scores of the old set were used; (3) a trial's weights
    replaced by another trial's file of the same size, mtime restored: the cached score carried it into best/."""
    import os
    import shutil

    from visae.synthetic import make_planted_dictionary, write_planted_shards
    from visae.sweepdir import SweepDir, SweepError as DirError

    shards, val = tmp_path / "s", tmp_path / "v"
    shutil.copytree(planted, shards)
    shutil.copytree(planted, val)
    cfg = _cfg(shards, tmp_path / "sw", val_shards=str(val))
    sweep(cfg)
    sd = SweepDir(tmp_path / "sw")
    first = select(SelectConfig(sweep=str(tmp_path / "sw"), progress=False))
    # (3) same-size swap with the mtime kept: refused when it would be published
    names = sd.trials_with_weights()
    chosen = first["trial"]
    other = next(n for n in names if n != chosen)
    w = sd.trial_dir(chosen) / "weights.safetensors"
    st = w.stat()
    shutil.copyfile(sd.trial_dir(other) / "weights.safetensors", w)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    board = (tmp_path / "sw" / "leaderboard.csv").read_bytes()
    with pytest.raises(SelectError, match=rf"the chosen trial {chosen} is damaged .*another SHA-256"):
        select(SelectConfig(sweep=str(tmp_path / "sw"), progress=False))
    assert (tmp_path / "sw" / "leaderboard.csv").read_bytes() == board  # refused before the tables were rewritten
    with pytest.raises(DirError, match=rf"cannot publish {chosen} .*another SHA-256"):  # the last guard, on its own
        sd.publish_best(chosen, {})
    # (2) the selection set re-extracted in place: other content at the same path is scored again, not read from cache
    shutil.rmtree(val)
    write_planted_shards(val, n=1536, dictionary=make_planted_dictionary(d=16, n_atoms=48, seed=7), shard_size=512,
                         seed=7)
    key = json.loads((sd.trial_dir(other) / "zeroshot.json").read_text())["key"]
    assert key["fingerprint"] != ShardSet(val).fingerprint()
    assert sd.read_score(other, {**key, "fingerprint": ShardSet(val).fingerprint()}) is None
    # (1) the training shards re-extracted in place: the sweep's rerun refuses, naming --shards
    shutil.rmtree(shards)
    write_planted_shards(shards, n=1536, dictionary=make_planted_dictionary(d=16, n_atoms=48, seed=8), shard_size=512,
                         seed=8)
    with pytest.raises(SweepError, match=r"--shards .*changed since this sweep trained on it"):
        sweep(cfg)


# ----------------------------------------------------------------------------- selection


@pytest.fixture(scope="module")
def zs_sweep(tmp_path_factory):
    """A small sweep on tiny-CLIP embeddings (labels = the clean zero-shot argmax), selected by zero-shot top-1."""
    d = tmp_path_factory.mktemp("zssweep")
    bb = load_backbone(register_tiny_clip(), random_init=True)
    clf = build_classifier(bb, CLASSES, ["{}"], cache_dir=d / "text")
    torch.manual_seed(0)
    with torch.no_grad():
        emb = bb.encode_image(torch.randn(1536, 3, 32, 32))
    y = (emb @ clf.weights.T).argmax(1).numpy()
    src = {"model": bb.name, "pretrained": None, "random_init": True, "seed": 0, "layer": None,
           "read": "image_embedding"}
    with ShardWriter(d / "s", emb.shape[1], shard_size=512, source=src) as w:
        w.add(emb.numpy(), ids=[str(i) for i in range(len(y))], labels=y)
    (d / "classes.txt").write_text("\n".join(CLASSES))
    cfg = _cfg(d / "s", d / "sw", lrs=(1e-3, 5e-3), l1_coeffs=(1e-4, 3e-3), expansion_factors=(2, 4), num_epochs=2,
               metric="zeroshot_top1", benchmark="files", classnames_file=str(d / "classes.txt"),
               text_cache=str(d / "text"))
    sweep(cfg)
    return d / "sw", cfg


def _rows(sw):
    with open(sw / "leaderboard.csv") as f:
        return list(csv.DictReader(f))


def test_sweep_selects_by_zero_shot_accuracy_of_reconstructions(zs_sweep):
    sw, cfg = zs_sweep
    rows = _rows(sw)
    assert len(rows) == 8 and rows[0]["chosen"] == "True"
    info = json.loads((sw / "selection.json").read_text())
    best = max(rows, key=lambda r: (float(r["recon_top1"]), -float(r["l0"])))
    assert info["trial"] == rows[0]["trial"] and float(best["recon_top1"]) == float(rows[0]["recon_top1"])
    assert all(float(r["clean_top1"]) == 1.0 for r in rows)
    score = json.loads((sw / "trials" / info["trial"] / "zeroshot.json").read_text())["result"]
    assert score["recon"]["top1"] == info["score"] and score["clean"]["top1"] == 1.0
    # best/ is the chosen SAE, loadable, with a note saying which trial it is
    for k in PARAMS:
        assert torch.equal(_weights(sw / "best")[k], _weights(sw / "trials" / info["trial"])[k])
    assert json.loads((sw / "best" / "selection.json").read_text())["trial"] == info["trial"]
    assert (sw / "pareto.png").stat().st_size > 1000 and "| rank |" in (sw / "leaderboard.md").read_text()


def test_reselection_obeys_constraints_without_rescoring(zs_sweep, monkeypatch):
    sw, _ = zs_sweep
    rows = _rows(sw)
    l0s = sorted(float(r["l0"]) for r in rows)
    cap = (l0s[2] + l0s[3]) / 2  # three trials fit
    import visae.zeroshot

    def no_scoring(*a, **k):
        raise AssertionError("re-selection scored a trial again instead of using the cache")

    monkeypatch.setattr(visae.zeroshot, "evaluate", no_scoring)
    info = select(SelectConfig(sweep=str(sw), max_l0=cap, progress=False))
    feasible = [r for r in rows if float(r["l0"]) <= cap]
    assert len(feasible) == 3
    assert info["row"]["l0"] <= cap
    assert info["score"] == max(float(r["recon_top1"]) for r in feasible)
    new_rows = _rows(sw)
    assert sum(r["feasible"] == "True" for r in new_rows) == 3
    assert all(r["feasible"] == "False" for r in new_rows if float(r["l0"]) > cap)
    assert json.loads((sw / "best" / "selection.json").read_text())["trial"] == info["trial"]
    # a cap nobody meets: a clear error, and the previous selection (best/, selection.json) is kept (issue 11 item 1)
    before = (sw / "selection.json").read_bytes(), (sw / "best" / "selection.json").read_bytes()
    deads = [float(r["dead_fraction"]) for r in rows]
    if min(deads) > 0:
        with pytest.raises(SelectError, match="no finished trial meets.*previous selection.json and best/, which holds .*, are kept"):
            select(SelectConfig(sweep=str(sw), max_dead=min(deads) / 2, progress=False))
    with pytest.raises(SelectError, match="no finished trial meets"):
        select(SelectConfig(sweep=str(sw), max_l0=l0s[0] / 2, progress=False))
    assert ((sw / "selection.json").read_bytes(), (sw / "best" / "selection.json").read_bytes()) == before
    # and back to no constraint
    info = select(SelectConfig(sweep=str(sw), max_l0=float("inf"), max_dead=float("inf"), progress=False))
    assert info["score"] == max(float(r["recon_top1"]) for r in rows)


def test_select_cli(zs_sweep, capsys):
    from visae.select import main

    sw, _ = zs_sweep
    assert main(["--sweep", str(sw), "--max_l0", "inf", "--no_progress"]) == 0
    assert "chosen:" in capsys.readouterr().out
    assert main(["--sweep", str(sw / "nope")]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


def test_ranks_split_the_work_and_the_last_one_selects(planted, tmp_path, monkeypatch):
    cfg = _cfg(planted, tmp_path / "sw", num_epochs=1)
    out = tmp_path / "sw"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    sweep(cfg)  # rank 1 alone: its half of the trials, no selection yet (rank 0's groups are missing)
    trained = {p.name for p in (out / "trials").iterdir()}
    assert len(trained) == 2 and not (out / "best").exists()
    monkeypatch.setenv("RANK", "0")
    sweep(cfg)  # rank 0 finishes the rest and, finding every group done, selects
    assert {p.name for p in (out / "trials").iterdir()} == {t.name for t in plan_trials(cfg)}
    assert (out / "best" / "selection.json").is_file()
    assert len(_rows(out)) == 4
    # rerun on one process: the split changes, but finished trials are not trained again
    stamps = {p.name: (p / "weights.safetensors").stat().st_mtime_ns for p in (out / "trials").iterdir()}
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    sweep(cfg)
    assert {p.name: (p / "weights.safetensors").stat().st_mtime_ns for p in (out / "trials").iterdir()} == stamps


def test_leaderboard_marks_trials_the_selection_set_cannot_separate(tmp_path):
    """Binomial noise: on n=1000 examples 0.990 vs 0.985 is within 2 standard errors (tied), 0.990 vs 0.950 is not;
    an infeasible trial is never tied; with n=100000 the 0.005 gap is resolved."""
    from visae.select import leaderboard

    def score(top1, l0, n):
        return {"result": {"n": n, "clean": {"top1": 0.99}, "recon": {"top1": top1, "l0": l0, "dead_fraction": 0.0,
                                                                        "explained_variance": 0.9}}}

    for name in "abcd":
        (tmp_path / "trials" / name).mkdir(parents=True)
        (tmp_path / "trials" / name / "cfg.json").write_text(json.dumps({"extra": {"finished": True}}))
    for n, expect in ((1000, {"b": True, "c": False, "d": None}), (100000, {"b": False, "c": False, "d": None})):
        scores = {"a": score(0.990, 10.0, n), "b": score(0.985, 5.0, n), "c": score(0.950, 5.0, n),
                  "d": score(0.990, 50.0, n)}
        rows = leaderboard(tmp_path, scores, "zeroshot_top1", max_l0=20.0, max_dead=None)
        by = {r["trial"]: r for r in rows}
        assert by["a"]["chosen"] and by["a"]["tied"] is None
        assert {k: by[k]["tied"] for k in "bcd"} == expect, n
    # explained variance is not a binomial estimate: nothing is marked
    rows = leaderboard(tmp_path, scores, "explained_variance", max_l0=None, max_dead=None)
    assert all(r["tied"] is None for r in rows)


def test_sweep_json_records_paths_absolute_so_select_runs_from_another_directory(tmp_path, planted, monkeypatch,
                                                                                 capsys):
    """sweep.json recorded --shards and --out as typed: `visae select --sweep DIR --rescore` from another directory
    failed ('shard set directory s does not exist'). Recorded absolute now; a rerun over the record of an older visae
    (relative paths) still resumes from its directory."""
    from visae.select import main as select_main

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    rel = os.path.relpath(planted, tmp_path / "a")
    cfg = _cfg(rel, "sw", lrs=(1e-3,), l1_coeffs=(1e-4,), num_epochs=1, select=False)
    sweep(cfg)
    plan = tmp_path / "a" / "sw" / "sweep.json"
    doc = json.loads(plan.read_text())
    assert doc["config"]["train"]["shards"] == doc["train_config"]["shards"] == os.path.abspath(rel), doc
    assert doc["config"]["out"] == str(tmp_path / "a" / "sw"), doc["config"]["out"]
    doc["config"]["train"]["shards"], doc["config"]["out"] = rel, "sw"  # as an older visae recorded them
    plan.write_text(json.dumps(doc))
    sweep(cfg)  # the same sweep: resumed (every group done), not refused as another config
    assert "already done, skipped" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "b")
    assert select_main(["--sweep", "../a/sw", "--rescore", "--no_progress"]) == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "a" / "sw" / "selection.json").read_text())["config"]
    assert rec["sweep"] == str(tmp_path / "a" / "sw"), rec  # selection.json's record too


def test_a_sweep_shorter_than_its_warmups_says_so(tmp_path, planted, capsys):
    """Issue 10.9: a sweep whose trials end before the lr / lambda warm-ups warns first and in its summary; once
    (the trainer's UserWarning of the same text repeated it: `visae demo --quick` printed it twice)."""
    import warnings

    from visae.sweep import format_summary

    cfg = _cfg(planted, tmp_path / "sw", lrs=(1e-3,), l1_coeffs=(1e-4,), num_epochs=1, lr_warmup_steps=50,
               l1_warmup_steps=50, select=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning recorded, none deduplicated
        sweep(cfg)
    err = capsys.readouterr().err
    steps = -(-(1536 - 384) // 128)  # one epoch of the 75% training split
    said = [str(w.message) for w in caught if "shorter than its" in str(w.message)]
    assert err.count("shorter than its lr warm-up") == 1 and not said, (err, said)
    assert f"visae sweep: warning: the run is {steps} steps" in err, err
    summary = format_summary(tmp_path / "sw")
    assert f"warning: the run ended at step {steps}, before its lr and lambda warm-up completed" in summary, summary


def test_sweep_refuses_a_selection_set_of_other_classes_before_training(tmp_path):
    """A selection set whose manifest names 3 classes against a 2-class benchmark was refused only after every trial
    had trained (the newcomer's report: 1,000 ImageNet names against 20 classes, hours into a real grid)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with ShardWriter(tmp_path / "s", 8, source={"model": "m"}, label_names={"label": ["a", "b", "c"]}) as w:
        w.add(x, ids=[str(i) for i in range(64)], labels=rng.integers(0, 3, 64))
    (tmp_path / "classes.txt").write_text("a\nb\n")
    cfg = _cfg(tmp_path / "s", tmp_path / "sw", metric="zeroshot_top1", benchmark="files",
               classnames_file=str(tmp_path / "classes.txt"))
    with pytest.raises(SweepError, match=r"label_names\['label'\] has 3 classes but the zero-shot benchmark has 2"):
        sweep(cfg)
    assert not (tmp_path / "sw" / "trials").exists()
    # the default benchmark "auto" is resolved and checked the same way (a 1,000-class ImageNet set, 3 names)
    with ShardWriter(tmp_path / "inet", 8, source={"model": "m", "dataset": "/data/imagenet/val"},
                     label_names={"label": ["a", "b", "c"]}) as w:
        w.add(x, ids=[str(i) for i in range(64)], labels=rng.integers(0, 3, 64))
    with pytest.raises(SweepError, match=r"has 3 classes but the zero-shot benchmark has 1000"):
        sweep(_cfg(tmp_path / "inet", tmp_path / "sw", metric="zeroshot_top1"))
    # a label column the selection set lacks (a typo): refused before training, not after every trial trained
    with pytest.raises(SweepError, match=r"label column 'nope' not in the shard set; columns: \['label'"):
        sweep(_cfg(tmp_path / "s", tmp_path / "sw", metric="zeroshot_top1", benchmark="files",
                   classnames_file=str(tmp_path / "classes.txt"), label_column="nope"))
    assert not (tmp_path / "sw" / "trials").exists()
    # no selection set at all: refused before training too (select found it after every trial had trained)
    with pytest.raises(SweepError, match="no selection set: no --val_shards and --val_fraction 0"):
        sweep(_cfg(tmp_path / "s", tmp_path / "sw", val_fraction=0.0))
    # ... nor a training split of no row (0.995 of 64 rows holds out round(63.68) = 64)
    for selecting in (True, False):  # a sweep that does not select trains on the split too
        with pytest.raises(SweepError, match=r"--val_fraction 0.995 holds out all 64 rows of --shards .* none left"):
            sweep(_cfg(tmp_path / "s", tmp_path / "sw", val_fraction=0.995, select=selecting))
    # ... nor one that rounds to no row (0.005 of 64 rows: ShardSet.split holds out round(0.32) = 0)
    with pytest.raises(SweepError, match=r"--val_fraction 0.005 of the 64 rows of --shards .* holds out none"):
        sweep(_cfg(tmp_path / "s", tmp_path / "sw", val_fraction=0.005))
    assert not (tmp_path / "sw" / "trials").exists()


def test_a_damaged_trial_is_refused_by_select_and_trained_again_by_the_sweep(planted, tmp_path, capsys):
    """One trial of a 4-trial group truncated after the sweep: select refuses it (naming the trial and the fix, not a
    bare checksum error, and a cached score cannot carry it into best/), the group is no longer done, and the same
    sweep command trains that trial alone again (bit for bit the same on one machine), its old directory set aside
    and a second set-aside taking the next free name; a trial whose cfg.json records no checksums is not flagged."""
    import shutil

    from visae.select import select_if_complete
    from visae.sweepdir import SweepDir

    cfg = _cfg(planted, tmp_path / "sw")
    sweep(cfg)
    sd = SweepDir(tmp_path / "sw")
    plan = sd.read_plan()
    (g,) = plan["groups"]
    t = g["trials"][1]
    w = sd.trial_dir(t) / "weights.safetensors"
    good = w.read_bytes()
    others = {o: (sd.trial_dir(o) / "weights.safetensors").stat().st_mtime_ns for o in g["trials"] if o != t}
    w.write_bytes(good[: len(good) // 2])
    assert sd.damaged_trials(plan) == {t: f"{w} is {len(good) // 2} bytes, its cfg.json recorded {len(good)} "
                                          "(truncated or replaced)"}
    assert not sd.group_done(g["name"], g["trials"]) and select_if_complete(tmp_path / "sw") is None
    with pytest.raises(SelectError, match=rf"1 trial\(s\) are damaged \({w} is .*rerun the same `visae sweep`"):
        select(SelectConfig(sweep=str(tmp_path / "sw"), progress=False))
    capsys.readouterr()
    sweep(cfg)
    err = capsys.readouterr().err
    assert f"trial {t} was finished but {w} is {len(good) // 2} bytes" in err and "training group exp2 (1 of 4 trials" in err
    assert w.read_bytes() == good and sd.damaged_trials(plan) == {}
    assert {o: (sd.trial_dir(o) / "weights.safetensors").stat().st_mtime_ns for o in others} == others  # untouched
    aside = sd.trials_dir / f".damaged-{t}"
    assert (aside / "weights.safetensors").stat().st_size == len(good) // 2
    assert t not in [p.name for p in sd.trials_dir.iterdir() if p.name.startswith(".")] and t in sd.trials_with_weights()
    w.unlink()
    sweep(cfg)
    assert (sd.trials_dir / f".damaged-{t}-1").is_dir() and w.read_bytes() == good
    # a retrain killed midway leaves a checkpoint of that one member: its resume takes the trials the checkpoint
    # holds (by lr and lambda), not the whole group (whose 4 members the trainer refused as another config)
    from safetensors.torch import save_file

    from visae.sweep import _checkpoint_trials, plan_trials

    trials = [x for x in plan_trials(cfg)]
    ck = tmp_path / "ck"
    ck.mkdir()
    save_file({"x": torch.zeros(1)}, str(ck / "checkpoint.safetensors"),
              metadata={"state": json.dumps({"lrs": [trials[1].lr], "l1_coeffs": [trials[1].l1_coeff]})})
    assert _checkpoint_trials(ck, trials) == [trials[1]]
    (ck / "checkpoint.safetensors").write_bytes(b"garbage")  # unreadable: every trial (the trainer says what is wrong)
    assert _checkpoint_trials(ck, trials) == trials
    # an SAE directory without the checksums record (another tool's): only its weights file is checked
    doc = json.loads((sd.trial_dir(t) / "cfg.json").read_text())
    doc.pop("checksums")
    bare = tmp_path / "bare"
    shutil.copytree(sd.trial_dir(t), bare)
    (bare / "cfg.json").write_text(json.dumps(doc))
    (bare / "weights.safetensors").write_bytes(b"short")
    from visae.sweepdir import weights_problem

    assert weights_problem(bare) is None
    doc["checksums"] = {"weights.safetensors": "abc"}
    (bare / "cfg.json").write_text(json.dumps(doc))
    assert "checksums record of weights.safetensors is malformed" in weights_problem(bare)
