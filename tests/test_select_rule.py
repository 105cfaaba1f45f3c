"""Selection rules (issue 12 item 4): "best" (highest zero-shot accuracy of the reconstructions) and
"sparsest_within" (the lowest-L0 trial whose zero-shot drop below the clean accuracy is at most max_drop points).

The sweep directories here are built by hand with constructed scores (``score_trials`` replaced), so each test
knows every trial's L0 and drop exactly; scoring itself is tested in test_sweep.py.
"""

import csv
import json

import pytest

import visae.select
from visae.config import ConfigError
from visae.select import SelectConfig, SelectError, leaderboard, main, select
from visae.sweep import SweepSelection

N = 1000
CLEAN = 0.9
# name: (zero-shot top-1 of the reconstructions, L0, dead fraction); drop = 100 * (0.9 - top1) points
TRIALS = {
    "a": (0.870, 10.0, 0.0),  # sparse, drop 3.0
    "b": (0.892, 20.0, 0.0),  # drop 0.8
    "c": (0.895, 20.0, 0.0),  # same L0 as b, drop 0.5: wins the tie (higher score)
    "d": (0.900, 40.0, 0.0),  # drop 0: the best score
    "e": (0.899, 5.0, 0.5),  # the sparsest, drop 0.1, but half its latents dead
}


def _score(top1, l0, dead, n=N):
    return {"key": {"format": "test", "n": n},
            "result": {"n": n, "clean": {"top1": CLEAN, "top5": 1.0},
                       "recon": {"top1": top1, "top5": 1.0, "l0": l0, "dead_fraction": dead,
                                 "explained_variance": 0.9, "delta_top1": top1 - CLEAN}}}


def _scores(trials=TRIALS):
    return {k: _score(*v) for k, v in trials.items()}


def _sweep(tmp_path, trials=TRIALS, **selection):
    """A sweep directory holding a plan and finished trials (cfg.json + a weights file), no real SAEs."""
    sw = tmp_path / "sw"
    sel = {"val_shards": "", "metric": "zeroshot_top1", "max_l0": None, "max_dead": None, "rule": "best",
           "max_drop": None, **selection}
    plan = {"format": "visae.sweep", "version": 2, "config": {"selection": sel},
            "train_config": {"shards": str(tmp_path / "shards"), "val_fraction": 0.1, "seed": 0},
            "world_size": 1,
            "trials": [{"name": k, "expansion": 2, "lr": 1e-3, "l1_coeff": 1e-4} for k in trials],
            "groups": [{"name": "exp2", "expansion": 2, "trials": list(trials)}]}
    sw.mkdir()
    (sw / "sweep.json").write_text(json.dumps(plan))
    for k in trials:
        d = sw / "trials" / k
        d.mkdir(parents=True)
        (d / "cfg.json").write_text(json.dumps({"extra": {"finished": True, "sweep": {
            "trial": k, "expansion": 2, "lr": 1e-3, "l1_coeff": 1e-4}}}))
        (d / "weights.safetensors").write_bytes(k.encode())
    return sw


@pytest.fixture
def fake_scores(monkeypatch):
    """Replace scoring by the constructed scores; ``calls`` counts how often scoring was asked for."""
    calls = []

    def fake(out, names=None, **kw):
        calls.append(out)
        return _scores()

    monkeypatch.setattr(visae.select, "score_trials", fake)
    return calls


def _csv(sw):
    with open(sw / "leaderboard.csv") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- the rule on a constructed leaderboard


