"""Matryoshka SAE: the nested-prefix loss, its sparse path, stacking, save/load/export, training, and the planted
hierarchy ground truth (parents absorbed by a plain BatchTopK, recovered by Matryoshka)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tolerances import assert_bitwise_equal, assert_close_derived, sae_step_bounds
from visae.sae import SAEConfig, build_sae, load_sae, stack_saes
from visae.sae.base import SAEFormatError
from visae.sae.matryoshka import MatryoshkaSAE, prefix_forward, prefix_sizes
from visae.synthetic import make_hierarchical_dictionary, parent_recovery


def _make(S=1, d_in=24, d_sae=96, **kw):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="matryoshka", d_in=d_in, d_sae=d_sae, n_models=S, k=6, aux_k=10, **kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.05)
        sae.W_enc.mul_(1.5)
    return sae


def _x(B=40, d=24, S=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*((S,) if S else ()), B, d, generator=g)
    return x / x.norm(dim=-1, keepdim=True) + 0.1


def test_prefix_sizes_and_config_errors():
    assert prefix_sizes(96, 5) == [6, 12, 24, 48, 96]
    assert prefix_sizes(100, 3) == [25, 50, 100]
    assert prefix_sizes(7, 1) == [7]
    assert _make().prefix_sizes == [6, 12, 24, 48, 96]
    with pytest.raises(ValueError, match="matryoshka_levels"):
        SAEConfig(architecture="matryoshka", d_in=8, d_sae=8, k=2, matryoshka_levels=5)  # 8 >> 4 == 0
    with pytest.raises(ValueError, match="k=9 exceeds d_sae=8"):
        SAEConfig(architecture="matryoshka", d_in=8, d_sae=8, k=9, matryoshka_levels=2)


@pytest.mark.parametrize("ranked", [False, True])
def test_loss_is_the_sum_of_cumulative_prefix_reconstructions(ranked):
    """The reference loss equals the definition written out naively: one full decode per prefix, the prefix being
    the first m latents of the ranking by ``latent_sq_avg`` (index order while it is all zero, as at the start)."""
    sae = _make()
    x = _x()
    if ranked:
        with torch.no_grad():
            sae.latent_sq_avg.copy_(torch.rand(1, 96, generator=torch.Generator().manual_seed(3)))
    old_avg = sae.latent_sq_avg.clone()
    order = torch.argsort(old_avg[0], descending=True, stable=True)  # all zero: index order
    out = sae.training_loss(x, impl="reference")
    with torch.no_grad():
        pre = sae.preacts(x)
        f = sae._batch_topk(pre)[0]  # [B, d_sae] (eval-free: threshold updates need grad + train mode)
        want = 0.0
        for m in sae.prefix_sizes:
            idx = order[:m]
            x_hat = f[:, idx] @ sae.W_dec[0, idx] + sae.b_dec[0]
            want += float((x_hat - x).pow(2).mean())
    # the ranking's average moved by this training step: 0.95 old + 0.05 mean_B (f ||W_dec||)^2, in float32
    # (a mean of B = 40 squares, each at most max f^2 ||W_dec||^2, then the 2-term update onto old values)
    with torch.no_grad():
        new_sq = f.double().square().mean(0) * sae.W_dec[0].double().norm(dim=-1).square()
    assert_close_derived(sae.latent_sq_avg[0], 0.95 * old_avg[0].double() + 0.05 * new_sq, n_terms=40 + 2,
                         scale=float(new_sq.max()) + float(old_avg.max()), dtype=torch.float32, computations=1,
                         msg="latent_sq_avg update")
    assert not torch.equal(sae.latent_sq_avg, old_avg)
    # float32 sums over B * d_in = 960 terms per prefix, 5 prefixes
    tol = 5 * 960 * torch.finfo(torch.float32).eps * max(want, 1.0)
    assert abs(float(out.loss.detach()) - want) <= tol, (float(out.loss.detach()), want)
    # mse / EV describe the full reconstruction, as for every architecture
    full = f @ sae.W_dec[0] + sae.b_dec[0]
    n_terms, scale = sae_step_bounds(sae, x, torch.zeros(1))["mse"]
    assert_close_derived(out.mse[0], (full - x).pow(2).mean(), n_terms=n_terms, scale=scale[0], dtype=torch.float32,
                         msg="mse of the full reconstruction")
    assert float(out.loss.detach()) > float(out.mse[0])


@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("stacked_x", [False, True])
def test_sparse_path_equals_reference(S, stacked_x):
    sae = _make(S)
    with torch.no_grad():  # a ranking off index order (distinct values), as after some training
        sae.latent_sq_avg.copy_(torch.rand(S, 96, generator=torch.Generator().manual_seed(4)))
    x = _x(S=S if stacked_x else None)
    dead = torch.zeros(S, 96, dtype=torch.bool)
    dead[:, ::3] = True
    dead[-1] = False  # a member with no dead latent
    ref_sae = sae.copy()
    outs, grads = [], []
    for m, impl in ((ref_sae, "reference"), (sae, "sparse")):
        o = m.training_loss(x, l1_coeff=0.0, dead_mask=dead, impl=impl)
        o.loss.backward()
        outs.append(o)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    ref, out = outs
    # the derived one-step bounds (tests/tolerances.sae_step_bounds); the loss and the gradients sum L prefix
    # reconstructions, each a sub-sum of the full one, so their scales are at most L times the full one's
    L = len(sae.prefix_sizes)
    bounds = sae_step_bounds(sae, x, torch.zeros(S), dead)
    for name in ("loss", "mse", "l1", "l0", "explained_variance", "aux", "sq_err"):
        n_terms, scale = bounds[name]
        scale = scale * (L if name == "loss" else 1)
        assert_close_derived(getattr(out, name), getattr(ref, name), n_terms=n_terms, scale=scale,
                             dtype=torch.float32, probabilistic=True, msg=name)
    assert torch.equal(out.fired, ref.fired)
    # the ranking's average: 0.05 mean_B f^2 + 0.95 old; a code's error is within the codes' bound (P), its square's
    # within 2 P that, then a mean of B = 40 terms and the update's add onto old values < 1
    n_terms, P = bounds["codes"]
    assert_close_derived(sae.latent_sq_avg, ref_sae.latent_sq_avg, n_terms=n_terms + 40 + 2,
                         scale=2 * P.square().mean(dim=1) + 1.0, dtype=torch.float32, probabilistic=True,
                         msg="latent_sq_avg")
    if S > 1:
        assert (ref.aux[:-1] > 0).all() and ref.aux[-1] == 0
    for name, g in grads[0].items():
        n_terms, scale = bounds[name]
        assert_close_derived(grads[1][name], g, n_terms=n_terms, scale=L * scale, dtype=torch.float32,
                             probabilistic=True, msg=f"d loss / d {name}")
    # the running threshold: an order statistic of the pre-activations, then the momentum average (2 roundings)
    n_terms, P = bounds["codes"]
    assert_close_derived(sae.threshold, ref_sae.threshold, n_terms=n_terms + 2, scale=P.amax(dim=(1, 2)),
                         dtype=torch.float32, probabilistic=True, msg="threshold")
    assert (sae.threshold > 0).all()


def test_stack_equals_members():
    torch.manual_seed(0)
    singles = [_make() for _ in range(3)]
    for i, s in enumerate(singles):
        with torch.no_grad():
            s.W_enc.add_(0.1 * i)
    stacked = stack_saes(singles)
    assert isinstance(stacked, MatryoshkaSAE) and stacked.n_models == 3
    x = _x()
    out = stacked.training_loss(x, impl="sparse")
    out.loss.backward()
    for i, s in enumerate(singles):
        o = s.training_loss(x, impl="sparse")
        o.loss.backward()
        # a stack member runs the same per-member products as the SAE alone (kernels._mv_s): bit for bit
        assert_bitwise_equal(out.sq_err[i], o.sq_err[0], f"member {i} sq_err")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert_bitwise_equal(getattr(stacked, name).grad[i], getattr(s, name).grad[0], f"member {i} d / d {name}")


@pytest.mark.parametrize("keep_codes", [False, True])
def test_save_load_and_export(tmp_path, keep_codes):
    sae = _make(S=2, scale_factor=2.5, matryoshka_levels=3)
    sae.training_loss(_x()).loss.backward()  # sets the running threshold
    d = sae.save(tmp_path / "sae", extra={"train": {"lr": 1e-3}})
    loaded = load_sae(d)
    assert isinstance(loaded, MatryoshkaSAE) and loaded.cfg == sae.cfg and loaded.prefix_sizes == [24, 48, 96]
    raw = _x(seed=5) * 7.0
    sae.eval()
    for a, b in zip(sae(raw), loaded(raw)):
        assert_bitwise_equal(a, b, "saved and loaded: the same forward on the same weights")
    exp = loaded.exported(keep_codes=keep_codes)
    assert exp.cfg.scale_factor == 1.0
    # LEFT (issue 10, not derived yet): the export folds the scale factor into the weights (other arithmetic)
    torch.testing.assert_close(exp(raw)[0], loaded(raw)[0], rtol=1e-5, atol=1e-5)
    # the ranking that forms the prefixes is saved with the weights (one training step has moved it off index order)
    assert torch.equal(loaded.latent_sq_avg, sae.latent_sq_avg) and (sae.latent_sq_avg > 0).any()
    assert not torch.equal(loaded.latent_order(), torch.arange(96).expand(2, 96))
    # prefix_forward: the whole dictionary is forward(); a prefix zeroes the codes of the latents ranked after it
    x_full, f_full = prefix_forward(loaded, raw, loaded.d_sae)
    assert_bitwise_equal(x_full, loaded(raw)[0], "prefix_forward of the whole dictionary = forward")
    x_p, f_p = prefix_forward(loaded, raw, 24)
    keep = loaded.prefix_mask(24)  # [2, 96]
    assert keep.sum(-1).tolist() == [24, 24]
    assert (f_p.masked_select(~keep[:, None, :]) == 0).all()
    assert torch.equal(f_p.masked_select(keep[:, None, :]), f_full.masked_select(keep[:, None, :]))
    with pytest.raises(SAEFormatError, match="size 97 outside"):
        prefix_forward(loaded, raw, 97)


def test_ranking_resampled_latents_and_sorted_copy():
    """Resampled latents rank last; ``sorted_by_rank`` stores the latents in rank order (prefixes become index ranges)
    with the same forward up to that permutation of the codes."""
    sae = _make(S=2)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        sae.latent_sq_avg.copy_(torch.rand(2, 96, generator=g) + 0.1)
    top = sae.latent_order()[:, :3]  # the 3 most used latents of each member
    mask = torch.zeros(2, 96, dtype=torch.bool).scatter_(1, top, True)
    sae.reset_latents_(mask)
    assert (sae.latent_sq_avg[mask] == 0).all() and (sae.latent_sq_avg[~mask] > 0).all()
    assert torch.equal(mask, sae.latent_rank() >= 93)  # now the last three
    sae.training_loss(_x()).loss.backward()  # sets the threshold and moves the average
    sae.eval()
    srt = sae.sorted_by_rank()
    assert isinstance(srt, MatryoshkaSAE) and torch.equal(srt.latent_order(), torch.arange(96).expand(2, 96))
    raw = _x(seed=6)
    x_a, f_a = sae(raw)
    x_b, f_b = srt(raw)
    order = sae.latent_order()
    # the same products on permuted weights; a GEMM may block permuted columns differently, and the decode sums in
    # another order: the inference bounds of tests/tolerances.sae_step_bounds
    bounds = sae_step_bounds(sae, raw, torch.zeros(2))
    n_terms, P = bounds["codes"]
    idx = order[:, None, :].expand_as(f_a)
    assert torch.equal(f_b > 0, f_a.gather(2, idx) > 0), "the same latents fire"
    assert_close_derived(f_b, f_a.gather(2, idx), n_terms=n_terms, scale=P.gather(2, idx), dtype=torch.float32,
                         msg="sorted copy's codes")
    n_terms, scale = bounds["x_hat"]
    assert_close_derived(x_b, x_a, n_terms=n_terms, scale=scale, dtype=torch.float32, msg="sorted copy's x_hat")
    for m in sae.prefix_sizes:
        assert torch.equal(srt.prefix_mask(m), torch.arange(96).expand(2, 96) < m)


def test_trains_through_visae_train(tmp_path):
    """The trainer runs it (sparse path, aux-k, resampling, checkpoint) and writes a loadable SAE dir."""
    from visae.synthetic import write_planted_shards
    from visae.train import TrainConfig, train

    write_planted_shards(tmp_path / "shards", n=3000, seed=0)
    out = train(TrainConfig(shards=str(tmp_path / "shards"), out=str(tmp_path / "sae"), architecture="matryoshka",
                            expansion_factor=2, k=4, matryoshka_levels=3, num_epochs=2, batch_size=256,
                            progress=False, plot=False, init_examples=1000))
    sae = load_sae(out)
    assert isinstance(sae, MatryoshkaSAE) and sae.prefix_sizes == [32, 64, 128]
    assert float(sae.threshold[0]) > 0


# ----------------------------------------------------------------------------- planted hierarchy ground truth

P = 16  # planted parents, 4 children each; d = 64; the first Matryoshka prefix = d_sae / 16 = 16 latents
HIER = dict(d=64, n_parents=P, children_per_parent=4, parent_prob=0.125, child_prob=0.9, noise=0.01,
            parent_magnitude=(0.8, 1.2), child_magnitude=(0.4, 0.8))


def _train_two_seeds(arch, d_sae, k, xt, steps=300, B=1024):
    """Two SAEs (seeds = two stack members with their own initialisations) by the trainer's step, with aux-k."""
    sae = build_sae(SAEConfig(architecture=arch, d_in=xt.shape[1], d_sae=d_sae, k=k, n_models=2, aux_k=64,
                              impl="reference"), generator=torch.Generator().manual_seed(0))
    sae.init_b_dec_(xt[:2048])
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    last = torch.zeros(2, d_sae, dtype=torch.long)
    for step in range(steps):
        out = sae.training_loss(xt[step * B:(step + 1) * B], dead_mask=(step - last) > 100)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
        last[out.fired] = step
    return sae.eval()


