"""benchmarks/benchlib.py: the machine record, alternating repeats and JSON output every benchmark shares."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import benchlib  # noqa: E402


def test_machine_record_names_this_machine():
    m = benchlib.machine_info()
    assert m["cores"] == os.cpu_count() and m["torch"] == torch.__version__
    assert m["torch_threads"] == torch.get_num_threads() and m["cpu"]
    assert (m["cuda"] is None) == (not torch.cuda.is_available())
    line = benchlib.describe_machine()
    assert f"{os.cpu_count()} cores" in line and torch.__version__ in line


def test_alternate_reverses_the_order_every_other_round_and_times_or_records():
    calls = []
    got = benchlib.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b") or 2.5,
                              "c": lambda: calls.append("c")}, 3, verbose=False)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert got["b"] == [2.5, 2.5, 2.5]  # a case's own measurement is kept
    assert all(isinstance(t, float) and 0 <= t < 1 for t in got["a"] + got["c"])  # else wall seconds
    assert benchlib.median([3.0, None, 1.0, 2.0]) == 2.0
    assert benchlib.median_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 1.0]) == 3.0
    with pytest.raises(ValueError):
        benchlib.alternate({"a": lambda: None}, 0)


def test_report_adds_machine_and_command_and_writes_json(tmp_path, capsys):
    out = benchlib.report("bench_x.py", {"speedup": 1.5}, str(tmp_path / "r" / "x.json"), ["--repeats", "1"])
    doc = json.loads((tmp_path / "r" / "x.json").read_text())
    assert doc == json.loads(capsys.readouterr().out) == json.loads(json.dumps(out))
    assert doc["speedup"] == 1.5 and doc["command"] == "python benchmarks/bench_x.py --repeats 1"
    assert doc["machine"]["cores"] == os.cpu_count()


def test_benchmarks_live_outside_the_package_and_scripts_shadow_nothing():
    assert not (REPO / "visae" / "machine.py").exists()
    assert not list((REPO / "scripts").glob("bench_*.py"))
    benches = sorted(p.name for p in (REPO / "benchmarks").glob("bench_*.py"))
    assert len(benches) >= 8
    for name in benches:
        assert "import benchlib" in (REPO / "benchmarks" / name).read_text(), name
    for folder in ("scripts", "benchmarks"):
        clash = [p.name for p in (REPO / folder).glob("*.py") if p.stem in sys.stdlib_module_names]
        assert not clash, f"{folder}/ shadows the standard library: {clash}"


def test_a_toy_benchmark_runs_the_model_its_weights_record():
    """``toy_model_and_weights``: --weights alone gives the model its safetensors metadata records (an old command
    with visae-toyclip2 weights keeps running that model, not world2's newer default); no --weights gives the shipped
    file of --model or of the default; a --model other than the file's, a model the benchmark does not run, a missing
    or non-safetensors file are refused before any work. ``check_made_with`` refuses an output of other weights."""
    from visae import toyclip as tc

    v2 = tc.V2_MODELS
    assert benchlib.toy_model_and_weights(None, None, tc.WORLD2_MODEL, v2) == (
        tc.WORLD2_MODEL, str(tc.SHIPPED_WEIGHTS[tc.WORLD2_MODEL]))
    assert benchlib.toy_model_and_weights(None, str(tc.TOYCLIP2_WEIGHTS), tc.WORLD2_MODEL, v2) == (
        "visae-toyclip2", str(tc.TOYCLIP2_WEIGHTS))
    for model, weights, msg in (("visae-toyclip2-reg4", str(tc.TOYCLIP2_WEIGHTS), "holds 'visae-toyclip2' weights"),
                                (None, str(tc.TOYCLIP_WEIGHTS), "this benchmark runs visae-toyclip2 or"),
                                (None, "/nonexistent.safetensors", "no such file"),
                                (None, str(tc.TOYCLIP2_REG4_CARD), "not a .safetensors file")):
        with pytest.raises(ValueError, match=msg):
            benchlib.toy_model_and_weights(model, weights, tc.WORLD2_MODEL, v2)
    reg4 = str(tc.SHIPPED_WEIGHTS[tc.WORLD2_MODEL])
    benchlib.check_made_with(Path("m"), {"model": tc.WORLD2_MODEL, "pretrained": "shipped"}, tc.WORLD2_MODEL, reg4)
    benchlib.check_made_with(Path("m"), {"model": tc.WORLD2_MODEL, "pretrained": reg4}, tc.WORLD2_MODEL, reg4)
    with pytest.raises(benchlib.MadeWithOtherWeights, match="made with visae-toyclip2 .*use another --out"):
        benchlib.check_made_with(Path("m"), {"model": "visae-toyclip2", "pretrained": None}, tc.WORLD2_MODEL, reg4)
