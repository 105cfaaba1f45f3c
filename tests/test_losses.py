"""Loss definitions checked against their sources (issue 10, items 1 and 3).

* Aux-k (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", A.2, and their reference
  ``train.py``): main term MSE / Var(x), aux term MSE(e_hat + b_dec, r + sg(b_dec)) / Var(r),
  alpha = 1/32. visae's ``loss = mse + alpha * aux`` must equal Var(x) times that objective,
  with the same gradients (times Var(x)), on the reference, fused and sparse paths.
* The acceptance probes: with half the latents dead the weighted aux term is a fraction of the
  reconstruction term, the total b_dec gradient follows the reconstruction gradient, and a
  planted run with half the latents dead reaches a good explained variance.
* Lambda conventions: loss_raw(lambda) = r^2 * loss_unit(lambda / r) on a fixed model, the
  conversion factor mean(r) / mean(r^2), and a raw-stored run equal to a unit-norm run.

Float tolerances: float32 results against float64 references, bounded by
eps32 * (number of summed terms) * (scale of the values); the actual difference is printed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tolerances import assert_close_derived
from visae.sae import SAEConfig, build_sae
from visae.synthetic import make_planted_dictionary

EPS32 = torch.finfo(torch.float32).eps
ALPHA = 1.0 / 32


def _close(got: torch.Tensor, want: torch.Tensor, n_terms: int, what: str) -> None:
    """|got - want| <= eps32 * n_terms * max|want| (worst-case rounding of n_terms float32 sums)."""
    got, want = got.detach().double(), want.detach().double()
    bound = EPS32 * n_terms * float(want.abs().max().clamp_min(1e-30))
    diff = float((got - want).abs().max())
    assert diff <= bound, f"{what}: max |difference| {diff:.3e} > bound {bound:.3e} (eps32 x {n_terms} terms x scale)"


# ============================================================================ aux-k: the reference form


def _reference_objective(p: dict[str, torch.Tensor], x: torch.Tensor, dead: torch.Tensor, arch: str, k: int,
                         aux_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gao et al.'s objective per member, written from the paper / reference code (float64, plain autograd).

    Returns (L [S], Var(x) [S]). p: W_enc [S, d, n], b_enc [S, n], W_dec [S, n, d], b_dec [S, d].
    """
    S = p["W_enc"].shape[0]
    xs = x.expand(S, *x.shape) if x.ndim == 2 else x
    B = xs.shape[1]
    pre = torch.einsum("sbd,sdn->sbn", xs - p["b_dec"][:, None], p["W_enc"]) + p["b_enc"][:, None]
    if arch == "topk":
        v, i = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    else:  # batchtopk: the k * B largest positive codes of the member's batch
        flat = torch.relu(pre).reshape(S, -1)
        v, i = flat.topk(k * B, dim=-1)
        f = torch.zeros_like(flat).scatter(-1, i, v).reshape(pre.shape)
    x_hat = torch.einsum("sbn,snd->sbd", f, p["W_dec"]) + p["b_dec"][:, None]
    var_x = (xs - xs.mean(1, keepdim=True)).pow(2).mean(dim=(1, 2))
    main = (x_hat - xs).pow(2).mean(dim=(1, 2)) / var_x
    r = (xs - x_hat).detach()
    var_r = (r - r.mean(1, keepdim=True)).pow(2).mean(dim=(1, 2))
    masked = pre.masked_fill(~dead[:, None, :], float("-inf"))
    va, ia = masked.topk(min(aux_k, pre.shape[-1]), dim=-1)
    f_aux = torch.zeros_like(pre).scatter(-1, ia, torch.relu(torch.nan_to_num(va, neginf=0.0)))
    aux_rec = torch.einsum("sbn,snd->sbd", f_aux, p["W_dec"]) + p["b_dec"][:, None]
    aux = (aux_rec - (r + p["b_dec"].detach()[:, None])).pow(2).mean(dim=(1, 2)) / var_r
    aux = aux * dead.any(-1)  # members without a dead latent have no aux term
    return main + ALPHA * aux, var_x


