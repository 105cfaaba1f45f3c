"""Issue 12's ground truth on world2's shipped toy CLIP (``visae-toyclip2-reg4``): the demo on its default world (world2), run once as a user runs
it (``visae demo --distractors ../shared/vocab/20k.txt``), judged by the world.

- item 2: the selection benchmark (253 colour-family x shape classes) is not saturated: clean top-1 in [0.40, 0.85],
  and the sweep's reconstructions spread over >= 5 points of zero-shot accuracy among trials with EV >= 0.7;
- item 4: the demo selects by rule sparsest_within (the sparsest trial whose zero-shot accuracy on its own 10,000-scene
  selection world is <= 2.0 points below clean; visae.demo.DEMO_MAX_DROP); Spearman(the rule's order, recovery) >= 0.5
  over the sweep's 8 trials (recovery: values with a latent at AUROC >= 0.95 named right) and the rule's contract on
  the demo's leaderboard; the selected SAE within one value of the best is a non-strict xfail: it holds on the machine
  measured, with a margin another machine's float summation order may not keep (below);
- item 5: with the 20k Discover-then-Name list as distractors (none of them a training negative of the model:
  tests/test_toyclip2_shipped.py), >= 70 % of the values found (best latent at AUROC >= 0.95) are named right, pooled
  over the sweep's 8 SAEs (the selected SAE's own share is a non-strict xfail, for the same reason); precision: the
  latents named with a word that names no value they detect are counted.

Measured with world2's model since 2026-12-01 23:00 UTC, ``visae-toyclip2-reg4`` (BENCHMARKS.md, "Selection since
2026-12-02" and "Naming with the captions' article"), on an AMD EPYC machine (torch's AVX512 kernels), seeds 0-8:
clean 0.685-0.703 on the selection world, spread 7.6-8.5 points, the chosen trial exp4 lambda 3e-4 (drop 0.86-1.37
points) = the best trial in 9 of 9 seeds; the rule and its tolerance were fixed before seeds 6-8 ran and selected the
best there (a first tolerance, 1.5 points on 5,000 scenes, failed on seeds 3-5). Recovery with the demo's naming
(each word embedded as "a {}", fixed on seed 0 and judged on seeds 1-8): seed 0 (this demo's) selected 24 = best 24,
Spearman of the rule's order 0.72 (0.61-0.92 over the nine seeds, pooled 0.77; of the zero-shot score alone 0.51 here,
pooled 0.57: the score follows fidelity, the densest trials split values over more latents); found values named right
by the selected SAE 24 of 24 (207 of 222 over the nine seeds), by the sweep's 8 SAEs 91 of 95 (seeds 1-8: 803 of 881,
91 %; with bare words 78 %); at seed 0 341 of the 384 named latents carry a name no value supports. The demo
(conftest.world2_demo_dir, shared with the other world2 ground-truth tests) takes about 105 s on 2 idle cores.
"""

from __future__ import annotations

import csv
import json

import pytest

from visae import demo


@pytest.fixture(scope="module")
def world2_demo(world2_demo_dir):
    """(recovery.json, the sweep's leaderboard rows) of the session's world2 demo (conftest.world2_demo_dir)."""
    rec = json.loads((world2_demo_dir / "recovery.json").read_text())
    with open(world2_demo_dir / "sweep" / "leaderboard.csv", newline="") as f:
        board = list(csv.DictReader(f))
    return rec, board


def test_the_selection_benchmark_is_not_saturated(world2_demo):
    _, board = world2_demo
    clean = {float(r["clean_top1"]) for r in board}
    assert len(clean) == 1 and 0.40 <= clean.pop() <= 0.85, clean
    ok = [float(r["score"]) for r in board if float(r["explained_variance"]) >= 0.7]
    assert len(ok) >= 2 and max(ok) - min(ok) >= 0.05, ok


