"""visae.sweepdir: the sweep directory's files, checked on read, atomic on write, as docs/sweep_format.md says."""

import json
import re

import pytest

from conftest import REPO
from visae.sweepdir import FORMAT_NAME, FORMAT_VERSION, SweepDir, SweepError, check_plan


def _plan():
    trials = [{"name": f"exp2_lr1e-3_lam{lam}", "expansion": 2, "lr": 1e-3, "l1_coeff": float(lam)} for lam in (1, 2)]
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": {"metric": "explained_variance"},
            "train_config": {"seed": 0}, "world_size": 1, "trials": trials,
            "groups": [{"name": "exp2", "expansion": 2, "trials": [t["name"] for t in trials]}]}


def test_plan_round_trip(tmp_path):
    sd = SweepDir(tmp_path / "sw")
    assert not sd.has_plan()
    with pytest.raises(SweepError, match="not a sweep directory"):
        sd.read_plan()
    sd.write_plan(_plan())
    assert sd.read_plan() == _plan() and sd.plan_file.name == "sweep.json"
    assert sorted(p.name for p in sd.path.iterdir()) == ["sweep.json"]


@pytest.mark.parametrize("edit,field", [
    (lambda d: d.update(format="visae.shards"), "'format'"),
    (lambda d: d.update(version=FORMAT_VERSION + 1), "'version'"),
    (lambda d: d.pop("train_config"), "'train_config'"),
    (lambda d: d.update(config=[]), "'config'"),
    (lambda d: d.update(world_size=True), "'world_size'"),
    (lambda d: d["trials"][1].pop("lr"), r"trials\[1\]: field 'lr'"),
    (lambda d: d["trials"][0].update(expansion="2"), r"trials\[0\]: field 'expansion'"),
    (lambda d: d["groups"][0].update(trials=["exp9_x"]), r"groups\[0\]: field 'trials'"),
])
def test_a_malformed_plan_is_refused_naming_the_field(tmp_path, edit, field):
    doc = _plan()
    edit(doc)
    with pytest.raises(SweepError, match=field):
        check_plan(doc)
    sd = SweepDir(tmp_path / "sw")
    with pytest.raises(SweepError, match=field):
        sd.write_plan(doc)  # nothing written for a malformed plan
    assert not sd.path.exists() or not sd.has_plan()
    sd.path.mkdir(exist_ok=True)
    sd.plan_file.write_text(json.dumps(doc))
    with pytest.raises(SweepError, match=re.escape(str(sd.plan_file)) + ".*" + field):
        sd.read_plan()
    sd.plan_file.write_text("{not json")
    with pytest.raises(SweepError, match="not valid JSON"):
        sd.read_plan()


def _fake_trial(sd, name, lr=1e-3, l1=1.0, finished=True):
    d = sd.trial_dir(name)
    d.mkdir(parents=True)
    (d / "weights.safetensors").write_bytes(b"w" * 10)
    extra = {"finished": finished, "sweep": {"trial": name, "lr": lr, "l1_coeff": l1, "expansion": 2}}
    (d / "cfg.json").write_text(json.dumps({"architecture": "relu", "d_sae": 32, "extra": extra}))


def test_groups_and_trials(tmp_path):
    sd = SweepDir(tmp_path)
    plan = _plan()
    names = [t["name"] for t in plan["trials"]]
    assert not sd.group_done("exp2", names) and not sd.all_groups_done(plan)
    _fake_trial(sd, names[0], l1=1.0)
    sd.write_done("exp2", names, steps=12)
    assert json.loads((sd.group_dir("exp2") / "done.json").read_text()) == {"trials": names, "steps": 12}
    assert not sd.group_done("exp2", names), "done.json without every trial's weights"
    _fake_trial(sd, names[1], l1=2.0, finished=False)
    assert sd.group_done("exp2", names) and sd.all_groups_done(plan)
    assert not sd.group_done("exp2", names[:1]), "done.json lists other trials"
    assert sd.trial_finished(names[0], 1e-3, 1.0)
    assert not sd.trial_finished(names[0], 1e-3, 2.0), "another lambda"
    assert not sd.trial_finished(names[1], 1e-3, 2.0), "not finished"
    assert sd.trial_record(names[0]) == {"architecture": "relu", "d_sae": 32, "expansion": 2, "lr": 1e-3,
                                         "l1_coeff": 1.0, "finished": True}
    assert sd.trial_record("missing")["finished"] is False
    (sd.trials_dir / ".x.123.tmp").mkdir()  # a temporary dir is not a trial
    assert sd.trials_with_weights() == names and sd.trials_with_weights(["nope", names[1]]) == [names[1]]