def test_sparsest_within_picks_the_lowest_l0_within_the_tolerance(tmp_path):
    _sweep(tmp_path)
    by = lambda rows: {r["trial"]: r for r in rows}  # noqa: E731
    # drop in points is computed from the accuracies (0.9 - 0.895 = 0.5 points, up to float rounding)
    rows = leaderboard(tmp_path / "sw", _scores(), "zeroshot_top1", None, max_dead=0.1, rule="sparsest_within",
                       max_drop=1.0)
    r = by(rows)
    for k, (top1, _, _) in TRIALS.items():
        assert abs(r[k]["drop_pts"] - 100 * (CLEAN - top1)) <= 1e-12, (k, r[k]["drop_pts"])
    # e is the sparsest and within the tolerance, but max_dead excludes it; a is over the tolerance; b and c tie
    # on L0 and c has the higher score
    assert [x["trial"] for x in rows if x["chosen"]] == ["c"]
    assert [x["trial"] for x in rows[:3]] == ["c", "b", "d"]  # the qualifying trials, sparsest first
    assert {k: r[k]["within_max_drop"] for k in "abcde"} == {"a": False, "b": True, "c": True, "d": True, "e": True}
    assert not r["a"]["feasible"] and "drop 3.00 pts > max_drop 1" in r["a"]["excluded_by"]
    assert not r["e"]["feasible"] and "dead" in r["e"]["excluded_by"] and "drop" not in r["e"]["excluded_by"]
    # a tolerance exactly at a trial's drop admits it despite float rounding (100 * (0.9 - 0.87) = 3.0000000000000027)
    assert 100 * (CLEAN - 0.870) > 3.0
    rows = leaderboard(tmp_path / "sw", _scores(), "zeroshot_top1", None, 0.1, "sparsest_within", 3.0)
    assert rows[0]["trial"] == "a" and rows[0]["chosen"] and by(rows)["a"]["within_max_drop"]
    # without the dead-fraction constraint the sparsest trial within tolerance is e
    rows = leaderboard(tmp_path / "sw", _scores(), "zeroshot_top1", None, None, "sparsest_within", 1.0)
    assert rows[0]["trial"] == "e" and rows[0]["chosen"]
    # rule best on the same trials: the highest score, within_max_drop not applicable
    rows = leaderboard(tmp_path / "sw", _scores(), "zeroshot_top1", None, 0.1)
    assert rows[0]["trial"] == "d" and rows[0]["chosen"] and all(x["within_max_drop"] is None for x in rows)


def test_no_trial_within_the_tolerance_chooses_none(tmp_path):
    _sweep(tmp_path)
    rows = leaderboard(tmp_path / "sw", _scores(), "zeroshot_top1", None, 0.1, "sparsest_within", 0.0)
    # d's drop is exactly 0 and qualifies at max_drop 0; without d nothing does
    assert [x["trial"] for x in rows if x["chosen"]] == ["d"]
    scores = {k: v for k, v in _scores().items() if k != "d"}
    rows = leaderboard(tmp_path / "sw", scores, "zeroshot_top1", None, 0.1, "sparsest_within", 0.0)
    assert not any(x["chosen"] for x in rows) and not any(x["feasible"] for x in rows)


def test_drop_standard_error_is_the_paired_one():
    """The drop's standard error from the discordant counts: Var(clean_hit - recon_hit) / n over n examples, where the
    difference is +1 on `lost` examples, -1 on `gained` ones, 0 elsewhere."""
    from visae.select import drop_standard_error

    n, lost, gained = 10_000, 400, 200
    diffs = [1] * lost + [-1] * gained + [0] * (n - lost - gained)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / n  # the population variance of the per-example difference
    want = 100 * (var / n) ** 0.5
    # both sides are sums of n terms of size <= 1: relative rounding of a few n * eps at most
    assert drop_standard_error(lost, gained, n) == pytest.approx(want, rel=8 * n * 2.0 ** -52)
    assert drop_standard_error(0, 0, 5) == 0.0  # nothing changed: the drop is known exactly
    # far smaller than the unpaired error of two accuracies of 0.69 on 10,000 examples each (0.65 points)
    assert drop_standard_error(300, 300, 10_000) < 0.25 < 100 * (2 * 0.69 * 0.31 / 10_000) ** 0.5
    for bad in ((1, 1, 0), (-1, 0, 10), (6, 5, 10)):
        with pytest.raises(ValueError, match="drop_standard_error"):
            drop_standard_error(*bad)