def _small(arch: str, S: int = 3):
    torch.manual_seed(0)
    cfg = SAEConfig(architecture=arch, d_in=24, d_sae=96, n_models=S, k=6, aux_k=10)
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.05)
    sae.eval()  # BatchTopK: no threshold update, so every call sees the same module
    return sae


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("impl", ["reference", "fused", "sparse"])
def test_aux_k_loss_is_gao_et_al_objective_times_var_x(arch, impl):
    sae = _small(arch)
    S, B, d, n = 3, 40, 24, 96
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, d, generator=g)
    x = x / x.norm(dim=-1, keepdim=True) + 0.3  # unit-norm rows plus a common offset, as CLIP embeddings
    dead = torch.zeros(S, n, dtype=torch.bool)
    dead[:, ::2] = True
    dead[-1] = False  # a member with no dead latent
    out = sae.training_loss(x, dead_mask=dead, impl=impl)
    out.loss.backward()

    p = {k: v.detach().double().requires_grad_(True) for k, v in sae.named_parameters()}
    L, var_x = _reference_objective(p, x.double(), dead, arch, k=6, aux_k=10)
    want = (var_x.detach() * L).sum()
    want.backward()
    n_terms = B * d + d + n  # the batch x feature means, after d- and n-long dot products
    _close(out.loss.detach(), want.detach(), n_terms, f"{arch}/{impl} loss")
    mse = out.mse.double()
    _close(out.mse + ALPHA * out.aux, (var_x * L).detach(), n_terms, f"{arch}/{impl} mse + alpha * aux per member")
    assert (out.aux[:-1] > 0).all() and out.aux[-1] == 0
    # the weighted aux term relative to the reconstruction term is the reference's (a ratio: scale free)
    ratio_ref = (L - (mse / var_x)) / (mse / var_x)
    _close(ALPHA * out.aux.double() / mse, ratio_ref.detach(), n_terms, f"{arch}/{impl} aux / mse ratio")
    for name, prm in sae.named_parameters():
        _close(prm.grad, p[name].grad, n_terms * 4, f"{arch}/{impl} d loss / d {name}")


def test_aux_k_term_undefined_batch_gives_zero():
    """A 1-row batch has no residual variance: the aux term is 0 (the reference's nan_to_num(0)), finite loss."""
    sae = _small("topk", S=1)
    dead = torch.ones(1, 96, dtype=torch.bool)
    for impl in ("reference", "sparse"):
        out = sae.training_loss(torch.randn(1, 24), dead_mask=dead, impl=impl)
        assert out.aux.item() == 0.0 and torch.isfinite(out.loss)


def test_fused_is_the_reference_path_for_k_architectures():
    """TopK / BatchTopK have no fused kernel: impl="fused" runs the reference loss (bit-identical)."""
    for arch in ("topk", "batchtopk"):
        sae = _small(arch)
        x = torch.randn(40, 24, generator=torch.Generator().manual_seed(4))
        dead = torch.zeros(3, 96, dtype=torch.bool)
        dead[:, 1::3] = True
        a = sae.training_loss(x, dead_mask=dead, impl="reference")
        b = sae.training_loss(x, dead_mask=dead, impl="fused")
        assert torch.equal(a.loss, b.loss) and torch.equal(a.aux, b.aux)


# ============================================================================ aux-k: the acceptance probes


def _clip_like(n: int, seed: int = 0, d: int = 64, offset: float = 1.2) -> torch.Tensor:
    """Planted-dictionary rows plus a common direction, unit-normalised (mean squared norm of the mean ~ 0.6)."""
    D = make_planted_dictionary(d=d, n_atoms=256, mean_active=4, seed=0)
    x, _ = D.sample(n, np.random.default_rng(seed))
    x = torch.from_numpy(x)
    off = torch.randn(d, generator=torch.Generator().manual_seed(5))
    x = x / x.norm(dim=-1, keepdim=True) + offset * off / off.norm()
    return x / x.norm(dim=-1, keepdim=True)


