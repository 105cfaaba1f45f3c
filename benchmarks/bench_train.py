"""Training-throughput benchmark (issue 2, "Performance"): our trainer's step vs the GEMM peak and overcomplete.

    python benchmarks/bench_train.py                   # d_in=512, d_sae=4096, batch 4096, fp32 (the issue's shapes)
    python benchmarks/bench_train.py --quick           # small shapes, a smoke run
    python benchmarks/bench_train.py --sections relu,loader

Everything is measured in one process, side by side, in ``--repeats`` rounds
(``benchlib.alternate``: every measurement once per round, the order reversed every other
round); the table shows medians, and ratios (to the same round's GEMM peak, between two
measurements) are medians of per-round ratios (this is a noisy shared machine). The machine
record and the JSON output are ``benchlib``'s.

* GEMM peak: the six matrix products of a standard step (x W_enc, f W_dec and the four of the
  backward pass; 12 B d_in d_sae FLOPs) with ``torch.mm`` into preallocated outputs.
* Our trainer: ``visae.train.train_stack`` exactly as ``scripts/train_sae.py`` runs it (shards
  on disk -> ShardView.epoch_batches -> training_loss -> backward -> remove_parallel_grad_ ->
  StackedAdam -> normalize_decoder_), on a planted-dictionary shard set (float16 shards, as the
  extractor writes). Rates are the trainer's own interval act/s records (metrics.jsonl),
  loading included, first interval (warm-up) dropped.
* overcomplete (benchmark-only extra, ``pip install overcomplete``): its TopKSAE / ReLU SAE and its
  own ``train_sae`` step (monitoring=1, clip_grad=1.0 defaults) on the same batches, held in
  memory (no loading cost for it).
* bf16: the trainer with ``--bf16 true`` vs fp32: rate, and final validation MSE (fp32 eval)
  after the same steps on the same data.
* Loader: ``ShardView.epoch_batches`` alone; peak RSS (``getrusage`` maxrss) of a subprocess that
  reads a whole epoch, for a shard set and one 8x larger.
"""

from __future__ import annotations

import os

# Waiting OpenMP threads sleep instead of spinning, so CPU time measures work, not waiting
# (set before torch starts its thread pool; override by exporting OMP_WAIT_POLICY).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import benchlib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from visae.shards import ShardSet, ShardWriter  # noqa: E402

REPO = benchlib.REPO
med = benchlib.median


# ----------------------------------------------------------------------------- data


def planted_shards(path: Path, n: int, d: int, n_atoms: int, mean_active: float) -> ShardSet:
    """A float16 planted-dictionary shard set (cached: rebuilt only if the parameters change)."""
    from visae.synthetic import make_planted_dictionary, write_planted_shards

    tag = path / "bench_params.json"
    params = {"n": n, "d": d, "n_atoms": n_atoms, "mean_active": mean_active}
    if tag.exists() and json.loads(tag.read_text()) == params:
        return ShardSet(path)
    D = make_planted_dictionary(d=d, n_atoms=n_atoms, mean_active=mean_active, noise=0.01, seed=0)
    ss = write_planted_shards(path, n=n, dictionary=D, shard_size=16384, dtype="float16", seed=0)
    tag.write_text(json.dumps(params))
    return ss


def random_shards(path: Path, n: int, d: int) -> ShardSet:
    tag = path / "bench_params.json"
    params = {"n": n, "d": d, "kind": "random"}
    if tag.exists() and json.loads(tag.read_text()) == params:
        return ShardSet(path)
    rng = np.random.default_rng(1)
    with ShardWriter(path, d, dtype="float16", shard_size=16384, resume=False, overwrite=True) as w:
        for start in range(0, n, 65536):
            m = min(65536, n - start)
            w.add(rng.standard_normal((m, d), dtype=np.float32), ids=[str(i) for i in range(start, start + m)])
    tag.write_text(json.dumps(params))
    return ShardSet(path)


# ----------------------------------------------------------------------------- GEMM peak


