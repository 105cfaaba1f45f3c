"""The GPU paths measured in one command: trainer steps, a stacked sweep, extraction, zero-shot, against the GEMM peak.

    python benchmarks/gpu.py                 # one CUDA GPU: the shapes below, < 4 minutes on an H100-class GPU
    python benchmarks/gpu.py --cpu           # the same script on the CPU with small shapes (a test runs it)
    python benchmarks/gpu.py --json out.json [--only train,sweep,extract,zeroshot]

Nothing is downloaded: activations, images and classifiers are generated, backbones have
random weights. Every figure is measured in this run, on this device:

* ``gemm``: the bf16 (and fp32, TF32) matmul peak, 2·n³ FLOP per n×n×n product;
* ``train``: the trainer's own step (``Trainer._step``: loss, backward, decoder-gradient
  projection, Adam, decoder normalisation, dead-latent and logging bookkeeping) on a
  device-resident batch, for ReLU+L1 and TopK at d_in 768 × d_sae 16k / 64k, batch 4096 /
  16384, in fp32, TF32 and bf16 autocast; act/s = B / step time, TFLOP/s = 12·B·d_in·d_sae /
  step time, and that as a fraction of the bf16 GEMM peak. One case also runs ``fit`` from a
  float16 shard set on disk (loading, pinned-memory feed and host-to-device copies included;
  13 steps, the first ones with their one-time set-up costs, so it understates the steady rate);
* ``sweep``: a 25-member stacked group (``train_stack`` with S = 25) at d 512 × 4096, batch
  4096, bf16: member-act/s = 25 · B / step time (target on an H100/H200: >= 10 M);
* ``extract``: ``visae.extract`` over generated JPEGs with ViT-B-16 (random init), bf16,
  channels-last, 8 DataLoader workers, against the bare forward on preprocessed images
  already on the device; JPEG decoding rates on the CPU (PIL) and, where torchvision can,
  on the GPU (``torchvision.io.decode_jpeg(device="cuda")``);
* ``zeroshot``: 50k × 768 embeddings against 1,000 unit class embeddings (logits, top-1/top-5).

With ``--cpu`` the shapes shrink (d_in 32, the project's small CLIP ``visae-toyclip`` with
random weights for extraction, ...) so that it runs in seconds: it checks that the script
works, its CPU figures mean little. Results: BENCHMARKS.md (command and machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import benchlib
import numpy as np
import torch

SHAPES: dict[str, dict[str, Any]] = {
    "gpu": {"gemm_n": 8192, "d_in": 768, "d_sae": (16384, 65536), "batch": (4096, 16384), "steps": 10,
            "sweep": {"members": 25, "d": 512, "d_sae": 4096, "batch": 4096},
            "extract": {"model": "ViT-B-16", "n": 1024, "batch": 128, "workers": 8, "image_px": 320},
            "zeroshot": {"n": 50000, "d": 768, "classes": 1000}},
    "cpu": {"gemm_n": 256, "d_in": 32, "d_sae": (256,), "batch": (128,), "steps": 2,
            "sweep": {"members": 25, "d": 16, "d_sae": 64, "batch": 64},
            "extract": {"model": "visae-toyclip", "n": 8, "batch": 4, "workers": 0, "image_px": 80},
            "zeroshot": {"n": 2000, "d": 32, "classes": 50}},
}
PRECISIONS = ("fp32", "tf32", "bf16")
ARCHS = ("relu", "topk")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextmanager
def _matmul_precision(p: str) -> Iterator[None]:
    """fp32: full-precision matmuls; tf32: TF32 tensor cores for fp32 matmuls; bf16: fp32 weights, bf16 autocast."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if p == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _timed(fn: Callable[[], Any], dev: torch.device, reps: int, warm: int = 2) -> float:
    """Seconds per call of ``fn`` (after ``warm`` untimed calls), device work included."""
    for _ in range(warm):
        fn()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(dev)
    return (time.perf_counter() - t) / reps


