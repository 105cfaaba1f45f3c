"""StackedAdam: equals torch.optim.Adam for S = 1, honours per-member lr, resets per-latent state."""

import math

import pytest
import torch

from tolerances import assert_close_derived
from visae.optim import StackedAdam

# One Adam step is ~12 roundings per element (moments: lerp, mul, addcmul; bias corrections: pow, sub,
# sqrt; update: sqrt, div, add, div, mul, sub), each relative to |p| or to the step size
# lr |m_hat| / sqrt(v_hat) <= lr / sqrt(1 - beta2). Over T steps: gamma_{12 T} (|p| + lr / sqrt(1 - beta2)).
# That bounds the roundings of the updates themselves, not their feedback through later gradients, so
# the multi-step comparisons run in float64: the bound (~1e-13) is then far below both that feedback and
# any real difference (a wrong bias correction moves p by ~lr (1 - beta1) = 1e-4 at the first step).
_OPS_PER_STEP = 12


def _adam_bound_scale(p_max: float, lr: float, beta2: float) -> float:
    return p_max + lr / math.sqrt(1.0 - beta2)


def _loss(W, b, x):
    # W: [S, d_in, d_sae], b: [S, d_sae] -> a non-trivial scalar using every member
    return (torch.relu(torch.baddbmm(b[:, None, :], x.expand(W.shape[0], *x.shape), W)) ** 2).mean(dim=(1, 2)).sum()


def test_s1_equals_torch_adam_step_by_step():
    g = torch.Generator().manual_seed(0)
    dt = torch.float64
    W = torch.randn(1, 8, 16, generator=g, dtype=dt).requires_grad_()
    b = torch.randn(1, 16, generator=g, dtype=dt).requires_grad_()
    W2, b2 = W.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ours = StackedAdam([W, b], lr=3e-3, betas=(0.9, 0.99), eps=1e-7, latent_axes=[2, 1])
    ref = torch.optim.Adam([W2, b2], lr=3e-3, betas=(0.9, 0.99), eps=1e-7)
    g_max = 0.0
    for t in range(40):
        x = torch.randn(32, 8, generator=g, dtype=dt)
        for params, opt in (((W, b), ours), ((W2, b2), ref)):
            _loss(*params, x).backward()
            g_max = max(g_max, float(params[0].grad.abs().max()), float(params[1].grad.abs().max()))
            opt.step()
            opt.zero_grad()
        scale = _adam_bound_scale(max(float(W.detach().abs().max()), float(b.detach().abs().max())), 3e-3, 0.99)
        n = _OPS_PER_STEP * (t + 1)
        assert_close_derived(W, W2, n_terms=n, scale=scale, dtype=dt, msg=f"W at step {t}")
        assert_close_derived(b, b2, n_terms=n, scale=scale, dtype=dt, msg=f"b at step {t}")
        assert not torch.equal(W, W.detach() * 0)
    st = ref.state[W2]
    # m_t: 2 roundings a step of terms <= max|g|; v_t: 3 a step of terms <= max g^2 (|m| <= max|g|, v <= max g^2).
    assert_close_derived(ours.exp_avg[0], st["exp_avg"], n_terms=2 * 40, scale=g_max, dtype=dt, msg="exp_avg")
    assert_close_derived(ours.exp_avg_sq[0], st["exp_avg_sq"], n_terms=3 * 40, scale=g_max ** 2, dtype=dt,
                         msg="exp_avg_sq")


def test_per_member_lr_equals_separate_adams():
    g = torch.Generator().manual_seed(1)
    S, lrs = 3, [1e-3, 1e-2, 3e-2]
    dt = torch.float64
    W = torch.randn(S, 6, 10, generator=g, dtype=dt).requires_grad_()
    W0 = W.detach().clone()
    singles = [W[i:i + 1].detach().clone().requires_grad_() for i in range(S)]
    ours = StackedAdam([W], lr=torch.tensor(lrs, dtype=dt), latent_axes=[2])
    refs = [torch.optim.Adam([p], lr=lr) for p, lr in zip(singles, lrs)]
    for _ in range(15):
        x = torch.randn(16, 6, generator=g, dtype=dt)
        (torch.relu(torch.bmm(x.expand(S, *x.shape), W)) ** 2).mean(dim=(1, 2)).sum().backward()
        ours.step()
        ours.zero_grad()
        for p, o in zip(singles, refs):
            (torch.relu(torch.bmm(x[None], p)) ** 2).mean().backward()
            o.step()
            o.zero_grad()
    for i in range(S):
        assert_close_derived(W[i:i + 1], singles[i], n_terms=_OPS_PER_STEP * 15, dtype=dt, msg=f"member {i}",
                             scale=_adam_bound_scale(float(W[i].detach().abs().max()), lrs[i], 0.999))
    # The members really moved by different amounts (larger lr, larger move).
    moved = [(W[i] - W0[i]).abs().mean().item() for i in range(S)]
    assert moved[0] < moved[1] < moved[2]
    # lr passed per step overrides the default (schedules use this).
    before = W.detach().clone()
    (W ** 2).sum().backward()
    ours.step(lr=torch.tensor([0.0, 0.0, 1e-2]))
    assert torch.equal(W[:2], before[:2]) and not torch.equal(W[2], before[2])


