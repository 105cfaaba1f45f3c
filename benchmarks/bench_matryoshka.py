"""Matryoshka vs BatchTopK: parent recovery on planted hierarchical data, and training throughput on the same shapes.

Part 1 (quality). ``visae.synthetic.make_hierarchical_dictionary`` (d=64, 16 parents x 4 children, a
parent on with p=0.125, a child with its parent with p=0.9, parent magnitudes U(0.8, 1.2), child
U(0.4, 0.8)): 4.0 active features per example on average. Both SAEs have d_sae=256 and k=3 (BatchTopK
codes); Matryoshka's prefixes are 16, 32, 64, 128, 256 (its first prefix = the number of parents). Per
seed (the SAE's initialisation): parents recovered (one latent fires on >= 90% of the examples with
the parent, children included, precision >= 0.9), EV, L0, EV and L0 of Matryoshka's first prefix
alone (its 16 top-ranked latents, ``prefix_forward``), and BatchTopKs with 16 latents trained alone
(k = 1, 2, 3). The trainer's step (training_loss, backward, remove_parallel_grad_, Adam,
normalize_decoder_) with aux-k on latents silent for 100 steps; 300 steps of batch 1024;
validation on 8192 fresh examples. ``matryoshka_index_order`` (``--no_ablation`` drops it) is the
same Matryoshka with the prefixes taken in index order (the ranking's average held at zero), as
visae trained it before the ranking: the ablation of Nabeshima's ordering.

The comparison for issue 14's "its first prefix alone reaches >= 0.9x the EV of a BatchTopK of
that prefix's size trained alone" (written down before the runs that report it):

* "a BatchTopK of that prefix's size trained alone": a BatchTopK SAE with d_sae = m_1 = 16, on the
  same training rows, with the same steps, batch, lr, aux-k and initialisation seed.
* Its k: the issue does not fix it, and an SAE's EV is only comparable at equal sparsity (EV
  rises with L0 along the sparsity-fidelity frontier), so the reference is that BatchTopK at the
  L0 the prefix has within itself (its 16 latents' codes per validation example), read off the
  BatchTopK's measured (validation L0, EV) points for k = 1, 2, 3 by linear interpolation between
  the two points that bracket it (``first_prefix_ratio_matched_l0``). The frontier is concave, so
  the chord lies below it and this reading is generous to the prefix by the chord's gap;
  therefore also reported, and the one held to 0.9: the ratio against the integer k at or above
  the prefix's L0 (``first_prefix_ratio_k_ceil``; the BatchTopK then spends at least as many codes
  per example as the prefix), and the ratios against fixed k = 2 and k = 3.

Part 2 (speed). One training step (impl auto = the sparse path) of each architecture on the same
shapes (default d_in=512, d_sae=4096, k=32, batch 4096), alternated, wall and CPU time per step.

    python benchmarks/bench_matryoshka.py --seeds 0,1,2 --repeats 5 --json results/bench_matryoshka.json
"""

from __future__ import annotations

import argparse
import time

import benchlib
import numpy as np
import torch

HIER = dict(d=64, n_parents=16, children_per_parent=4, parent_prob=0.125, child_prob=0.9, noise=0.01,
            parent_magnitude=(0.8, 1.2), child_magnitude=(0.4, 0.8))


def _train(arch, d_sae, k, xt, seed, steps, B, impl="reference", index_order=False):
    from visae.sae import SAEConfig, build_sae

    sae = build_sae(SAEConfig(architecture=arch, d_in=xt.shape[1], d_sae=d_sae, k=k, aux_k=64, impl=impl),
                    generator=torch.Generator().manual_seed(seed))
    if index_order:  # the ablation: the ranking's average stays zero, so the prefixes are index ranges
        sae._update_sq_avg = lambda sq_mean: None
    sae.init_b_dec_(xt[:2048])
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    last = torch.zeros(1, d_sae, dtype=torch.long)
    t0 = time.process_time()
    for step in range(steps):
        out = sae.training_loss(xt[step * B:(step + 1) * B], dead_mask=(step - last) > 100)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
        last[out.fired] = step
    return sae.eval(), time.process_time() - t0