def gemm_peaks(dev: torch.device, n: int) -> dict[str, float]:
    """TFLOP/s of an n×n×n matmul in bf16, TF32 and fp32 (2·n³ FLOP each)."""
    out = {}
    g = torch.Generator(device=dev).manual_seed(0)
    for name, dtype, prec in (("bf16", torch.bfloat16, "highest"), ("tf32", torch.float32, "high"),
                              ("fp32", torch.float32, "highest")):
        a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(prec)
        try:
            reps = 20 if dev.type == "cuda" else 3
            s = _timed(lambda a=a, b=b: torch.mm(a, b), dev, reps)
        finally:
            torch.set_float32_matmul_precision(old)
        out[name] = 2 * n ** 3 / s / 1e12
        del a, b
    return out


def _unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _shard_set(path: Path, n: int, d: int) -> Any:
    from visae.shards import ShardSet, ShardWriter

    with ShardWriter(path, d, dtype="float16", shard_size=65536) as w:
        for s in range(0, n, 65536):
            m = min(65536, n - s)
            w.add(_unit_rows(m, d, s), ids=[str(i) for i in range(s, s + m)])
    return ShardSet(path)


def _trainer(shards: Any, out: Path, dev: torch.device, arch: str, d_sae: int, batch: int, bf16: bool,
             lrs: list[float] | None = None, max_steps: int = 0) -> Any:
    from visae.train import TrainConfig, Trainer, sae_config_for

    lrs = lrs or [5e-4]
    cfg = TrainConfig(shards=str(shards.path), out=str(out), architecture=arch, expansion_factor=max(1, d_sae // shards.d),
                      k=32, batch_size=batch, num_epochs=1, max_steps=max_steps, bf16=bf16, device=str(dev),
                      b_dec_init="zeros", val_fraction=0.0, resample_every=0, progress=False, plot=False,
                      validate_shards="none", overwrite=True, log_every=10 ** 6, shuffle_buffer=4 * batch)
    outs = [out / f"m{i}" for i in range(len(lrs))] if len(lrs) > 1 else [out]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the run is shorter than its warm-ups": a benchmark, not a run
        # d_sae exactly as asked (16384 is not a multiple of 768: no --expansion_factor gives it)
        sae_cfg = dataclasses.replace(sae_config_for(cfg, shards), d_sae=d_sae)
        return Trainer(shards, sae_cfg, lrs, [3e-5] * len(lrs), cfg, outs)


def _step_rate(t: Any, dev: torch.device, batch: int, steps: int) -> float:
    """Seconds per trainer step on a fixed device-resident batch [batch, d_in]."""
    x = torch.from_numpy(_unit_rows(batch, t.sae.d_in, 1)).to(dev)
    t.sae.train()
    return _timed(lambda: t._step(x), dev, steps, warm=3 if dev.type == "cuda" else 1)


def bench_train(dev: torch.device, sh: dict[str, Any], work: Path, peak_bf16: float) -> list[dict[str, Any]]:
    """Trainer step throughput for every (architecture, d_sae, batch, precision); one fit from disk."""
    d_in, rows = sh["d_in"], []
    shards = _shard_set(work / "acts", max(sh["batch"]) * 2, d_in)
    for arch in ARCHS:
        for d_sae in sh["d_sae"]:
            for batch in sh["batch"]:
                for prec in PRECISIONS:
                    with _matmul_precision(prec):
                        t = _trainer(shards, work / "run", dev, arch, d_sae, batch, bf16=prec == "bf16")
                        s = _step_rate(t, dev, batch, sh["steps"])
                    del t
                    _free(dev)
                    tflops = 12 * batch * d_in * d_sae / s / 1e12
                    rows.append({"arch": arch, "d_in": d_in, "d_sae": d_sae, "batch": batch, "precision": prec,
                                 "step_ms": s * 1e3, "act_per_s": batch / s, "tflops": tflops,
                                 "frac_bf16_peak": tflops / peak_bf16})
                    _line(rows[-1])
    rows.append(_fit_from_disk(dev, sh, work, d_in, peak_bf16))
    return rows


def _fit_from_disk(dev: torch.device, sh: dict[str, Any], work: Path, d_in: int, peak_bf16: float) -> dict[str, Any]:
    """``Trainer.fit`` over a float16 shard set on disk (loading and host-to-device copies in the clock)."""
    batch, d_sae, steps = max(sh["batch"]), min(sh["d_sae"]), sh["steps"] + 3
    shards = _shard_set(work / "fit_acts", batch * steps, d_in)
    t = _trainer(shards, work / "fit", dev, "relu", d_sae, batch, bf16=True, max_steps=steps)
    res = t.fit()
    del t
    _free(dev)
    tflops = 12 * res.act_per_s * d_in * d_sae / 1e12
    row = {"arch": "relu", "d_in": d_in, "d_sae": d_sae, "batch": batch, "precision": "bf16 fit from disk",
           "step_ms": batch / res.act_per_s * 1e3, "act_per_s": res.act_per_s, "tflops": tflops,
           "frac_bf16_peak": tflops / peak_bf16}
    _line(row)
    return row


def _line(r: dict[str, Any]) -> None:
    print(f"  train {r['arch']:<5} {r['d_in']}x{r['d_sae']:<6} B={r['batch']:<6} {r['precision']:<18}"
          f"{r['step_ms']:>9.2f} ms {r['act_per_s']:>13,.0f} act/s {r['tflops']:>8.3g} TFLOP/s "
          f"{100 * r['frac_bf16_peak']:>6.1f}% of bf16 peak", file=sys.stderr, flush=True)


def _free(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def bench_sweep(dev: torch.device, sh: dict[str, Any], work: Path, peak_bf16: float) -> dict[str, Any]:
    """A stacked group of ``members`` SAEs trained as one (the sweep's unit of work), bf16."""
    sw = sh["sweep"]
    shards = _shard_set(work / "sweep_acts", sw["batch"] * 2, sw["d"])
    lrs = [float(v) for v in np.geomspace(1e-4, 1e-3, sw["members"])]
    t = _trainer(shards, work / "sweep", dev, "relu", sw["d_sae"], sw["batch"], bf16=True, lrs=lrs)
    s = _step_rate(t, dev, sw["batch"], sh["steps"])
    del t
    _free(dev)
    S = sw["members"]
    tflops = 12 * S * sw["batch"] * sw["d"] * sw["d_sae"] / s / 1e12
    out = {"members": S, "d": sw["d"], "d_sae": sw["d_sae"], "batch": sw["batch"], "step_ms": s * 1e3,
           "member_act_per_s": S * sw["batch"] / s, "tflops": tflops, "frac_bf16_peak": tflops / peak_bf16}
    print(f"  sweep {S} members {sw['d']}x{sw['d_sae']} B={sw['batch']}: {out['member_act_per_s']:,.0f} "
          f"member-act/s, {tflops:.3g} TFLOP/s", file=sys.stderr, flush=True)
    return out


def _write_jpegs(folder: Path, n: int, px: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:px, 0:px]
    for i in range(n):  # smooth colour fields plus noise: JPEGs of photo-like size, not all-noise
        f = rng.uniform(0.01, 0.08, size=3)
        img = np.stack([127 + 100 * np.sin(f[c] * (xx + i) + f[(c + 1) % 3] * yy) for c in range(3)], -1)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:05d}.jpg", quality=90)


def bench_extract(dev: torch.device, sh: dict[str, Any], work: Path) -> dict[str, Any]:
    """``visae.extract`` (decode in workers, bf16, channels-last) against the bare forward; JPEG decode rates."""
    from visae.backbones import load_backbone
    from visae.extract import ExtractConfig, _autocast, extract
    from visae.images import load_image, open_source

    ex = sh["extract"]
    folder = work / "jpegs"
    _write_jpegs(folder, ex["n"], ex["image_px"])
    bb = load_backbone(ex["model"], random_init=True, device=dev)
    items = open_source(str(folder)).items
    gpu = dev.type == "cuda"
    cfg = ExtractConfig(images=str(folder), out=str(work / "feat"), model=ex["model"], random_init=True,
                        batch_size=ex["batch"], num_workers=ex["workers"], device=str(dev),
                        precision="bf16" if gpu else "fp32", channels_last="true" if gpu else "false",
                        progress=False, overwrite=True)
    extract(cfg, backbone=bb)  # warm-up (and the model now channels-last as extraction sets it)
    t = time.perf_counter()
    n_ext = len(extract(cfg, backbone=bb))
    extract_rate = n_ext / (time.perf_counter() - t)
    t = time.perf_counter()
    pre = torch.stack([bb.preprocess(load_image(it)[0]) for it in items])
    cpu_decode_rate = len(items) / (time.perf_counter() - t)  # PIL decode + resize + normalise, one process
    pre = pre.to(dev)
    if gpu:
        pre = pre.contiguous(memory_format=torch.channels_last)
    amp, _ = _autocast(dev, "bf16" if gpu else "fp32")
    batches = list(pre.split(ex["batch"]))

    def forward() -> None:
        with torch.inference_mode(), amp:
            for x in batches:
                bb.encode_image(x).float()

    fwd_rate = len(items) / _timed(forward, dev, reps=3 if gpu else 1, warm=1)
    out = {"model": ex["model"], "images": len(items), "batch": ex["batch"], "workers": ex["workers"],
           "image_px": ex["image_px"], "extract_img_s": extract_rate, "forward_img_s": fwd_rate,
           "extract_over_forward": extract_rate / fwd_rate, "cpu_decode_img_s_1proc": cpu_decode_rate,
           "gpu_decode_img_s": _gpu_decode_rate(items, dev)}
    print(f"  extract {ex['model']}: {extract_rate:,.1f} img/s vs bare forward {fwd_rate:,.1f} img/s "
          f"({100 * out['extract_over_forward']:.0f}%); CPU decode {cpu_decode_rate:,.1f} img/s per process, "
          f"GPU decode {out['gpu_decode_img_s']}", file=sys.stderr, flush=True)
    return out


def _gpu_decode_rate(items: list[Any], dev: torch.device) -> float | None:
    """JPEG decoding on the GPU (nvJPEG through torchvision), images/s; None off CUDA or without torchvision."""
    if dev.type != "cuda":
        return None
    try:
        from torchvision.io import decode_jpeg, read_file
    except ImportError:
        return None
    data = [read_file(str(getattr(it, "path", it))) for it in items]
    try:
        return len(data) / _timed(lambda: decode_jpeg(data, device=dev), dev, reps=3, warm=1)
    except (RuntimeError, TypeError) as e:  # a torchvision without batched GPU decoding
        print(f"  GPU JPEG decoding unavailable: {e}", file=sys.stderr)
        return None


def bench_zeroshot(dev: torch.device, sh: dict[str, Any]) -> dict[str, Any]:
    """Logits and top-1/top-5 of n embeddings against C classes, on the device, batches of 8192."""
    from visae.zeroshot import ZeroShotClassifier, topk_hits

    z = sh["zeroshot"]
    g = torch.Generator().manual_seed(0)
    W = torch.randn(z["classes"], z["d"], generator=g)
    W /= W.norm(dim=-1, keepdim=True)
    y = torch.randint(0, z["classes"], (z["n"],), generator=g)
    x = (W[y] + 0.3 * torch.randn(z["n"], z["d"], generator=g)).to(dev)
    y = y.to(dev)
    clf = ZeroShotClassifier(W.to(dev), 100.0, [str(i) for i in range(z["classes"])])
    hits: dict[int, int] = {}

    def run() -> None:
        hits.clear()
        for s in range(0, z["n"], 8192):
            for k, h in topk_hits(clf.logits(x[s:s + 8192]), y[s:s + 8192], (1, 5)).items():
                hits[k] = hits.get(k, 0) + int(h.sum())

    s = _timed(run, dev, reps=5 if dev.type == "cuda" else 1, warm=1)
    out = {**z, "seconds": s, "embeddings_per_s": z["n"] / s, "top1": hits[1] / z["n"], "top5": hits[5] / z["n"]}
    print(f"  zero-shot {z['n']}x{z['d']} vs {z['classes']} classes: {s * 1e3:.1f} ms "
          f"({out['embeddings_per_s']:,.0f} embeddings/s), top-1 {out['top1']:.3f}", file=sys.stderr, flush=True)
    return out


def table(res: dict[str, Any]) -> str:
    """The results as one plain-text table."""
    lines = [f"device: {res['device']}   bf16 GEMM peak {res['gemm_tflops']['bf16']:.3g} TFLOP/s "
             f"(TF32 {res['gemm_tflops']['tf32']:.3g}, fp32 {res['gemm_tflops']['fp32']:.3g})", ""]
    if "train" in res:
        lines.append(f"{'arch':<6}{'d_in x d_sae':<14}{'batch':>7}  {'precision':<19}{'ms/step':>9}{'act/s':>14}"
                     f"{'TFLOP/s':>9}{'% bf16 peak':>12}")
        for r in res["train"]:
            lines.append(f"{r['arch']:<6}{str(r['d_in']) + 'x' + str(r['d_sae']):<14}{r['batch']:>7}  "
                         f"{r['precision']:<19}{r['step_ms']:>9.2f}{r['act_per_s']:>14,.0f}{r['tflops']:>9.3g}"
                         f"{100 * r['frac_bf16_peak']:>11.1f}%")
        lines.append("")
    if "sweep" in res:
        s = res["sweep"]
        lines.append(f"stacked sweep: {s['members']} members x {s['d']}x{s['d_sae']}, batch {s['batch']}, bf16: "
                     f"{s['member_act_per_s']:,.0f} member-act/s ({s['tflops']:.3g} TFLOP/s, "
                     f"{100 * s['frac_bf16_peak']:.1f}% of bf16 peak)")
    if "extract" in res:
        e = res["extract"]
        lines.append(f"extraction {e['model']} (random init), {e['images']} JPEGs {e['image_px']}px, batch {e['batch']}, "
                     f"{e['workers']} workers: {e['extract_img_s']:,.1f} img/s = {100 * e['extract_over_forward']:.0f}% "
                     f"of the bare forward ({e['forward_img_s']:,.1f} img/s); JPEG decode: CPU "
                     f"{e['cpu_decode_img_s_1proc']:,.1f} img/s per process, GPU "
                     + ("n/a" if e["gpu_decode_img_s"] is None else f"{e['gpu_decode_img_s']:,.0f} img/s"))
    if "zeroshot" in res:
        z = res["zeroshot"]
        lines.append(f"zero-shot: {z['n']} x {z['d']} against {z['classes']} classes: {z['seconds'] * 1e3:.1f} ms "
                     f"({z['embeddings_per_s']:,.0f} embeddings/s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU with small shapes (seconds)")
    ap.add_argument("--device", default="", help="default: cuda, or cpu with --cpu")
    ap.add_argument("--only", default="train,sweep,extract,zeroshot", help="comma-separated parts to run")
    ap.add_argument("--json", default="", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - {"train", "sweep", "extract", "zeroshot"}
    if unknown:
        ap.error(f"--only: unknown part(s) {sorted(unknown)}; choose from train, sweep, extract, zeroshot")
    dev = torch.device(args.device or ("cpu" if args.cpu else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here: run with --cpu for the small CPU shapes")
    sh = SHAPES["cpu" if dev.type == "cpu" else "gpu"]
    t0 = time.perf_counter()
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                           "shapes": "cpu" if dev.type == "cpu" else "gpu"}
    res["gemm_tflops"] = gemm_peaks(dev, sh["gemm_n"])
    peak = res["gemm_tflops"]["bf16"]
    work = Path(tempfile.mkdtemp(prefix="visae_gpu_bench_"))
    try:
        if "train" in parts:
            res["train"] = bench_train(dev, sh, work, peak)
        if "sweep" in parts:
            res["sweep"] = bench_sweep(dev, sh, work, peak)
        if "extract" in parts:
            res["extract"] = bench_extract(dev, sh, work)
        if "zeroshot" in parts:
            res["zeroshot"] = bench_zeroshot(dev, sh)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t0
    print(table(res), file=sys.stderr)
    print(f"total {res['seconds']:.1f} s", file=sys.stderr)
    benchlib.report("gpu.py", res, args.json or None, argv, echo=False)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
