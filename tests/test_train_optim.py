"""StackedAdam: equals torch.optim.Adam for S = 1, honours per-member lr, resets per-latent state."""

import pytest
import torch

from visae.optim import StackedAdam


def _loss(W, b, x):
    # W: [S, d_in, d_sae], b: [S, d_sae] -> a non-trivial scalar using every member
    return (torch.relu(torch.baddbmm(b[:, None, :], x.expand(W.shape[0], *x.shape), W)) ** 2).mean(dim=(1, 2)).sum()


def test_s1_equals_torch_adam_step_by_step():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(1, 8, 16, generator=g).requires_grad_()
    b = torch.randn(1, 16, generator=g).requires_grad_()
    W2, b2 = W.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ours = StackedAdam([W, b], lr=3e-3, betas=(0.9, 0.99), eps=1e-7, latent_axes=[2, 1])
    ref = torch.optim.Adam([W2, b2], lr=3e-3, betas=(0.9, 0.99), eps=1e-7)
    for t in range(40):
        x = torch.randn(32, 8, generator=g)
        for params, opt in (((W, b), ours), ((W2, b2), ref)):
            _loss(*params, x).backward()
            opt.step()
            opt.zero_grad()
        # Same arithmetic up to fused multiply-add rounding: a few float32 ulps.
        torch.testing.assert_close(W, W2, rtol=2e-6, atol=2e-7, msg=f"W differs at step {t}")
        torch.testing.assert_close(b, b2, rtol=2e-6, atol=2e-7, msg=f"b differs at step {t}")
        assert not torch.equal(W, W.detach() * 0)
    st = ref.state[W2]
    torch.testing.assert_close(ours.exp_avg[0], st["exp_avg"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(ours.exp_avg_sq[0], st["exp_avg_sq"], rtol=1e-5, atol=1e-10)


def test_per_member_lr_equals_separate_adams():
    g = torch.Generator().manual_seed(1)
    S, lrs = 3, [1e-3, 1e-2, 3e-2]
    W = torch.randn(S, 6, 10, generator=g).requires_grad_()
    W0 = W.detach().clone()
    singles = [W[i:i + 1].detach().clone().requires_grad_() for i in range(S)]
    ours = StackedAdam([W], lr=torch.tensor(lrs), latent_axes=[2])
    refs = [torch.optim.Adam([p], lr=lr) for p, lr in zip(singles, lrs)]
    for _ in range(15):
        x = torch.randn(16, 6, generator=g)
        (torch.relu(torch.bmm(x.expand(S, *x.shape), W)) ** 2).mean(dim=(1, 2)).sum().backward()
        ours.step()
        ours.zero_grad()
        for p, o in zip(singles, refs):
            (torch.relu(torch.bmm(x[None], p)) ** 2).mean().backward()
            o.step()
            o.zero_grad()
    for i in range(S):
        torch.testing.assert_close(W[i:i + 1], singles[i], rtol=2e-6, atol=2e-7)
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
    nz = grad.abs() > 1e-6
    if nz.any():
        torch.testing.assert_close(delta[nz], -1e-2 * torch.sign(grad[nz]), rtol=1e-4, atol=1e-7)


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