def _ev(x_hat, x):
    return float(1 - (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def _interp(points, l0):
    """EV at ``l0`` on the chord of the measured (L0, EV) points (sorted by L0) that brackets it; None outside."""
    points = sorted(points)
    for (a, ea), (b, eb) in zip(points, points[1:]):
        if a <= l0 <= b:
            return ea + (eb - ea) * (l0 - a) / (b - a)
    return None


def quality(seeds, steps, B, ablation=True):
    from visae.sae.matryoshka import prefix_forward
    from visae.synthetic import make_hierarchical_dictionary, parent_recovery

    D = make_hierarchical_dictionary(seed=0, **HIER)
    x, on, child = D.sample(steps * B + 8192, np.random.default_rng(1))
    x = torch.from_numpy(x)
    x = x / x.norm(dim=-1, keepdim=True)
    xt, xv, onv, chv = x[:-8192], x[-8192:], on[-8192:], child[-8192:]
    rows = []
    for seed in seeds:
        row = {"seed": seed}
        runs = [("matryoshka", "matryoshka", 256, 3), ("batchtopk", "batchtopk", 256, 3),
                ("batchtopk16_k1", "batchtopk", 16, 1), ("batchtopk16_k2", "batchtopk", 16, 2),
                ("batchtopk16_k3", "batchtopk", 16, 3)]
        if ablation:
            runs.append(("matryoshka_index_order", "matryoshka", 256, 3))
        for name, arch, d_sae, k in runs:
            sae, cpu = _train(arch, d_sae, k, xt, seed, steps, B, index_order=name == "matryoshka_index_order")
            with torch.no_grad():
                x_hat, f = sae(xv)
            r = parent_recovery((f > 0).numpy(), onv, chv)
            rec = {"parents_recovered": int(r["recovered"].sum()), "ev": _ev(x_hat, xv),
                   "l0": float((f > 0).float().sum(-1).mean()),
                   "parent_latent_recall_with_child": float(np.nanmean(r["recall_with_child"])), "train_cpu_s": cpu}
            if arch == "matryoshka":
                m1 = sae.prefix_sizes[0]
                with torch.no_grad():
                    xp, fp = prefix_forward(sae, xv, m1)
                rec["first_prefix_ev"] = _ev(xp, xv)
                rec["first_prefix_l0"] = float((fp > 0).float().sum(-1).mean())
                in_prefix = sae.W_dec[0][sae.prefix_mask(m1)[0]]
                rec["parents_in_first_prefix"] = int(((in_prefix @ torch.from_numpy(D.parents).T)
                                                      .max(0).values > 0.9).sum())
                rec["first_prefix_dead"] = int(((fp[:, sae.prefix_mask(m1)[0]] > 0).sum(0) == 0).sum())
            row[name] = rec
            print(f"seed {seed} {name}: {rec}", flush=True)
        small = {k: (row[f"batchtopk16_k{k}"]["l0"], row[f"batchtopk16_k{k}"]["ev"]) for k in (1, 2, 3)}
        for name in [n for n in ("matryoshka", "matryoshka_index_order") if n in row]:
            rec = row[name]
            ev_p, l0_p = rec["first_prefix_ev"], rec["first_prefix_l0"]
            matched = _interp(list(small.values()), l0_p)
            k_ceil = next((k for k in (1, 2, 3) if small[k][0] >= l0_p), None)
            rec["first_prefix_ratio_matched_l0"] = None if matched is None else ev_p / matched
            rec["first_prefix_ratio_k_ceil"] = None if k_ceil is None else ev_p / small[k_ceil][1]
            rec["first_prefix_k_ceil"] = k_ceil
            rec["first_prefix_ratio_k2"] = ev_p / small[2][1]
            rec["first_prefix_ratio_k3"] = ev_p / small[3][1]
            print(f"seed {seed} {name} first prefix: EV {ev_p:.3f} at L0 {l0_p:.2f}; ratio matched-L0 "
                  f"{rec['first_prefix_ratio_matched_l0']}, k-ceil (k={k_ceil}) {rec['first_prefix_ratio_k_ceil']}, "
                  f"k=2 {rec['first_prefix_ratio_k2']:.3f}, k=3 {rec['first_prefix_ratio_k3']:.3f}", flush=True)
        rows.append(row)
    return rows


def speed(d_in, d_sae, k, B, repeats):
    from visae.sae import SAEConfig, build_sae

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d_in, generator=g)
    x = x / x.norm(dim=-1, keepdim=True)
    saes, opts = {}, {}
    for arch in ("batchtopk", "matryoshka"):
        saes[arch] = build_sae(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k, impl="auto"),
                               generator=torch.Generator().manual_seed(0))
        opts[arch] = torch.optim.Adam(saes[arch].parameters(), lr=1e-4)

    def step(arch):
        def run():
            sae, opt = saes[arch], opts[arch]
            c0, w0 = time.process_time(), time.perf_counter()
            out = sae.training_loss(x)
            opt.zero_grad()
            out.loss.backward()
            sae.remove_parallel_grad_()
            opt.step()
            sae.normalize_decoder_()
            return [time.perf_counter() - w0, time.process_time() - c0]
        return run

    for arch in saes:  # warm-up
        step(arch)()
    res = benchlib.alternate({a: step(a) for a in saes}, repeats)
    wall = {a: [v[0] for v in res[a]] for a in res}
    cpu = {a: [v[1] for v in res[a]] for a in res}
    return {"shapes": {"d_in": d_in, "d_sae": d_sae, "k": k, "batch": B},
            "wall_s_per_step": {a: benchlib.median(wall[a]) for a in wall},
            "cpu_s_per_step": {a: benchlib.median(cpu[a]) for a in cpu},
            "throughput_ratio_wall": benchlib.median_ratio(wall["batchtopk"], wall["matryoshka"]),
            "throughput_ratio_cpu": benchlib.median_ratio(cpu["batchtopk"], cpu["matryoshka"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1", help="comma-separated SAE initialisation seeds")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch_size", type=int, default=1024)
    ap.add_argument("--d_in", type=int, default=512)
    ap.add_argument("--d_sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--speed_batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip_quality", action="store_true")
    ap.add_argument("--no_ablation", action="store_true", help="skip the index-order Matryoshka (the ablation)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"threads": args.threads}
    if not args.skip_quality:
        out["quality"] = quality([int(s) for s in args.seeds.split(",")], args.steps, args.batch_size,
                                 ablation=not args.no_ablation)
    out["speed"] = speed(args.d_in, args.d_sae, args.k, args.speed_batch, args.repeats)
    benchlib.report("bench_matryoshka.py", out, args.json, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
