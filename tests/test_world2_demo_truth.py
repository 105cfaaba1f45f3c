"""Issue 12's ground truth on the shipped v2 toy CLIP: the demo on its default world (world2), run once as a user runs
it (``visae demo --distractors ../shared/vocab/20k.txt``), judged by the world.

- item 2: the selection benchmark (253 colour-family x shape classes) is not saturated: clean top-1 in [0.40, 0.85],
  and the sweep's reconstructions spread over >= 5 points of zero-shot accuracy among trials with EV >= 0.7;
- item 4: Spearman(selection score, recovery) >= 0.5 over the sweep's 8 trials, and the selected SAE within one
  factor value of the best trial's recovery (recovery: values with a latent at AUROC >= 0.95 named right);
- item 5: with the 20k Discover-then-Name list as distractors (none of them a training negative of the model:
  tests/test_toyclip2_shipped.py), >= 70 % of the recovered values (AUROC >= 0.95) are named right; precision:
  the latents named with a word that names no value they detect are counted.

Measured at seed 0 with the shipped weights of world format 2 (BENCHMARKS.md, "world2: selection against the ground
truth"): clean 0.612, spread 7.2 points, Spearman 0.65, selected 20 = best 20, 20 of 22 recovered values named right
(91 %; 347 of 384 named latents carry a name no value supports). Before the background phrases entered the
vocabulary (visae.demo.world2_vocabulary) the same demo named 12 of 22 right: its 8 background latents got
distractors. The previous weights (format 1): clean 0.577, spread 7.4, Spearman 0.81, 13 = best 13, 13 of 17.
The demo (conftest.world2_demo_dir, shared with the other world2 ground-truth tests) takes about 130 s on 2 idle cores.
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


def test_selection_agrees_with_the_ground_truth(world2_demo, world2_demo_dir):
    rec, _ = world2_demo
    svr = rec["selection_vs_recovery"]
    assert svr["n_trials"] == 8 and svr["spearman_score"] >= 0.5, svr
    assert svr["selected_recovery"] >= svr["best_recovery"] - 1, svr
    # the plot that shows it (score against recovery, the selected trial marked) is written beside recovery.json
    assert (world2_demo_dir / demo.RECOVERY_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"(plotted: {demo.RECOVERY_PLOT})" in (world2_demo_dir / "recovery.txt").read_text()


def test_the_20k_list_names_the_recovered_values(world2_demo):
    rec, _ = world2_demo
    found = [v for v in rec["values"] if v["auroc"] >= 0.95]
    right = [v for v in found if v["name_correct"]]
    assert len(found) >= 10, [(v["factor"], v["value"], v["auroc"]) for v in rec["values"]]
    assert len(right) >= 0.70 * len(found), [(v["value"], v["name"]) for v in found if not v["name_correct"]]
    # Precision: the latents whose name names no factor value they detect (AUROC >= 0.9) are counted; the best
    # latent of a recovered value named right is never one of them.
    s = rec["summary"]
    assert 0 <= s["n_unsupported_names"] <= s["n_named_latents"] - len({v["best_latent"] for v in right}), s
