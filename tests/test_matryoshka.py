"""Matryoshka SAE: the nested-prefix loss, its sparse path, stacking, save/load/export, training, and the planted
hierarchy ground truth (parents absorbed by a plain BatchTopK, recovered by Matryoshka)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tolerances import assert_bitwise_equal, assert_close_derived, sae_step_bounds
from visae.sae import SAEConfig, build_sae, load_sae, stack_saes
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


def test_loss_is_the_sum_of_cumulative_prefix_reconstructions():
    """The reference loss equals the definition written out naively: one full decode per prefix."""
    sae = _make()
    x = _x()
    out = sae.training_loss(x, impl="reference")
    with torch.no_grad():
        pre = sae.preacts(x)
        f = sae._batch_topk(pre)[0]  # [B, d_sae] (eval-free: threshold updates need grad + train mode)
        want = 0.0
        for m in sae.prefix_sizes:
            x_hat = f[:, :m] @ sae.W_dec[0, :m] + sae.b_dec[0]
            want += float((x_hat - x).pow(2).mean())
    # float32 sums over B * d_in = 960 terms per prefix, 5 prefixes
    tol = 5 * 960 * torch.finfo(torch.float32).eps * max(want, 1.0)
    assert abs(float(out.loss.detach()) - want) <= tol, (float(out.loss.detach()), want)
    # mse / EV describe the full reconstruction, as for every architecture
    full = f @ sae.W_dec[0] + sae.b_dec[0]
    n_terms, scale = sae_step_bounds(sae, x, torch.zeros(1))["mse"]
    assert_close_derived(out.mse[0], (full - x).pow(2).mean(), n_terms=n_terms, scale=scale[0], dtype=torch.float32,
                         msg="mse of the full reconstruction")
    assert float(out.loss) > float(out.mse[0])


@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("stacked_x", [False, True])
def test_sparse_path_equals_reference(S, stacked_x):
    sae = _make(S)
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
    # prefix_forward: the whole dictionary is forward(); a prefix zeroes the later codes
    x_full, f_full = prefix_forward(loaded, raw, loaded.d_sae)
    assert_bitwise_equal(x_full, loaded(raw)[0], "prefix_forward of the whole dictionary = forward")
    x_p, f_p = prefix_forward(loaded, raw, 24)
    assert (f_p[..., 24:] == 0).all() and torch.equal(f_p[..., :24], f_full[..., :24])


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
    alone and keeps them. 300 steps of batch 1024. Measured (the two seeds of the stack): Matryoshka 15/16, 14/16;
    BatchTopK 5/16, 5/16; the printed report has the details."""
    D = make_hierarchical_dictionary(seed=0, **HIER)
    x, on, child = D.sample(300 * 1024 + 8192, np.random.default_rng(1))
    x = torch.from_numpy(x)
    x = x / x.norm(dim=-1, keepdim=True)  # as unit_norm shards store it
    xt, xv, onv, chv = x[:-8192], x[-8192:], on[-8192:], child[-8192:]
    mat = _train_two_seeds("matryoshka", 256, 3, xt)
    btk = _train_two_seeds("batchtopk", 256, 3, xt)
    with torch.no_grad():
        f_mat, f_btk = mat.encode(xv), btk.encode(xv)
    m1 = mat.prefix_sizes[0]
    assert m1 == P
    report = []
    for s in range(2):
        rm = parent_recovery((f_mat[s] > 0).numpy(), onv, chv)
        rb = parent_recovery((f_btk[s] > 0).numpy(), onv, chv)
        with torch.no_grad():
            ev_full = _ev(mat(xv)[0][s], xv)
            ev_prefix = _ev(prefix_forward(mat.member(s), xv, m1)[0], xv)
        report.append(f"seed {s}: matryoshka {rm['recovered'].sum()}/{P} (EV {ev_full:.3f}, first prefix EV "
                      f"{ev_prefix:.3f}), batchtopk {rb['recovered'].sum()}/{P}; parent latent fires on examples "
                      f"with a child: matryoshka {np.nanmean(rm['recall_with_child']):.2f}, batchtopk "
                      f"{np.nanmean(rb['recall_with_child']):.2f}")
    msg = "\n".join(report)
    print(msg)
    for s in range(2):
        rm = parent_recovery((f_mat[s] > 0).numpy(), onv, chv)
        rb = parent_recovery((f_btk[s] > 0).numpy(), onv, chv)
        assert rm["recovered"].sum() >= 0.8 * P, msg
        assert rb["recovered"].sum() <= 0.6 * P, msg  # absorbed: 40% or more of the parents lost
        assert rm["recovered"].sum() >= rb["recovered"].sum() + 4, msg
        # absorption itself: BatchTopK's best parent latents are silent on many with-child examples
        assert np.nanmean(rb["recall_with_child"]) < np.nanmean(rm["recall_with_child"]) - 0.1, msg