def _train(sae, x, dead, steps, lr, B, impl):
    """The trainer's step: training_loss, backward, remove_parallel_grad_, Adam, normalize_decoder_."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sae.train()
    for step in range(steps):
        xb = x[(step * B) % (len(x) - B):][:B]
        out = sae.training_loss(xb, dead_mask=dead, impl=impl)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
        assert torch.isfinite(out.loss)
    sae.eval()
    return sae


def _b_dec_grads(sae, x, dead, impl):
    def grad(mask):
        s = sae.copy()
        s.eval()
        out = s.training_loss(x, dead_mask=mask, impl=impl)
        out.loss.backward()
        return out, s.b_dec.grad.flatten().double()

    out, g_total = grad(dead)
    _, g_rec = grad(None)
    return out, g_rec, g_total - g_rec


@pytest.fixture(scope="module")
def half_dead_saes():
    """d 64, d_sae 512, k 8, aux_k 256; latents 256..511 flagged dead throughout; 40 reference steps."""
    x = _clip_like(12000)
    dead = torch.zeros(1, 512, dtype=torch.bool)
    dead[:, 256:] = True
    saes = {}
    for arch in ("topk", "batchtopk"):
        sae = build_sae(SAEConfig(architecture=arch, d_in=64, d_sae=512, k=8, aux_k=256),
                        generator=torch.Generator().manual_seed(0))
        sae.init_b_dec_(x[:2048])
        fresh = sae.copy()
        saes[arch] = (fresh, _train(sae, x[:-1024], dead, steps=40, lr=1e-3, B=256, impl="reference"))
    return x[-1024:], dead, saes


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("impl", ["reference", "fused", "sparse"])
def test_aux_k_term_is_small_and_b_dec_follows_reconstruction(arch, impl, half_dead_saes):
    """Measured here (topk / batchtopk, every path the same). Reference form: weighted aux 0.35 / 0.29 x
    the reconstruction term at the start, 0.10 / 0.10 after 40 steps, when the aux gradient on b_dec
    is 0.61 / 0.58 x the reconstruction one and the total b_dec gradient has cosine +0.85 / +0.87
    with the reconstruction gradient. The old units (aux / Var(r) only): 56 / 45 x at the start,
    9.3 / 9.1 x after 40 steps, b_dec gradient 16 / 15 x, cosine -0.85 / -0.87.
    Not asserted: the aux gradient on b_dec alone keeps cosine -0.88 with the reconstruction one in
    both forms (reweighting by a positive constant cannot change a cosine); what changed is its size."""
    xv, dead, saes = half_dead_saes
    fresh, trained = saes[arch]
    out0 = fresh.training_loss(xv, dead_mask=dead, impl=impl)
    assert ALPHA * out0.aux.item() <= 1.0 * out0.mse.item(), \
        f"at init: weighted aux {ALPHA * out0.aux.item():.3e} > reconstruction term {out0.mse.item():.3e}"
    out, g_rec, g_aux = _b_dec_grads(trained, xv, dead, impl)
    ratio = ALPHA * out.aux.item() / out.mse.item()
    assert 0 < ratio <= 1.0, f"weighted aux / reconstruction = {ratio:.3f}"
    size = float(g_aux.norm() / g_rec.norm())
    assert size <= 1.0, f"|aux gradient on b_dec| = {size:.3f} x |reconstruction gradient|"
    cos = float(torch.nn.functional.cosine_similarity(g_rec + g_aux, g_rec, dim=0))
    assert cos > 0, f"total b_dec gradient points against the reconstruction gradient (cosine {cos:.3f})"


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("impl", ["reference", "sparse"])  # fused = reference for these (test above)
def test_planted_run_with_half_the_latents_dead(arch, impl):
    """d 64, d_sae 1024 (half flagged dead throughout), k 8, aux_k 512, 200 Adam steps of 128 at lr 1e-2.

    Measured (reference = sparse): EV 0.872 (topk) / 0.839 (batchtopk), |b_dec - mean| 0.09 / 0.10;
    with the old aux units EV 0.742 / 0.682. Init seeds 0-2 (2026-12-01, AVX512 machine): EV 0.863-0.872 / 0.832-0.839,
    drift 0.086-0.103: the 0.78 / 0.25 bounds sit 7 seed spreads away and still fail the old units."""
    x = _clip_like(30000)
    xt, xv = x[:-4096], x[-4096:]
    dead = torch.zeros(1, 1024, dtype=torch.bool)
    dead[:, 512:] = True
    sae = build_sae(SAEConfig(architecture=arch, d_in=64, d_sae=1024, k=8, aux_k=512),
                    generator=torch.Generator().manual_seed(0))
    sae.init_b_dec_(xt[:2048])
    _train(sae, xt, dead, steps=200, lr=1e-2, B=128, impl=impl)
    with torch.no_grad():
        x_hat, _ = sae(xv)
        ev = float(1 - (x_hat - xv).pow(2).sum() / (xv - xv.mean(0)).pow(2).sum())
        drift = float((sae.b_dec[0] - xv.mean(0)).norm())
    assert ev >= 0.78, f"{arch}/{impl}: explained variance {ev:.3f} < 0.78 (issue 10 asks >= 0.6)"
    assert drift <= 0.25, f"{arch}/{impl}: b_dec is {drift:.3f} from the data mean"


# ============================================================================ lambda conventions


@pytest.mark.parametrize("arch,power", [("relu", 1), ("jumprelu", 2)])
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_raw_and_unit_losses_satisfy_the_identity(arch, power, impl):
    """A model on raw rows of norm r and its rescaled copy on the unit rows: loss_raw(l) = r^2 loss_unit(l / r^p)

    (p = 1 for the L1 term, 2 for JumpReLU's L0). The copy: same W_enc / W_dec, biases and
    threshold divided by r, so its codes are the raw codes / r."""
    r = 7.3
    torch.manual_seed(0)
    cfg = SAEConfig(architecture=arch, d_in=24, d_sae=96, input_normalization="none", jumprelu_init_threshold=0.05)
    raw_sae = build_sae(cfg)
    with torch.no_grad():
        raw_sae.b_enc.normal_(0, 0.3)
        raw_sae.b_dec.normal_(0, 0.5)
    unit_sae = raw_sae.copy()
    with torch.no_grad():
        unit_sae.b_enc.div_(r)
        unit_sae.b_dec.div_(r)
        if arch == "jumprelu":
            unit_sae.log_threshold.sub_(np.log(r))
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(2))
    x = x / x.norm(dim=-1, keepdim=True)
    lam = 2e-2
    lo_raw = raw_sae.training_loss(x * r, lam, impl=impl)
    lo_unit = unit_sae.training_loss(x, lam / r ** power, impl=impl)
    n_terms = 64 * 24 + 24 + 96
    _close(lo_raw.loss.detach(), r ** 2 * lo_unit.loss.detach(), n_terms, f"{arch} loss_raw vs r^2 loss_unit")
    _close(lo_raw.mse, r ** 2 * lo_unit.mse, n_terms, f"{arch} mse")
    assert torch.equal(lo_raw.l0, lo_unit.l0)


def _write(path, rows: np.ndarray, normalization: str):
    from visae.shards import ShardSet, ShardWriter

    with ShardWriter(path, rows.shape[1], dtype="float32", shard_size=256, normalization=normalization,
                     resume=False, overwrite=True) as w:
        w.add(rows, ids=[f"x/{i}" for i in range(len(rows))])
    return ShardSet(path)


def test_conversion_factor(tmp_path):
    from visae.train import TrainError, l1_coeffs_used

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((500, 16)).astype(np.float32)
    rows *= rng.uniform(2.0, 12.0, size=(500, 1)).astype(np.float32)  # norms vary 5x
    unit = _write(tmp_path / "unit", rows, "unit_norm")
    view = unit.split(0.2, seed=0)[0]
    r = unit.metadata()["norm"][view.index].astype(np.float64)
    relu = SAEConfig(architecture="relu", d_in=16, d_sae=32)
    used, info = l1_coeffs_used([1e-3, 4e-3], "raw", view, relu)
    want = r.mean() / (r ** 2).mean()
    # two float64 means of n positive terms (relative gamma_n each) and a division; once more for lambda x factor
    n = len(r)
    assert_close_derived(info["factor"], want, n_terms=2 * n + 1, scale=want, dtype=np.float64, msg="factor")
    assert not info["exact"]
    assert_close_derived(used, [1e-3 * want, 4e-3 * want], n_terms=2 * n + 2, scale=[1e-3 * want, 4e-3 * want],
                         dtype=np.float64, msg="converted lambdas")
    jump = SAEConfig(architecture="jumprelu", d_in=16, d_sae=32)
    assert_close_derived(l1_coeffs_used([1.0], "raw", view, jump)[1]["factor"], 1 / (r ** 2).mean(), n_terms=n + 2,
                         scale=1 / (r ** 2).mean(), dtype=np.float64, msg="JumpReLU factor")
    assert l1_coeffs_used([3e-5], "unit", view, relu) == ([3e-5], {"convention": "unit", "factor": 1.0})
    # constant norms: exactly 1 / r
    const = rows / np.linalg.norm(rows, axis=1, keepdims=True) * np.float32(4.0)
    cview = _write(tmp_path / "const", const, "unit_norm").split(0.2, seed=0)[0]
    _, cinfo = l1_coeffs_used([1.0], "raw", cview, relu)
    # each norm is 4 (1 + delta), |delta| <= gamma_{d+3}(f32) (float32 normalisation, x 4, the stored norm);
    # mean(r) / mean(r^2) = (1 + O(delta)) / 4 to first order within 3 max|delta|
    assert_close_derived(cinfo["factor"], 0.25, n_terms=3 * (16 + 3), scale=0.25, dtype=np.float32, computations=1,
                         msg="constant-norm factor")
    # rows stored as given: the SAE space is rows * scale_factor c, exactly lambda * c
    none_view = _write(tmp_path / "none", rows, "none").split(0.2, seed=0)[0]
    c = 0.0625
    _, ninfo = l1_coeffs_used([1.0], "raw", none_view, SAEConfig(architecture="relu", d_in=16, d_sae=32,
                                                                    input_normalization="none", scale_factor=c))
    assert ninfo["factor"] == c and ninfo["exact"]
    with pytest.raises(TrainError, match="l1_convention"):
        l1_coeffs_used([1.0], "dncbm", view, relu)


def test_raw_stored_run_equals_unit_norm_run(tmp_path):
    """Constant-norm data (+-1 rows, norm 4 exactly): shards stored raw and shards stored unit-norm, both with
    l1_convention raw, train the same SAE: cfg.json records lambda given and lambda used (lambda / 4), and the
    codes agree up to the scale (exactly: every rescaling here is by a power of two)."""
    from visae.sae import load_sae
    from visae.train import TrainConfig, train

    rng = np.random.default_rng(0)
    D = make_planted_dictionary(d=16, n_atoms=24, mean_active=3, seed=1)
    x, _ = D.sample(768, rng)
    rows = np.where(x >= 0, 1.0, -1.0).astype(np.float32)  # norm exactly 4 in float32 and float64
    lam = 4e-3
    outs = {}
    for norm in ("none", "unit_norm"):
        shards = _write(tmp_path / f"shards_{norm}", rows, norm)
        cfg = TrainConfig(shards=str(shards.path), out=str(tmp_path / f"sae_{norm}"), num_epochs=3, batch_size=64,
                          expansion_factor=2, lr=3e-3, l1_coeff=lam, l1_convention="raw", lr_warmup_steps=5,
                          l1_warmup_steps=10, resample_every=0, log_every=10, progress=False, plot=False,
                          init_examples=512, device="cpu")
        outs[norm] = load_sae(train(cfg))
        rec = json.loads((tmp_path / f"sae_{norm}" / "cfg.json").read_text())["extra"]["train"]
        assert rec["l1_coeff"] == lam and rec["l1_convention"] == "raw"
        assert rec["l1_coeff_used"] == lam / 4 and rec["l1_conversion"]["exact"], rec
    raw_sae, unit_sae = outs["none"], outs["unit_norm"]
    assert raw_sae.cfg.scale_factor == 0.25 and unit_sae.cfg.input_normalization == "unit_norm"
    q = torch.from_numpy(rows[:200])
    f_unit = unit_sae.encode(q)
    assert torch.equal(raw_sae.encode(q), f_unit)  # both in SAE units
    f_raw_units = raw_sae.exported().encode(q)  # scale folded: codes in raw units
    _close(f_raw_units, 4 * f_unit, 16 + 1, "exported raw-stored codes vs 4 x unit-norm codes")
    assert (f_unit > 0).any()