def test_a_drop_within_two_standard_errors_of_max_drop_is_borderline(tmp_path):
    """Under sparsest_within each row carries its drop's paired standard error (from the cached discordant counts)
    and `borderline` when the drop is within 2 of them of max_drop; select says so (selection.json, the command's
    note, leaderboard.md). Without the counts (a score cached by an older visae) both are None."""
    _sweep(tmp_path)
    scores = _scores()
    # discordant counts consistent with each trial's drop (lost - gained = drop * n), 8 changed answers each
    # beyond the net loss: SE = 100 sqrt(lost + gained - (lost - gained)^2 / n) / n
    for k, (top1, _, _) in TRIALS.items():
        net = round((CLEAN - top1) * N)
        scores[k]["result"]["recon"].update({"lost_top1": net + 4, "gained_top1": 4})
    rows = {r["trial"]: r for r in leaderboard(tmp_path / "sw", scores, "zeroshot_top1", None, 0.1, "sparsest_within",
                                               1.0)}
    from visae.select import drop_standard_error

    for k in "abcde":
        net = round((CLEAN - TRIALS[k][0]) * N)
        assert rows[k]["drop_se_pts"] == drop_standard_error(net + 4, 4, N)
    # |drop - 1.0| against 2 SE: b 0.2 vs 0.80, c 0.5 vs 0.72 (borderline); a 2.0 vs 1.22, d 1.0 vs 0.57, e 0.9 vs 0.60
    assert {k for k, r in rows.items() if r["borderline"]} == {"b", "c"}
    # rule best: no tolerance, no borderline
    best = leaderboard(tmp_path / "sw", scores, "zeroshot_top1", None, 0.1)
    assert all(r["borderline"] is None for r in best) and all(r["drop_se_pts"] is not None for r in best)
    # an old cache without the counts
    old = leaderboard(tmp_path / "sw", _scores(), "zeroshot_top1", None, 0.1, "sparsest_within", 1.0)
    assert all(r["drop_se_pts"] is None and r["borderline"] is None for r in old)


def test_select_reports_borderline_trials(tmp_path, monkeypatch, capsys):
    _sweep(tmp_path, rule="sparsest_within", max_drop=1.0)
    scores = _scores()
    for k, (top1, _, _) in TRIALS.items():
        scores[k]["result"]["recon"].update({"lost_top1": round((CLEAN - top1) * N) + 4, "gained_top1": 4})
    monkeypatch.setattr(visae.select, "score_trials", lambda out, names=None, **kw: scores)
    assert main(["--sweep", str(tmp_path / "sw"), "--max_dead", "0.1"]) == 0
    out = capsys.readouterr().out
    sel = json.loads((tmp_path / "sw" / "selection.json").read_text())
    assert sel["trial"] == "c" and sel["borderline"] == ["c", "b"]  # in the leaderboard's order
    assert "cannot tell whether they are within the tolerance" in out and "score within 2 standard errors" not in out
    md = (tmp_path / "sw" / "leaderboard.md").read_text()
    assert "borderline" in md and "drop_se_pts" in md
    assert {r["trial"]: r["borderline"] for r in _csv(tmp_path / "sw")}["b"] == "True"
    assert sel["n_drop_se_unknown"] == 0
    # a denser trial's side of the tolerance cannot change the choice: at max_drop 0.5 c (drop 0.5, L0 20) is chosen;
    # d (drop 0, SE 0.28, L0 40) is borderline in its row but not listed; e (drop 0.1, L0 5) is excluded by max_dead
    assert main(["--sweep", str(tmp_path / "sw"), "--max_dead", "0.1", "--max_drop", "0.5"]) == 0
    sel = json.loads((tmp_path / "sw" / "selection.json").read_text())
    rows = {r["trial"]: r for r in _csv(tmp_path / "sw")}
    assert sel["trial"] == "c" and rows["d"]["borderline"] == "True" and rows["e"]["borderline"] == "True"
    assert sel["borderline"] == ["c", "b"], sel["borderline"]
    # scores without the counts (cached by an older visae): unknown, said, not "none borderline"
    monkeypatch.setattr(visae.select, "score_trials", lambda out, names=None, **kw: _scores())
    capsys.readouterr()
    assert main(["--sweep", str(tmp_path / "sw"), "--max_dead", "0.1"]) == 0
    sel = json.loads((tmp_path / "sw" / "selection.json").read_text())
    assert sel["borderline"] is None and sel["n_drop_se_unknown"] == 3  # a (drop-excluded), b, c: d is denser
    assert "standard error is unknown for 3 trial(s)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- select(): outputs