def test_reset_latents_restarts_state_like_a_fresh_adam():
    g = torch.Generator().manual_seed(2)
    S, d_in, d_sae = 2, 5, 7
    W_enc = torch.randn(S, d_in, d_sae, generator=g).requires_grad_()
    b_enc = torch.randn(S, d_sae, generator=g).requires_grad_()
    W_dec = torch.randn(S, d_sae, d_in, generator=g).requires_grad_()
    b_dec = torch.randn(S, d_in, generator=g).requires_grad_()
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = StackedAdam(params, lr=1e-2, latent_axes=[2, 1, 1, None])

    def step():
        x = torch.randn(9, d_in, generator=g)
        f = torch.relu(torch.baddbmm(b_enc[:, None], x.expand(S, 9, d_in) - b_dec[:, None], W_enc))
        ((torch.baddbmm(b_dec[:, None], f, W_dec) - x) ** 2).sum().backward()
        opt.step()
        opt.zero_grad()

    for _ in range(5):
        step()
    mask = torch.zeros(S, d_sae, dtype=torch.bool)
    mask[0, [1, 4]] = True
    mask[1, 6] = True
    bdec_m = opt.exp_avg[3].clone()
    opt.reset_latents_(mask)
    assert torch.all(opt.exp_avg[0][0, :, [1, 4]] == 0) and torch.all(opt.exp_avg_sq[0][1, :, 6] == 0)
    assert torch.all(opt.exp_avg[2][0, [1, 4], :] == 0) and torch.all(opt.exp_avg_sq[1][0, [1, 4]] == 0)
    assert torch.all(opt.exp_avg[0][0, :, 0] != 0)  # untouched latent keeps its moments
    assert torch.equal(opt.exp_avg[3], bdec_m)  # b_dec has no latent axis: kept
    assert opt.steps[0][0, 0, 1] == 0 and opt.steps[0][0, 0, 0] == 5 and opt.steps[2][1, 6, 0] == 0

    # After the reset, a reset latent's next update is exactly a first Adam step: lr * sign(grad).
    W_before = W_enc.detach().clone()
    x = torch.randn(9, d_in, generator=g)
    f = torch.relu(torch.baddbmm(b_enc[:, None], x.expand(S, 9, d_in) - b_dec[:, None], W_enc))
    ((torch.baddbmm(b_dec[:, None], f, W_dec) - x) ** 2).sum().backward()
    grad = W_enc.grad[0, :, 1].clone()
    opt.step()
    delta = W_enc.detach()[0, :, 1] - W_before[0, :, 1]
    # A first Adam step is -lr g / (|g| + eps) (m_hat = g, sqrt(v_hat) = |g|); its ~12 roundings are relative to
    # lr, and the two rounded parameters the delta is taken from add u |W| each.
    nz = grad != 0
    assert nz.any()
    want = -1e-2 * grad[nz] / (grad[nz].abs() + opt.eps)
    assert_close_derived(delta[nz], want, n_terms=_OPS_PER_STEP, dtype=torch.float32,
                         scale=1e-2 + 2 * W_before[0, :, 1][nz].abs(), msg="first step after the reset")


def test_state_dict_round_trip_and_shape_errors():
    W = torch.randn(2, 3, 4, requires_grad=True)
    opt = StackedAdam([W], lr=[1e-3, 2e-3], latent_axes=[2])
    (W ** 2).sum().backward()
    opt.step()
    opt2 = StackedAdam([W.detach().clone().requires_grad_()], lr=1.0, latent_axes=[2])
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.exp_avg[0], opt.exp_avg[0]) and torch.equal(opt2.lr, opt.lr)
    with pytest.raises(ValueError, match="leading member axis"):
        StackedAdam([W, torch.zeros(3, 4, requires_grad=True)])
    with pytest.raises(ValueError, match="lr has 3 values for 2 members"):
        StackedAdam([W], lr=[1, 2, 3])
    with pytest.raises(ValueError, match="mask shape"):
        opt.reset_latents_(torch.zeros(2, 3, dtype=torch.bool))