def gemm_peak(B: int, d: int, n: int, reps: int = 3) -> tuple[float, float]:
    """(wall, CPU-time) act/s of the six GEMMs of a standard step alone (medians of ``reps``)."""
    g = torch.Generator().manual_seed(0)
    x, gx = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
    We, Wd = torch.randn(d, n, generator=g), torch.randn(n, d, generator=g)
    f = torch.randn(B, n, generator=g)
    o_pre, o_xhat, o_gf = torch.empty(B, n), torch.empty(B, d), torch.empty(B, n)
    o_dWd, o_dWe, o_dx = torch.empty(n, d), torch.empty(d, n), torch.empty(B, d)

    def six():
        torch.mm(x, We, out=o_pre)          # encoder
        torch.mm(f, Wd, out=o_xhat)         # decoder
        torch.mm(gx, Wd.t(), out=o_gf)      # dL/df
        torch.mm(f.t(), gx, out=o_dWd)      # dL/dW_dec
        torch.mm(x.t(), o_gf, out=o_dWe)    # dL/dW_enc
        torch.mm(o_gf, We.t(), out=o_dx)    # dL/dx (the one a folded decoder bias makes unnecessary)

    six()
    walls, cpus = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        six()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return B / med(walls), B / med(cpus)


# ----------------------------------------------------------------------------- our trainer


def run_trainer(shards: ShardSet, out: Path, *, arch: str, B: int, expansion: int, k: int, steps: int,
                log_every: int, bf16: bool = False, impl: str = "auto", init_from: str = "", l1_coeff: float = 3e-5,
                lr: float = 5e-4, warmup: int = 200) -> dict:
    """One ``train_stack`` run; returns interval rates (first dropped), overall rate, out dir."""
    from visae.train import TrainConfig, sae_config_for, train_stack

    if out.exists():
        shutil.rmtree(out)
    cfg = TrainConfig(shards=str(shards.path), out=str(out), architecture=arch, expansion_factor=expansion, k=k,
                      batch_size=B, num_epochs=1000, max_steps=steps, log_every=log_every, bf16=bf16, impl=impl,
                      init_from=init_from, l1_coeff=l1_coeff, lr=lr, lr_warmup_steps=warmup, l1_warmup_steps=warmup,
                      val_fraction=0.02, resample_every=0, b_dec_init="mean", init_examples=4096, progress=False,
                      plot=False, overwrite=True, validate_shards="meta", device="cpu")
    w0, c0 = time.perf_counter(), time.process_time()
    res = train_stack(shards, sae_config_for(cfg, shards), [cfg.lr], [cfg.l1_coeff], cfg, [out])
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["act_per_s"] for r in recs if r.get("type") == "train"]
    last = [r for r in recs if r.get("type") == "train"][-1]
    return {"interval_rates": rates[1:], "rate": med(rates[1:]), "overall_rate": res.act_per_s, "out": out,
            "last": last, "wall": wall, "cpu": cpu, "steps": steps}


def run_pair(shards: ShardSet, out: Path, B: int, steps: int, **kw) -> dict:
    """Differential measurement: a run of 2 steps and one of ``steps``; the difference per extra step is the
    steady-state step (set-up, warm-up and the final checkpoint cancel out), in wall and in CPU time."""
    short = run_trainer(shards, out.with_name(out.name + "_short"), B=B, steps=2, log_every=2, **kw)
    long = run_trainer(shards, out, B=B, steps=steps, log_every=2, **kw)
    extra = (steps - 2) * B
    long["wall_rate"] = extra / max(long["wall"] - short["wall"], 1e-9)
    long["cpu_rate"] = extra / max(long["cpu"] - short["cpu"], 1e-9)
    return long


def low_l0_init(shards: ShardSet, path: Path, d_sae: int, target_l0: float) -> str:
    """A ReLU SAE whose encoder biases make each latent fire on ~target_l0 / d_sae of the data (an SAE late in
    training, when L0 is low), saved for ``--init_from``."""
    from visae.sae import SAEConfig, build_sae

    sae = build_sae(SAEConfig(architecture="relu", d_in=shards.d, d_sae=d_sae), generator=torch.Generator().manual_seed(0))
    x = torch.from_numpy(shards.read(np.arange(min(len(shards), 8192))))
    with torch.no_grad():
        pre = sae.preacts(x)[0]
        q = torch.quantile(pre, 1 - target_l0 / d_sae, dim=0)
        sae.b_enc[0] = -q
    sae.save(path)
    return str(path)


# ----------------------------------------------------------------------------- overcomplete