def test_select_records_the_rule_and_draws_the_drop_plot(tmp_path, fake_scores):
    sw = _sweep(tmp_path)
    info = select(SelectConfig(sweep=str(sw), rule="sparsest_within", max_drop=1.0, max_dead=0.1, progress=False))
    assert info["trial"] == "c" and info["rule"] == "sparsest_within" and info["max_drop"] == 1.0
    assert abs(info["drop_pts"] - 0.5) <= 1e-12 and info["n_within_max_drop"] == 3
    for f in (sw / "selection.json", sw / "best" / "selection.json"):
        doc = json.loads(f.read_text())
        assert (doc["trial"], doc["rule"], doc["max_drop"], doc["drop_plot"]) == ("c", "sparsest_within", 1.0,
                                                                                  "drop_vs_l0.png")
    md = (sw / "leaderboard.md").read_text()
    assert "Rule: **sparsest_within**, max_drop 1 points" in md and "| drop_pts | within_max_drop |" in md
    assert "Chosen: **c**." in md
    rows = _csv(sw)
    assert [r["trial"] for r in rows][:3] == ["c", "b", "d"] and rows[0]["chosen"] == "True"
    assert {r["trial"]: r["within_max_drop"] for r in rows}["a"] == "False"
    # the plot is a real PNG of the size matplotlib was asked for (7 x 4.8 in at 120 dpi)
    import matplotlib.image

    png = sw / "drop_vs_l0.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[:2] == (576, 840)
    # the summary says which rule chose and with which tolerance
    text = visae.select.format_selection(info, sw)
    assert "rule sparsest_within" in text and "max_drop 1 points" in text and "drop_vs_l0.png" in text
    # back to rule best: the highest score, max_drop not applied and recorded as null
    info = select(SelectConfig(sweep=str(sw), max_dead=0.1, progress=False))
    assert (info["trial"], info["rule"], info["max_drop"]) == ("d", "best", None)
    assert "Rule: **best**" in (sw / "leaderboard.md").read_text()
    assert png.is_file()


def test_the_summary_reports_the_metrics_own_k(tmp_path, fake_scores):
    """Selected by zeroshot_top5, the summary line and the leaderboard give top-5 figures, not top-1 ones."""
    sw = _sweep(tmp_path)
    info = select(SelectConfig(sweep=str(sw), metric="zeroshot_top5", progress=False))
    text = visae.select.format_selection(info, sw)
    assert "clean zero-shot top-5 1.0000; reconstruction top-5 1.0000 (+0.0000)" in text and "top-1" not in text
    assert "Clean zero-shot top-5 of the original embeddings: 1.0000." in (sw / "leaderboard.md").read_text()
    info = select(SelectConfig(sweep=str(sw), progress=False))  # zeroshot_top1: its own line
    assert "clean zero-shot top-1 0.9000; reconstruction top-1 0.9000 (+0.0000)" in visae.select.format_selection(info, sw)
    assert "Clean zero-shot top-1 of the original embeddings: 0.9000." in (sw / "leaderboard.md").read_text()


def test_the_sweep_plan_sets_the_rule_and_the_command_may_override_it(tmp_path, fake_scores):
    sw = _sweep(tmp_path, rule="sparsest_within", max_drop=1.0, max_dead=0.1)
    info = select(SelectConfig(sweep=str(sw), progress=False))
    assert (info["trial"], info["rule"], info["max_drop"]) == ("c", "sparsest_within", 1.0)
    info = select(SelectConfig(sweep=str(sw), max_drop=3.0, progress=False))  # the plan's rule, another tolerance
    assert (info["trial"], info["max_drop"]) == ("a", 3.0)
    info = select(SelectConfig(sweep=str(sw), rule="best", progress=False))  # the plan's max_drop is not applied
    assert (info["trial"], info["rule"], info["max_drop"]) == ("d", "best", None)