def test_selection_follows_the_ground_truth(world2_demo, world2_demo_dir):
    """Item 4's correlation: Spearman(the selection rule's order, recovery) >= 0.5 over the sweep's 8 trials, at seed
    0 (this demo's). The demo selects by rule sparsest_within (the sparsest trial whose zero-shot accuracy on its
    10,000-scene selection world is <= 2.0 points below clean), fixed before seeds 6-8 judged it: there 0.80 / 0.75 /
    0.78 with bare-word names and 0.92 / 0.67 / 0.92 with the demo's "a {}" names, the best trial selected in every
    seed; at seed 0 0.72 (module docstring). The zero-shot score alone follows fidelity, not recovery: 0.51 at seed 0,
    0.36-0.63 at seeds 6-8."""
    rec, _ = world2_demo
    svr = rec["selection_vs_recovery"]
    print({k: svr[k] for k in ("spearman_score", "spearman_rule", "selected_recovery", "best_recovery")})
    assert svr["n_trials"] == 8 and svr["spearman_rule"] >= 0.5, svr
    # the plot that shows it (score against recovery, the selected trial marked) is written beside recovery.json
    assert (world2_demo_dir / demo.RECOVERY_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"(plotted: {demo.RECOVERY_PLOT})" in (world2_demo_dir / "recovery.txt").read_text()


def test_the_demo_selects_the_sparsest_trial_within_its_tolerance(world2_demo, world2_demo_dir):
    """The rule as the demo applies it, on its own selection world (10,000 scenes of seed + 9000, not the SAEs'
    training world): the chosen trial's zero-shot drop below clean is <= max_drop (2.0 points), every sparser trial's
    is above it, and the sweep draws the drop against L0 (the plot item 4 asks for, the chosen trial marked)."""
    _, board = world2_demo
    sel = json.loads((world2_demo_dir / "sweep" / "selection.json").read_text())
    assert sel["rule"] == "sparsest_within" and sel["max_drop"] == demo.DEMO_MAX_DROP == 2.0, sel
    n_val = {int(r["n_val"]) for r in board}
    assert n_val == {10000}, n_val  # scored on the selection world, not the 1,000 held out of the training shards
    chosen = next(r for r in board if r["chosen"] == "True")
    assert float(chosen["drop_pts"]) <= 2.0, chosen
    sparser = [r for r in board if float(r["l0"]) < float(chosen["l0"])]
    assert sparser and all(float(r["drop_pts"]) > 2.0 for r in sparser), [(r["trial"], r["drop_pts"]) for r in sparser]
    assert (world2_demo_dir / "sweep" / "drop_vs_l0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each drop carries its paired standard error; the trials within 2 of them of the tolerance are named (measured
    # at seed 0: 0.24 points for the chosen trial, 0.30 for the two lambda 1e-3 trials, both borderline at 2.24-2.41)
    se = {r["trial"]: float(r["drop_se_pts"]) for r in board}
    assert all(0.0 < v < 0.5 for v in se.values()), se  # 10,000 paired examples: well under the unpaired 0.65
    # listed: the chosen trial and the sparser ones (a denser trial's side of the tolerance cannot change the choice)
    border = {r["trial"] for r in board if abs(float(r["drop_pts"]) - 2.0) <= 2 * se[r["trial"]]
              and float(r["l0"]) <= float(chosen["l0"])}
    assert set(sel["borderline"]) == border and sel["n_drop_se_unknown"] == 0, (sel["borderline"], border)
    summary = json.loads((world2_demo_dir / "demo.json").read_text())["stages"]["sweep"]["selection"]
    assert summary["borderline"] == sel["borderline"]


@pytest.mark.xfail(strict=False, reason="not asserted on every machine (issue 12 item 4): the rule selects the best "
                                        "trial in 9 of 9 seeds on the AMD EPYC machine of 2026-12-02 (held-out seeds "
                                        "6-8: 3 of 3), but the next sparser trial's drop is only 0.03-0.85 points "
                                        "above the tolerance (seed 1: 2.03; seed 0, this demo's: 2.24), within what "
                                        "another float summation order moves")
def test_the_selected_sae_is_within_one_value_of_the_best(world2_demo):
    svr = world2_demo[0]["selection_vs_recovery"]
    assert svr["selected_recovery"] >= svr["best_recovery"] - 1, svr


def test_the_20k_list_names_the_recovered_values(world2_demo):
    """Item 5 over the sweep's 8 SAEs, each named from its own weights with the demo's vocabulary: of the values whose
    best latent has AUROC >= 0.95, >= 70 % carry the value's word (or an accepted synonym). Pooled over the sweep so that
    it judges the naming, not which SAE the selection picked (item 4, above): measured on the AVX512 machine with the
    demo's "a {}" template 91 of 95 at seed 0 (bare words: 76 of 95), seeds 1-8 pooled 803 of 881 (91 %; bare words
    78 %), the selected SAE alone 24 of 24."""
    rec, _ = world2_demo
    trials = rec["sweep_trials"]
    found = sum(t["n_found"] for t in trials.values())
    right = sum(t["n_found_named_right"] for t in trials.values())
    sel = rec["summary"]
    print(f"pooled over the sweep: {right} of {found} named right; the selected SAE: {sel['n_found_named_right']} of "
          f"{sel['n_found']}")
    # measured 95-106 values found over the 8 SAEs (seeds 0-2, AVX512 machine)
    assert len(trials) == 8 and found >= 70, {k: (t["n_found"], t["n_found_named_right"]) for k, t in trials.items()}
    assert right >= 0.70 * found, {k: (t["n_found"], t["n_found_named_right"]) for k, t in trials.items()}
    # the demo's re-naming of every trial (from its weights) agrees with the naming stage's concepts on the selected one
    chosen = trials[rec["selected_trial"]]
    assert (chosen["n_found"], chosen["n_found_named_right"]) == (sel["n_found"], sel["n_found_named_right"]), sel
    # Precision: the latents whose name names no factor value they detect (AUROC >= 0.9) are counted; the best
    # latent of a recovered value named right is never one of them.
    right_sel = [v for v in rec["values"] if v["auroc"] >= 0.95 and v["name_correct"]]
    assert 0 <= sel["n_unsupported_names"] <= sel["n_named_latents"] - len({v["best_latent"] for v in right_sel}), sel


@pytest.mark.xfail(strict=False, reason="not asserted on every machine (issue 12 item 5 on the selected SAE alone): "
                                        "19-27 of 22-29 found values named right by the chosen trial at seeds 0-8 "
                                        "(AMD EPYC machine, 2026-12-02: 86-100 %), but which trial is chosen moves with "
                                        "the machine (the selection's xfail above)")
def test_the_selected_sae_names_70_percent_of_its_found_values(world2_demo):
    s = world2_demo[0]["summary"]
    assert s["n_found_named_right"] >= 0.70 * s["n_found"], s