def _ev(x_hat, x):
    return float(1 - (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_hierarchy_matryoshka_recovers_parents_batchtopk_absorbs_them():
    """Issue 14 item 3: a parent is recovered when one latent fires on >= 90% of the examples containing it
    (children included) with precision >= 0.9. Budget k = 3 < 4 active features on average: a plain BatchTopK
    saves codes by absorbing parents into parent+child latents; Matryoshka's first prefix must reconstruct
    alone and keeps them. 300 steps of batch 1024.

    First prefix vs "a BatchTopK of that prefix's size trained alone" (the comparison benchmarks/bench_matryoshka.py
    defines): a BatchTopK with m_1 = 16 latents, the same data and steps, at k = 3, which is at least the prefix's
    own L0 (asserted), so the prefix is compared at no more codes per example than the BatchTopK it is held to.
    Measured (seeds 0-2 of the benchmark): prefix EV 0.782-0.783 at L0 2.12, BatchTopK-16 k=3 EV 0.778-0.794,
    ratios 0.985-1.006; the 0.9 of the issue is ~9 times that spread below. All 16 parents among the first
    prefix's latents (cosine > 0.9) in every seed; recovered Matryoshka 16/16, BatchTopK 5-8/16."""
    D = make_hierarchical_dictionary(seed=0, **HIER)
    x, on, child = D.sample(300 * 1024 + 8192, np.random.default_rng(1))
    x = torch.from_numpy(x)
    x = x / x.norm(dim=-1, keepdim=True)  # as unit_norm shards store it
    xt, xv, onv, chv = x[:-8192], x[-8192:], on[-8192:], child[-8192:]
    mat = _train_two_seeds("matryoshka", 256, 3, xt)
    btk = _train_two_seeds("batchtopk", 256, 3, xt)
    m1 = mat.prefix_sizes[0]
    assert m1 == P
    btk_small = _train_two_seeds("batchtopk", m1, 3, xt)  # "a BatchTopK of that prefix's size trained alone"
    with torch.no_grad():
        f_mat, f_btk = mat.encode(xv), btk.encode(xv)
        x_small, f_small = btk_small(xv)
    parents = torch.from_numpy(D.parents)
    report, checks = [], []
    for s in range(2):
        rm = parent_recovery((f_mat[s] > 0).numpy(), onv, chv)
        rb = parent_recovery((f_btk[s] > 0).numpy(), onv, chv)
        with torch.no_grad():
            member = mat.member(s)
            ev_full = _ev(mat(xv)[0][s], xv)
            x_p, f_p = prefix_forward(member, xv, m1)
            ev_prefix = _ev(x_p, xv)
            l0_prefix = float((f_p > 0).float().sum(-1).mean())
            in_prefix = int(((member.W_dec[0][member.prefix_mask(m1)[0]] @ parents.T).max(0).values > 0.9).sum())
            ev_small, l0_small = _ev(x_small[s], xv), float((f_small[s] > 0).float().sum(-1).mean())
        report.append(f"seed {s}: matryoshka {rm['recovered'].sum()}/{P} (EV {ev_full:.3f}; first prefix EV "
                      f"{ev_prefix:.3f} at L0 {l0_prefix:.2f}, {in_prefix}/{P} parents among its latents), batchtopk "
                      f"{rb['recovered'].sum()}/{P}; batchtopk-{m1} k=3 EV {ev_small:.3f} at L0 {l0_small:.2f} "
                      f"(prefix ratio {ev_prefix / ev_small:.3f}); parent latent fires on examples with a child: "
                      f"matryoshka {np.nanmean(rm['recall_with_child']):.2f}, batchtopk "
                      f"{np.nanmean(rb['recall_with_child']):.2f}")
        checks.append((rm, rb, ev_prefix, l0_prefix, in_prefix, ev_small))
    msg = "\n".join(report)
    print(msg)
    for rm, rb, ev_prefix, l0_prefix, in_prefix, ev_small in checks:
        assert rm["recovered"].sum() >= 0.8 * P, msg
        # absorbed: 30 % or more of the parents lost (measured 5-8 of 16 recovered over the benchmark's seeds 0-2 and
        # 5 / 5 for this test's two members at 1 and 2 threads on the AVX512 machine; the bound sits one seed spread above the highest)
        assert rb["recovered"].sum() <= 0.7 * P, msg
        assert rm["recovered"].sum() >= rb["recovered"].sum() + 4, msg
        # absorption itself: BatchTopK's best parent latents are silent on many with-child examples
        assert np.nanmean(rb["recall_with_child"]) < np.nanmean(rm["recall_with_child"]) - 0.1, msg
        # the first prefix alone: the parents are its latents, and it reconstructs as a BatchTopK of its size
        assert in_prefix >= P - 1, msg
        assert l0_prefix <= 3.0, msg  # no more codes per example than the BatchTopK it is compared with
        assert ev_prefix >= 0.9 * ev_small, msg
