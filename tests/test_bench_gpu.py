"""benchmarks/gpu.py in its CPU mode (small shapes): every part runs and reports what the GPU run reports."""

from __future__ import annotations

import json
import sys

import torch

from visae.resources import REPO


def test_gpu_benchmark_cpu_mode_runs_every_part(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert gpu.main(["--cpu", "--json", str(tmp_path / "r.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "r.json").read_text())
    sh = gpu.SHAPES["cpu"]
    assert res["shapes"] == "cpu" and res["command"].startswith("python benchmarks/gpu.py --cpu")
    assert all(res["gemm_tflops"][k] > 0 for k in ("bf16", "tf32", "fp32"))
    # one row per (architecture, d_sae, batch, precision), plus the fit from disk
    want = {(a, d, b, p) for a in gpu.ARCHS for d in sh["d_sae"] for b in sh["batch"] for p in gpu.PRECISIONS}
    rows = res["train"]
    assert {(r["arch"], r["d_sae"], r["batch"], r["precision"]) for r in rows[:-1]} == want
    assert len(rows) == len(want) + 1 and rows[-1]["precision"] == "bf16 fit from disk"
    for r in rows:  # the derived columns follow from the measured step time
        assert r["step_ms"] > 0
        assert abs(r["act_per_s"] - r["batch"] / (r["step_ms"] / 1e3)) <= 1e-9 * r["act_per_s"]
        flops = 12 * r["batch"] * r["d_in"] * r["d_sae"]
        assert abs(r["tflops"] * 1e12 - r["act_per_s"] / r["batch"] * flops) <= 1e-9 * r["tflops"] * 1e12
    sw = res["sweep"]
    assert sw["members"] == 25 and sw["member_act_per_s"] > 0
    ex = res["extract"]
    assert ex["images"] == sh["extract"]["n"] and ex["extract_img_s"] > 0 and ex["forward_img_s"] > 0
    assert ex["gpu_decode_img_s"] is None  # no GPU decoding on the CPU
    zs = res["zeroshot"]
    assert zs["n"] == sh["zeroshot"]["n"] and 0 < zs["top5"] <= 1 and zs["top1"] <= zs["top5"]
    assert zs["top1"] > 5 / zs["classes"]  # the generated embeddings carry their class: far above chance
    err = capsys.readouterr().err
    assert "% bf16 peak" in err and "stacked sweep: 25 members" in err and "zero-shot:" in err