def test_the_trainer_checkpoint_lives_where_the_format_says():
    from visae.sweepdir import SweepDir as S
    from visae.train import CHECKPOINT_DIR

    assert S("x").checkpoint_dir("exp2") == S("x").group_dir("exp2") / CHECKPOINT_DIR


def test_score_cache_is_keyed_by_selection_set_and_weights(tmp_path):
    sd = SweepDir(tmp_path)
    _fake_trial(sd, "t")
    key = {"format": "visae.trial-score.v1", "data": "/x", "subset": "all", "n": 10, "classifier": None}
    assert sd.read_score("t", key) is None
    entry = sd.write_score("t", key, {"recon": {"l0": 3.0}})
    assert sd.read_score("t", key) == entry == json.loads((sd.trial_dir("t") / "zeroshot.json").read_text())
    assert sd.read_score("t", {**key, "n": 11}) is None, "another selection set"
    (sd.trial_dir("t") / "weights.safetensors").write_bytes(b"retrained, other size")
    assert sd.read_score("t", key) is None, "other weights"


def test_publish_best_swaps_in_a_copy_and_remove_best(tmp_path):
    sd = SweepDir(tmp_path)
    _fake_trial(sd, "a")
    _fake_trial(sd, "b")
    sd.publish_best("a", {"trial": "a"})
    assert json.loads((sd.best_dir / "selection.json").read_text()) == {"trial": "a"}
    assert (sd.best_dir / "weights.safetensors").read_bytes() == b"w" * 10 and not sd.best_dir.is_symlink()
    sd.publish_best("b", {"trial": "b"})
    assert json.loads((sd.best_dir / "selection.json").read_text())["trial"] == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "trials"], "temporary dirs left behind"
    sd.commit_selection("b", {"trial": "b", "score": 0.5})  # best/ first, then the top-level copy
    assert sd.read_selection() == {"trial": "b", "score": 0.5} == json.loads(sd.selection_file.read_text())
    sd.remove_best()
    assert not sd.best_dir.exists()


def test_format_doc_names_every_file_and_plan_field():
    doc = (REPO / "docs" / "sweep_format.md").read_text()
    for name in ("sweep.json", "done.json", "zeroshot.json", "selection.json", "leaderboard.csv", "leaderboard.md",
                 "pareto.png", "best/", "init/exp", "checkpoint/", ".select.lock"):
        assert name in doc, name
    for field in list(_plan()) + ["name", "expansion", "lr", "l1_coeff", "key", "weights", "result"]:
        assert re.search(rf"`{field}`", doc), field


def test_select_with_another_metric_leaves_the_plan_alone(tmp_path):
    # the plan records metric zeroshot_top1 (no classifier exists for this data); re-selecting by
    # explained variance works and does not rewrite sweep.json (only `visae sweep` writes it)
    from test_sweep import _cfg  # the sweep tests' config helper: one place that knows how SweepConfig is built
    from visae.select import SelectConfig, select
    from visae.sweep import sweep
    from visae.synthetic import make_planted_dictionary, write_planted_shards

    write_planted_shards(tmp_path / "s", n=256, dictionary=make_planted_dictionary(d=8, n_atoms=16, seed=0),
                         shard_size=256, seed=0)
    out = tmp_path / "sw"
    sweep(_cfg(tmp_path / "s", out, lrs=(1e-3,), l1_coeffs=(1e-4,), num_epochs=1, batch_size=64, select=False,
               metric="zeroshot_top1"))
    before = SweepDir(out).plan_file.read_bytes()
    info = select(SelectConfig(sweep=str(out), metric="explained_variance", progress=False))
    assert info["metric"] == "explained_variance" and info["trial"] == "exp2_lr1e-3_lam1e-4"
    assert SweepDir(out).plan_file.read_bytes() == before
    assert SweepDir(out).read_selection()["metric"] == "explained_variance"