def test_no_trial_within_the_tolerance_is_an_error_that_keeps_the_previous_selection(tmp_path, fake_scores, capsys):
    sw = _sweep(tmp_path)
    select(SelectConfig(sweep=str(sw), progress=False))
    before = (sw / "selection.json").read_bytes(), (sw / "best" / "selection.json").read_bytes()
    # max_l0 15 leaves a (drop 3.0) and e (drop 0.1, dead 0.5); max_dead 0.1 removes e: nothing within 1 point
    with pytest.raises(SelectError, match=r"no finished trial has a zero-shot drop within max_drop 1 points.*"
                                          r"smallest drop among trials meeting the other constraints is 3\.00 points "
                                          r"\(a, L0 10\.0\).*previous selection.json and best/, which holds d, are kept"):
        select(SelectConfig(sweep=str(sw), rule="sparsest_within", max_drop=1.0, max_l0=15, max_dead=0.1,
                            progress=False))
    assert ((sw / "selection.json").read_bytes(), (sw / "best" / "selection.json").read_bytes()) == before
    md = (sw / "leaderboard.md").read_text()
    assert "Chosen: none (no trial meets the constraints with a drop of at most 1 points" in md
    assert "`best/` still holds **d**, chosen by an earlier selection (rule best" in md  # what the reader finds there
    assert not any(r["chosen"] == "True" for r in _csv(sw))
    # the command: exit 2 and the reason on one line
    assert main(["--sweep", str(sw), "--rule", "sparsest_within", "--max_drop", "1", "--max_l0", "15",
                 "--max_dead", "0.1", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "raise --max_drop or select with --rule best" in err


def test_a_held_out_split_that_rounds_to_no_row_is_refused(tmp_path):
    """Selecting on the training split's held-out part when val_fraction x rows rounds to 0 (as ShardSet.split
    rounds) is a clear SelectError, not a score over no examples."""
    import numpy as np

    from visae.shards import ShardWriter

    x = np.eye(8, dtype=np.float32)[np.arange(64) % 8]
    with ShardWriter(tmp_path / "shards", 8, source={"model": "m"}) as w:
        w.add(x, ids=[str(i) for i in range(64)])
    sw = _sweep(tmp_path)
    doc = json.loads((sw / "sweep.json").read_text())
    doc["train_config"]["val_fraction"] = 0.005
    (sw / "sweep.json").write_text(json.dumps(doc))
    with pytest.raises(SelectError, match=r"val_fraction 0.005 of the 64 rows of .* holds out none"):
        select(SelectConfig(sweep=str(sw), progress=False))


# ----------------------------------------------------------------------------- bad settings, refused before any work


@pytest.mark.parametrize("argv,expect", [
    (["--max_drop", "-1"], "max_drop must be >= 0"),
    (["--rule", "sparsest_within", "--max_drop", "-0.5"], "max_drop must be >= 0"),
    (["--rule", "nearest"], "rule must be one of"),
    (["--rule", "best", "--max_drop", "1"], "applies only with rule sparsest_within"),
    (["--max_drop", "1"], "applies only with --rule sparsest_within"),  # the sweep's rule is best
    (["--rule", "sparsest_within"], "needs --max_drop"),
    (["--rule", "sparsest_within", "--max_drop", "1", "--metric", "explained_variance"], "needs a zero-shot metric"),
])
def test_bad_rule_settings_exit_2_with_one_line_before_scoring(tmp_path, fake_scores, capsys, argv, expect):
    sw = _sweep(tmp_path)
    assert main(["--sweep", str(sw), "--no_progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("visae select: error:") and expect in err, err
    assert fake_scores == [] and not (sw / "leaderboard.md").exists()


def test_a_planned_rule_the_metric_cannot_serve_is_named_as_the_plans(tmp_path, fake_scores, capsys):
    """--metric explained_variance on a sweep planned with sparsest_within: the error says the rule came from the
    plan (the user never passed --rule) and how to select by that metric."""
    sw = _sweep(tmp_path, rule="sparsest_within", max_drop=1.0)
    assert main(["--sweep", str(sw), "--metric", "explained_variance", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert ("--rule sparsest_within (the sweep's planned rule; select with --rule best to choose by "
            "explained_variance) needs a zero-shot metric") in err and fake_scores == []


@pytest.mark.parametrize("kw,expect", [
    (dict(rule="sparsest_within"), "needs max_drop"),
    (dict(max_drop=1.0), "applies only with rule sparsest_within"),
    (dict(rule="sparsest_within", max_drop=-1.0), "must be >= 0"),
    (dict(rule="sparsest_within", max_drop=float("nan")), "must be >= 0"),
    (dict(rule="sparsest_within", max_drop=1.0, metric="explained_variance"), "needs a zero-shot metric"),
    (dict(max_dead=2.0), r"max_dead = 2.0: expected a fraction in \[0, 1\]"),
    (dict(max_dead=-0.1), r"max_dead = -0.1: expected a fraction"),
])
def test_sweep_selection_refuses_bad_rule_settings(kw, expect):
    with pytest.raises(ConfigError, match=expect):
        SweepSelection(**kw)
    SweepSelection(rule="sparsest_within", max_drop=0.0)  # zero tolerance is allowed


def test_a_degenerate_trial_is_never_chosen(tmp_path):
    """A diverged trial (every latent dead, EV -1.7e8: what a sweep with lr 100 trained) tied on score with working
    ones won the lower-L0 tie-break with its L0 of 0; it is infeasible under every rule, and says why. A short run
    slightly below EV 0 is kept."""
    trials = {"ok": (0.80, 20.0, 0.0), "dead": (0.80, 0.0, 1.0), "neg": (0.79, 10.0, 0.0), "short": (0.78, 5.0, 0.0)}
    _sweep(tmp_path, trials)
    scores = _scores(trials)
    scores["dead"]["result"]["recon"]["explained_variance"] = -1.7e8
    scores["neg"]["result"]["recon"]["explained_variance"] = -3.0  # diverged with live latents
    scores["short"]["result"]["recon"]["explained_variance"] = -0.05
    for rule, kw in (("best", {}), ("sparsest_within", {"max_drop": 50.0})):
        rows = {r["trial"]: r for r in leaderboard(tmp_path / "sw", scores, "zeroshot_top1", None, None, rule=rule, **kw)}
        assert not rows["dead"]["feasible"] and "every latent dead (L0 0)" in rows["dead"]["excluded_by"]
        assert "explained variance -1.7e+08 < -1" in rows["dead"]["excluded_by"]
        assert not rows["neg"]["feasible"] and "explained variance -3 < -1 (diverged)" == rows["neg"]["excluded_by"].split("; ")[-1].removeprefix("degenerate: ")
        assert rows["short"]["feasible"]
        assert [k for k, r in rows.items() if r["chosen"]] == (["ok"] if rule == "best" else ["short"])


def test_a_sweep_of_degenerate_trials_only_says_so(tmp_path, fake_scores, monkeypatch):
    """When every trial diverged the error blamed constraints that were not set; it now says every trial is
    degenerate and what to change, and the leaderboard's table shows why each trial is excluded."""
    trials = {"a": (0.2, 0.0, 1.0), "b": (0.2, 0.0, 1.0)}
    sw = _sweep(tmp_path, trials)
    monkeypatch.setattr(visae.select, "score_trials", lambda out, names=None, **kw: _scores(trials))
    with pytest.raises(SelectError, match=r"every one of the 2 trials is degenerate .*lower lr or lambda"):
        select(SelectConfig(sweep=str(sw), progress=False))
    md = (sw / "leaderboard.md").read_text()
    assert "excluded_by" in md and "degenerate: every latent dead (L0 0)" in md


def test_reselecting_a_demos_sweep_says_the_demo_is_stale(tmp_path):
    """visae select on <demo>/sweep that changes best/: the demo's names, site and recovery describe the old trial,
    and the command says how to refresh them (only then: same trial, or a sweep outside a demo, say nothing)."""
    sw = tmp_path / "demo" / "sweep"
    sw.mkdir(parents=True)
    assert visae.select._demo_note(sw, {"trial": "a"}, {"trial": "b"}) is None  # not a demo's sweep
    (tmp_path / "demo" / "demo_state.json").write_text("{}")
    note = visae.select._demo_note(sw, {"trial": "a"}, {"trial": "b"})
    assert note and "made from the previous choice (a)" in note and f"visae demo --out {tmp_path / 'demo'}" in note
    assert visae.select._demo_note(sw, {"trial": "b"}, {"trial": "b"}) is None
    assert visae.select._demo_note(sw, None, {"trial": "b"}) is None