def overcomplete_rate(batches: list[torch.Tensor], arch: str, d: int, n: int, k: int) -> tuple[float, float]:
    """(wall, CPU-time) act/s of overcomplete's own train_sae step on in-memory batches."""
    import matplotlib
    import matplotlib.cm

    if not hasattr(matplotlib.cm, "get_cmap"):  # overcomplete 0.3 imports a function matplotlib >= 3.9 removed
        matplotlib.cm.get_cmap = lambda name=None, lut=None: matplotlib.colormaps[name]
    import io
    from contextlib import redirect_stdout

    from overcomplete.sae import SAE, TopKSAE, mse_l1, train_sae

    torch.manual_seed(0)
    if arch == "topk":
        model = TopKSAE(d, n, top_k=k, device="cpu")

        def criterion(x, x_hat, pre, z, D):
            return (x - x_hat).square().mean()
    else:
        model = SAE(d, n, device="cpu")

        def criterion(x, x_hat, pre, z, D):
            return mse_l1(x, x_hat, pre, z, D, penalty=3e-5)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    with redirect_stdout(io.StringIO()):
        train_sae(model, batches[:1], criterion, opt, nb_epochs=1)  # warm-up
        w0, c0 = time.perf_counter(), time.process_time()
        train_sae(model, batches[1:], criterion, opt, nb_epochs=1)
    n_ex = sum(b.shape[0] for b in batches[1:])
    return n_ex / (time.perf_counter() - w0), n_ex / (time.process_time() - c0)


# ----------------------------------------------------------------------------- loader & RSS


def loader_rate(shards: ShardSet, B: int, buffer_size: int) -> tuple[float, float]:
    """(wall, CPU-time) act/s of ShardView.epoch_batches alone over the training split (trainer settings)."""
    view, _ = shards.split(0.02, seed=0)
    w0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for b in view.epoch_batches(B, epoch=0, seed=0, buffer_size=buffer_size, prefetch=4):
        n += torch.from_numpy(b.acts).shape[0]
    return n / (time.perf_counter() - w0), n / (time.process_time() - c0)


RSS_CHILD = r"""
import resource, sys, time, torch
from visae.shards import ShardSet

def hwm_kb():
    # VmHWM: this process's own peak RSS. ru_maxrss can carry over the (large) parent's RSS from fork.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

ss = ShardSet(sys.argv[1]); B = int(sys.argv[2]); buf = int(sys.argv[3])
base = hwm_kb()
t0 = time.perf_counter(); n = 0
for b in ss.all().epoch_batches(B, epoch=0, seed=0, buffer_size=buf, prefetch=4):
    n += torch.from_numpy(b.acts).shape[0]
dt = time.perf_counter() - t0
print(base, hwm_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, n, n / dt)
"""


