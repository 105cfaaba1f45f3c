"""Fast paths (fused dense ReLU, sparse gather paths) equal the plain-autograd reference: values and gradients."""

from __future__ import annotations

import pytest
import torch

from tolerances import assert_bitwise_equal, assert_close_derived, sae_step_bounds
from visae.sae import SAEConfig, build_sae


PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _make(arch, S, **kw):
    torch.manual_seed(0)
    cfg = SAEConfig(architecture=arch, d_in=24, d_sae=96, n_models=S, k=6, aux_k=10,
                    jumprelu_bandwidth=0.05, jumprelu_init_threshold=0.05, **kw)
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.05)
        sae.W_enc.mul_(1.5)
    return sae


def _run(sae, x, coeff, impl, dead=None):
    for p in sae.parameters():
        p.grad = None
    out = sae.training_loss(x, l1_coeff=coeff, impl=impl, dead_mask=dead)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    return out, grads


CASES = [("relu", "fused"), ("relu", "sparse"), ("topk", "sparse"), ("batchtopk", "sparse"), ("jumprelu", "sparse")]


@pytest.mark.parametrize("arch,impl", CASES)
@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("stacked_x", [False, True])
def test_fast_path_equals_reference(arch, impl, S, stacked_x):
    sae = _make(arch, S)
    g = torch.Generator().manual_seed(1)
    B = 40
    x = torch.randn(S, B, 24, generator=g) if stacked_x else torch.randn(B, 24, generator=g)
    x = x / x.norm(dim=-1, keepdim=True) + 0.1
    coeff = torch.linspace(1e-2, 3e-2, S)
    dead = None
    if sae.uses_aux:
        dead = torch.zeros(S, 96, dtype=torch.bool)
        dead[:, ::3] = True
        dead[-1] = False  # a member with no dead latent
    ref_sae = sae.copy()
    ref, g_ref = _run(ref_sae, x, coeff, "reference", dead)
    out, g_out = _run(sae, x, coeff, impl, dead)
    bounds = sae_step_bounds(sae, x, coeff, dead)
    for name in ("loss", "mse", "l1", "l0", "explained_variance", "aux", "sq_err"):
        n_terms, scale = bounds[name]
        assert_close_derived(getattr(out, name), getattr(ref, name), n_terms=n_terms, scale=scale,
                             dtype=torch.float32, probabilistic=True, msg=name)
    assert torch.equal(out.fired, ref.fired)
    if dead is not None:
        assert (ref.aux[:-1] > 0).all() and ref.aux[-1] == 0
    for name, gr in g_ref.items():
        n_terms, scale = bounds[name]
        assert_close_derived(g_out[name], gr, n_terms=n_terms, scale=scale, dtype=torch.float32, probabilistic=True,
                             msg=f"d loss / d {name}")
    if arch == "jumprelu":
        assert g_ref["log_threshold"].abs().sum() > 0  # the straight-through gradient is exercised
    if arch == "batchtopk":
        # the running threshold is the smallest kept pre-activation (an order statistic moves by no more than the
        # values it is taken from) put through the momentum average (2 more roundings): the codes' bound
        n_terms, P = bounds["codes"]
        assert_close_derived(sae.threshold, ref_sae.threshold, n_terms=n_terms + 2, scale=P.amax(dim=(1, 2)),
                             dtype=torch.float32, probabilistic=True, msg="batchtopk threshold")
        assert (sae.threshold > 0).all()


def test_batchtopk_threshold_only_on_training_steps():
    sae = _make("batchtopk", 1)
    x = torch.randn(64, 24)
    with torch.no_grad():
        sae.training_loss(x)
    assert sae.threshold.item() == -1.0
    sae.training_loss(x).loss.backward()
    assert sae.threshold.item() > 0
    # inference uses the fixed threshold: an example's codes do not depend on the batch
    f_all = sae.encode(x)
    f_one = sae.encode(x[:1])
    # a GEMM of 1 row vs 64 rows may sum in another order: the codes' derived bound (row 0 of the batch)
    n_terms, P = sae_step_bounds(sae, x, torch.zeros(1))["codes"]
    assert_close_derived(f_one, f_all[:1], n_terms=n_terms, scale=P[0, :1], dtype=torch.float32,
                         probabilistic=True, msg="codes of one row alone vs in the batch")
    assert ((f_all == 0) | (f_all > sae.threshold)).all()


