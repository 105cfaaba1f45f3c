"""benchmarks/bench_selection_truth.py's scan of rule sparsest_within (issue 12 item 4: why no zero-shot tolerance
selects within one value of the best in every seed), on the figures of seed 1 of BENCHMARKS.md's table."""

import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_selection_truth as bst  # noqa: E402

sys.path.remove(str(REPO / "benchmarks"))

# seed 1 (/tmp/selt_k5): trial, zero-shot score, L0, recovery; clean accuracy 0.628
_SEED1 = [("x4_1e-4", 0.629, 112.7, 12), ("x8_1e-4", 0.620, 138.0, 13), ("x4_3e-4", 0.609, 73.0, 19),
          ("x8_3e-4", 0.620, 96.6, 19), ("x4_1e-3", 0.612, 34.4, 10), ("x8_1e-3", 0.616, 48.0, 14),
          ("x4_3e-3", 0.554, 17.1, 1), ("x8_3e-3", 0.553, 22.5, 0)]


def _rows(spec, clean=0.628):
    return [{"trial": t, "score": s, "l0": l0, "recovery": r, "clean_top1": clean} for t, s, l0, r in spec]


def test_max_drop_windows_follow_the_sparsest_trial_within_tolerance():
    windows, steps = bst.max_drop_windows(_rows(_SEED1))
    # as max_drop grows the rule takes ever sparser trials; only x8_3e-4 (recovery 19 = best) is within one of it
    assert [s["trial"] for s in steps] == ["x4_1e-4", "x8_3e-4", "x8_1e-3", "x4_1e-3", "x4_3e-3"]
    assert [round(s["from"], 6) for s in steps] == [-0.1, 0.8, 1.2, 1.6, 7.4]
    assert [(round(a, 6), round(b, 6)) for a, b in windows] == [(0.8, 1.2)]


def test_windows_of_several_seeds_intersect_and_an_unscored_trial_is_left_out():
    rows = _rows(_SEED1) + [{"trial": "nan", "score": math.nan, "l0": 1.0, "recovery": 0, "clean_top1": 0.628},
                            {"trial": "noclean", "score": 0.5, "l0": 2.0, "recovery": 0, "clean_top1": None}]
    windows, steps = bst.max_drop_windows(rows)
    assert [(round(a, 6), round(b, 6)) for a, b in windows] == [(0.8, 1.2)]
    assert bst._intersect(windows, [(1.0, math.inf)]) == [(1.0, windows[0][1])]
    assert bst._intersect(windows, [(2.0, 4.6)]) == []
    # the sparser trial recovers more but loses 2 points: only a tolerance of 2 points or more takes it
    assert bst.max_drop_windows(_rows([("a", 0.6, 10.0, 5), ("b", 0.62, 50.0, 3)], clean=0.62))[0] == [(2.0, math.inf)]
    assert bst.max_drop_windows(_rows([("a", 0.6, 10.0, 5), ("b", 0.62, 50.0, 4)], clean=0.62))[0] == [(0.0, math.inf)]