def rss_child(path: Path, B: int, buf: int) -> dict:
    """Peak RSS of a fresh process that reads one shuffled epoch of ``path`` (KB values from /proc and getrusage)."""
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), str(B), str(buf)], capture_output=True, text=True,
                         cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}, check=True)
    base, peak, maxrss, n, rate = out.stdout.split()
    return {"baseline_mb": int(base) / 1024, "peak_mb": int(peak) / 1024, "ru_maxrss_mb": int(maxrss) / 1024,
            "examples": int(n), "rate": float(rate)}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d_in", type=int, default=512)
    ap.add_argument("--d_sae", type=int, default=4096)
    ap.add_argument("--batch_size", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32, help="TopK k, and the target L0 of the low-L0 ReLU case")
    ap.add_argument("--intervals", type=int, default=3, help="timed 2-step intervals per trainer run (after a warm-up interval)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mse_steps", type=int, default=60, help="steps of the fp32-vs-bf16 MSE comparison")
    ap.add_argument("--rss_examples", type=int, default=131072, help="size of the small shard set for the RSS check")
    ap.add_argument("--rss_buffer", type=int, default=65536, help="loader shuffle buffer for the RSS check")
    ap.add_argument("--workdir", default="runs/bench_train")
    ap.add_argument("--sections", default="relu,sparse,bf16,loader,rss",
                    help="comma list of: relu (dense ReLU+L1 vs GEMM peak and overcomplete), sparse (TopK vs "
                         "overcomplete, low-L0 ReLU), bf16, loader, rss")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    a = ap.parse_args(argv)
    if a.quick:
        a.d_in, a.d_sae, a.batch_size, a.k, a.repeats, a.intervals, a.mse_steps = 64, 512, 512, 8, 1, 2, 10
        a.rss_examples, a.rss_buffer = 8192, 4096
    if a.threads:
        torch.set_num_threads(a.threads)
    sections = set(a.sections.split(","))
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    B, d, n, k = a.batch_size, a.d_in, a.d_sae, a.k
    expansion = n // d
    steps = 2 + 2 * a.intervals
    print(f"machine: {benchlib.describe_machine()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"shapes: d_in={d} d_sae={n} batch={B} k={k}; {a.repeats} repeats x {a.intervals} timed intervals")
    n_examples = int(B * max(steps + 2, 12) / 0.98) + 1
    shards = planted_shards(work / "planted", n_examples, d, n_atoms=n, mean_active=16.0)
    print(f"data: {shards}")
    res: dict = {"shapes": {"d_in": d, "d_sae": n, "batch": B, "k": k}, "rows": {}}
    rows: dict[str, list] = {}

    def add(name, value):
        rows.setdefault(name, []).append(value)

    run = lambda name, **kw: run_pair(shards, work / name, B=B, steps=steps, expansion=expansion, k=k, **kw)  # noqa: E731
    batches = None
    if "relu" in sections or "sparse" in sections:
        view, _ = shards.split(0.02, seed=0)
        batches = [torch.from_numpy(b.acts.copy()) for _, b in zip(range(1 + 2 * a.intervals),
                                                                   view.epoch_batches(B, epoch=0, seed=0))]
    lowl0 = low_l0_init(shards, work / "lowl0_init", n, float(k)) if "sparse" in sections else ""

    def record(name, r, peak=None):
        """r: a run_pair result or a (wall, cpu) pair; adds name (wall) and name@cpu rows (+ ratios to peak)."""
        wall, cpu = (r["rate"], r["cpu_rate"]) if isinstance(r, dict) else r
        add(name, wall)
        add(name + " @cpu", cpu)
        if isinstance(r, dict):
            add(name + " (diff)", r["wall_rate"])
        if peak is not None:
            add(name + "/peak", wall / peak[0])
            add(name + "/peak @cpu", cpu / peak[1])
        return wall, cpu

    # every measurement once per round, the order reversed every other round (benchlib.alternate)
    cases = {"gemm_peak": lambda: gemm_peak(B, d, n)}
    if "relu" in sections:
        cases["relu_fp32"] = lambda: run("relu_fp32", arch="relu")
        cases["overcomplete_relu"] = lambda: overcomplete_rate(batches, "relu", d, n, k)
    if "bf16" in sections:
        cases["relu_bf16"] = lambda: run("relu_bf16", arch="relu", bf16=True)
    if "sparse" in sections:
        cases["topk_sparse"] = lambda: run("topk_sparse", arch="topk")
        cases["topk_dense_reference"] = lambda: run("topk_dense", arch="topk", impl="reference")
        cases["overcomplete_topk"] = lambda: overcomplete_rate(batches, "topk", d, n, k)
        cases["relu_lowl0_auto"] = lambda: run("relu_lowl0_sparse", arch="relu", init_from=lowl0, lr=1e-5)
        cases["relu_lowl0_fused"] = lambda: run("relu_lowl0_fused", arch="relu", init_from=lowl0, lr=1e-5,
                                                impl="fused")
    if "loader" in sections:
        cases["loader"] = lambda: loader_rate(shards, B, 262144)
    got = benchlib.alternate(cases, a.repeats)

    for rep in range(a.repeats):  # rows and ratios, each ratio within one round
        print(f"--- round {rep + 1}/{a.repeats}", flush=True)
        peak = record("gemm_peak", got["gemm_peak"][rep])
        if "relu" in sections:
            w, c = record("relu_fp32", got["relu_fp32"][rep], peak)
            ow, oc = record("overcomplete_relu", got["overcomplete_relu"][rep], peak)
            print(f"gemm peak {peak[0]:,.0f} act/s ({peak[1]:,.0f} per CPU-s) | ours relu fp32 {w:,.0f} ({w / peak[0]:.2f} "
                  f"of peak; CPU-time {c / peak[1]:.2f}) | overcomplete relu {ow:,.0f} ({ow / peak[0]:.2f}; CPU-time "
                  f"{oc / peak[1]:.2f})", flush=True)
        if "bf16" in sections:
            w16, c16 = record("relu_bf16", got["relu_bf16"][rep], peak)
            if "relu" in sections:
                add("bf16/fp32", w16 / rows["relu_fp32"][-1])
                add("bf16/fp32 @cpu", c16 / rows["relu_fp32 @cpu"][-1])
            print(f"ours relu bf16 {w16:,.0f} act/s ({c16:,.0f} per CPU-s)", flush=True)
        if "sparse" in sections:
            tw, tc = record("topk_sparse", got["topk_sparse"][rep], peak)
            dw, dc = record("topk_dense_reference", got["topk_dense_reference"][rep], peak)
            ow, oc = record("overcomplete_topk", got["overcomplete_topk"][rep], peak)
            add("topk/overcomplete", tw / ow)
            add("topk/overcomplete @cpu", tc / oc)
            rl = got["relu_lowl0_auto"][rep]
            lw, lc = record("relu_lowl0_auto", rl, peak)
            fw, fc = record("relu_lowl0_fused", got["relu_lowl0_fused"][rep], peak)
            add("relu_lowl0_l0", rl["last"]["l0"])
            add("lowl0 auto/fused", lw / fw)
            add("lowl0 auto/fused @cpu", lc / fc)
            print(f"topk k={k}: ours {tw:,.0f} act/s (dense reference {dw:,.0f}), overcomplete {ow:,.0f} -> "
                  f"{tw / ow:.2f}x (CPU-time {tc / oc:.2f}x) | relu L0~{rl['last']['l0']:.0f}: auto (sparse) {lw:,.0f} vs "
                  f"fused {fw:,.0f}", flush=True)
        if "loader" in sections:
            lw_, lc_ = record("loader", got["loader"][rep])
            for ref in ("relu_fp32", "topk_sparse"):
                if ref in rows:
                    add(f"loader/{ref}", lw_ / rows[ref][-1])
                    add(f"loader/{ref} @cpu", lc_ / rows[ref + " @cpu"][-1])
            print(f"loader {lw_:,.0f} act/s ({lc_:,.0f} per CPU-s)", flush=True)

    if "bf16" in sections:  # final MSE after the same steps, fp32 vs bf16 autocast
        from visae.sae import load_sae

        mse = {}
        for name, bf in (("mse_fp32", False), ("mse_bf16", True)):
            r = run_trainer(shards, work / name, arch="relu", B=B, expansion=expansion, k=k, steps=a.mse_steps,
                            log_every=max(2, a.mse_steps // 5), bf16=bf, warmup=10)
            res.setdefault("bf16_mse_runs", {})[name] = {"wall": r["wall"], "cpu": r["cpu"], "rate": r["rate"]}
            sae = load_sae(r["out"])
            _, val = shards.split(0.02, seed=0)
            x = torch.from_numpy(val.read(np.arange(len(val))))
            with torch.no_grad():
                mse[name] = float(sae.training_loss(x, 0.0).mse[0])
        res["bf16_mse"] = mse | {"rel_diff": abs(mse["mse_bf16"] - mse["mse_fp32"]) / mse["mse_fp32"],
                                 "steps": a.mse_steps}
        print(f"final val MSE after {a.mse_steps} steps: fp32 {mse['mse_fp32']:.4g}, bf16 {mse['mse_bf16']:.4g} "
              f"({100 * res['bf16_mse']['rel_diff']:.2f}% apart)", flush=True)

    if "rss" in sections:
        small = random_shards(work / "rss_1x", a.rss_examples, d)
        big = random_shards(work / "rss_8x", 8 * a.rss_examples, d)
        r1 = rss_child(small.path, B, a.rss_buffer)
        r8 = rss_child(big.path, B, a.rss_buffer)
        res["rss"] = {"1x": r1, "8x": r8, "buffer": a.rss_buffer}
        print(f"loader peak RSS: {a.rss_examples:,} examples {r1['peak_mb']:.0f} MB, {8 * a.rss_examples:,} examples "
              f"{r8['peak_mb']:.0f} MB (after imports {r1['baseline_mb']:.0f} MB; shuffle buffer {a.rss_buffer:,})")

    res["rows"] = {k_: {"median": med(v), "values": v} for k_, v in rows.items()}
    print("\n| measure | median | values |\n|---|---:|---|")
    for k_, v in rows.items():
        fmt = (lambda x: f"{x:.2f}") if ("/" in k_ or "_l0" in k_) else (lambda x: f"{x:,.0f}")
        print(f"| {k_} | {fmt(med(v))} | {', '.join(fmt(x) for x in v)} |")
    print(f"\nmax RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    benchlib.report("bench_train.py", res, a.json or None, argv, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