def test_batchtopk_select_exact_on_large_batch():
    """The sampled-candidate selection equals a full top-(k*B) on a realistic shape."""
    sae = _make("batchtopk", 1)
    pre = torch.randn(512, 96) * torch.rand(96) + torch.randn(96) * 0.3
    p, v = sae._sparse_select(pre, 0)
    flat = torch.relu(pre).reshape(-1)
    ref = flat.topk(6 * 512).values
    assert p.nnz == 6 * 512
    assert_bitwise_equal(v.sort().values, ref.sort().values, "selected values")  # the same elements of pre, copied


def test_fused_guard_against_stale_backward():
    sae = _make("relu", 1)
    x = torch.randn(16, 24)
    a = sae.training_loss(x, 1e-3, impl="fused")
    sae.training_loss(x, 1e-3, impl="fused")
    with pytest.raises(RuntimeError, match="before backward"):
        a.loss.backward()


def test_fused_repeated_steps_match_reference():
    """Workspace buffers reused across steps give the reference's gradients at every step of a trajectory.

    The fused SAE keeps its buffers from step to step while its parameters follow the reference's Adam
    trajectory; each step's gradients are compared with the derived one-step bound (comparing the two
    trajectories after several Adam steps would compare amplified rounding, which has no useful bound).
    """
    a, b = _make("relu", 2), _make("relu", 2)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    coeff = torch.full((2,), 1e-2)
    for t in range(5):
        x = torch.randn(32, 24, generator=g)
        with torch.no_grad():
            for n in PARAMS:
                getattr(a, n).copy_(getattr(b, n))
        _, g_a = _run(a, x, coeff, "fused")
        bounds = sae_step_bounds(b, x, coeff)
        _, g_b = _run(b, x, coeff, "reference")
        for n in PARAMS:
            assert_close_derived(g_a[n], g_b[n], n_terms=bounds[n][0], scale=bounds[n][1], dtype=torch.float32,
                                 probabilistic=True, msg=f"step {t}: d loss / d {n}")
        b.remove_parallel_grad_()
        opt_b.step()
        b.normalize_decoder_()


@pytest.mark.parametrize("arch,impl", CASES)
def test_bf16_autocast_close_to_fp32(arch, impl):
    """Under bf16 autocast the fast paths run their GEMMs in bf16; loss and gradients stay close to fp32."""
    sae = _make(arch, 1)
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(2))
    x = x / x.norm(dim=-1, keepdim=True)
    ref_sae = sae.copy()
    ref, g_ref = _run(ref_sae, x, 1e-2, "reference")
    for p in sae.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.training_loss(x, 1e-2, impl=impl)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and out.mse.dtype == torch.float32
    if arch == "relu":
        # ReLU codes are continuous in the pre-activations, so the loss is too: each value went through at most
        # 6 bf16 roundings (x, W_enc, pre, f, W_dec, x_hat) plus fp32 sums of n terms (n u32 = n 2^-15 u_bf16)
        n_terms, scale = sae_step_bounds(ref_sae, x, torch.full((1,), 1e-2))["loss"]
        assert_close_derived(out.loss, ref.loss, n_terms=6 + -(-n_terms // 2 ** 15), scale=scale,
                             dtype=torch.bfloat16, computations=1, msg="bf16 loss")
    # Statistical, not derived (issue 10): a bf16 rounding (u = 2^-9) moves pre-activations by ~1% of their
    # scale, so TopK / BatchTopK / JumpReLU selections and the ReLU gradient mask (discontinuous at 0) flip for
    # codes near the cut; a flipped code changes the loss and the gradients by its value times a decoder
    # direction, which no rounding bound covers. 1% of the loss and a gradient cosine of 0.99 allow a few flips.
    assert abs(out.loss.item() - ref.loss.item()) <= 0.01 * ref.loss.item(), (out.loss.item(), ref.loss.item())
    for name, p in sae.named_parameters():
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), g_ref[name].flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


def test_auto_switches_to_sparse_when_codes_are_sparse(monkeypatch):
    from visae.sae import kernels

    calls = []
    real = kernels.sparse_training_loss
    monkeypatch.setattr(kernels, "sparse_training_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    sae = _make("relu", 1, sparse_threshold=0.05)
    x = torch.randn(32, 24)
    sae.training_loss(x, 1e-3).loss.backward()  # first step: dense (no L0 known yet), L0 ~ half the latents
    assert not calls
    with torch.no_grad():
        sae.b_enc.fill_(-6.0)  # now only a few codes fire
    out = sae.training_loss(x, 1e-3)
    out.loss.backward()
    assert not calls and out.l0.item() / 96 < 0.05  # this step measured the low L0 ...
    sae.training_loss(x, 1e-3).loss.backward()
    assert calls  # ... so the next one takes the sparse path
