"""SAE family: shapes, stacking, init recipe, decoder constraints, save/load, fold/export, errors."""

from __future__ import annotations

import json

import pytest
import torch

from tolerances import assert_bitwise_equal, assert_close_derived, sae_step_bounds
from visae.sae import SAE, SAEConfig, SAEFormatError, build_sae, load_sae, stack_saes

ARCHS = ["relu", "topk", "batchtopk", "jumprelu"]


def _cfg(arch="relu", **kw):
    base = dict(architecture=arch, d_in=16, d_sae=48, k=4, aux_k=8)
    base.update(kw)
    return SAEConfig(**base)


def _unit(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("S", [1, 3])
def test_shapes(arch, S):
    sae = build_sae(_cfg(arch, n_models=S))
    x = torch.randn(10, 16) * 5
    x_hat, f = sae(x)
    lead = () if S == 1 else (S,)
    assert x_hat.shape == (*lead, 10, 16) and f.shape == (*lead, 10, 48)
    assert sae.encode(x).shape == f.shape
    assert sae.decode(f).shape == x_hat.shape
    xs = torch.randn(S, 10, 16)
    x_hat, f = sae(xs)
    assert x_hat.shape == (S, 10, 16) and f.shape == (S, 10, 48)
    out = sae.training_loss(_unit(10, 16), l1_coeff=1e-3)
    assert out.loss.ndim == 0
    for name in ("mse", "l1", "l0", "explained_variance", "aux"):
        assert getattr(out, name).shape == (S,), name
    assert out.fired.shape == (S, 48) and out.fired.dtype == torch.bool
    assert out.sq_err.shape == (S, 10)


def test_init_recipe():
    sae = build_sae(_cfg(n_models=2))
    norms = sae.W_dec.norm(dim=-1)
    # a row divided by its norm: its norm is 1 up to the d squares summed, the sqrt and the division
    assert_close_derived(norms, torch.ones_like(norms), n_terms=16 + 3, scale=1.0, dtype=torch.float32, msg="row norms")
    assert_bitwise_equal(sae.W_enc, sae.W_dec.transpose(1, 2), msg="W_enc = W_dec^T")  # a copy
    assert sae.b_enc.abs().sum() == 0 and sae.b_dec.abs().sum() == 0
    # members are initialised independently
    assert not torch.allclose(sae.W_dec[0], sae.W_dec[1])


def test_init_b_dec():
    sae = build_sae(_cfg(n_models=2))
    x = _unit(200, 16) + torch.linspace(0, 1, 16)
    x[:5] += 100.0  # outliers: the geometric median resists them, the mean does not
    med = sae.init_b_dec_(x, method="geometric_median")
    assert_bitwise_equal(sae.b_dec[1], med, msg="stored geometric median")  # a copy
    mean = x.mean(0)
    clean_mean = x[5:].mean(0)
    assert (med - clean_mean).norm() < 0.2 * (mean - clean_mean).norm()
    sae.init_b_dec_(x, method="mean")
    assert_bitwise_equal(sae.b_dec[0], mean, msg="stored mean")  # the same x.mean(0) (scale_factor 1 is exact)


def _close(a, b, bounds, key, what, factor=1.0):
    """a and b within the derived rounding bound of ``bounds[key]`` (tests/tolerances.sae_step_bounds) of member 0."""
    n_terms, scale = bounds[key]
    assert_close_derived(a, b, n_terms=n_terms, scale=factor * (scale[0] if scale.ndim else scale),
                         dtype=torch.float32, probabilistic=True, msg=what)


@pytest.mark.parametrize("arch", ARCHS)
def test_stack_equals_members(arch):
    torch.manual_seed(0)
    singles = [build_sae(_cfg(arch)) for _ in range(3)]
    for s in singles:  # non-trivial biases
        with torch.no_grad():
            s.b_enc.normal_(0, 0.1)
            s.b_dec.normal_(0, 0.1)
    stacked = stack_saes(singles)
    assert stacked.n_models == 3
    x = _unit(12, 16, seed=1)
    coeff = torch.tensor([1e-3, 2e-3, 3e-3])
    out = stacked.training_loss(x, l1_coeff=coeff, impl="reference")
    out.loss.backward()
    x2 = _unit(12, 16, seed=2)
    for i, s in enumerate(singles):
        # the rounding bounds of member i's step (tests/tolerances.py), from the single SAE before its step
        bd = sae_step_bounds(s, x, coeff[i:i + 1])
        o = s.training_loss(x, l1_coeff=float(coeff[i]), impl="reference")
        o.loss.backward()

        _close(out.mse[i], o.mse[0], bd, "mse", f"member {i}: mse")
        _close(out.l1[i], o.l1[0], bd, "l1", f"member {i}: l1")
        _close(out.sq_err[i], o.sq_err[0], bd, "sq_err", f"member {i}: sq_err")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            _close(getattr(stacked, name).grad[i], getattr(s, name).grad[0], bd, name, f"member {i}: d loss / d {name}")
        # inference on other raw inputs (not the batch that set a batchtopk threshold: no ties)
        bd = sae_step_bounds(s, x2, coeff[i:i + 1])
        x_hat, f = stacked(x2 * 3)
        x_hat1, f1 = s(x2 * 3)
        _close(x_hat[i], x_hat1, bd, "x_hat", f"member {i}: x_hat (x 3)", factor=3.0)  # raw space: 3 x the SAE-space scale
        _close(f[i], f1, bd, "codes", f"member {i}: codes")
        # member() gives back the same SAE; unit_norm input: raw scale does not change the codes
        m = stacked.member(i)
        _close(m(x2)[0], x_hat1 / 3, bd, "x_hat", f"member {i}: member() x_hat")


def test_decoder_constraints():
    sae = build_sae(_cfg())
    out = sae.training_loss(_unit(32, 16), l1_coeff=1e-2, impl="reference")
    out.loss.backward()
    g0 = sae.W_dec.grad.clone()
    sae.remove_parallel_grad_()
    par = (sae.W_dec.grad * sae.W_dec).sum(-1)
    # g - (g.w / |w|^2) w has no component along w up to rounding: two d-term dot products and a few
    # elementwise operations, each term at most |g_i w_i| (twice: g and its projection); |w| = 1.
    scale = 2 * (g0.abs() * sae.W_dec.detach().abs()).sum(-1)
    assert_close_derived(par, torch.zeros_like(par), n_terms=2 * 16 + 4, scale=scale, dtype=torch.float32,
                         msg="decoder gradient . decoder row after remove_parallel_grad_")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        sae.training_loss(_unit(32, 16), l1_coeff=1e-2).loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
    norms = sae.W_dec.norm(dim=-1)
    assert_close_derived(norms, torch.ones_like(norms), n_terms=16 + 3, scale=1.0, dtype=torch.float32, msg="row norms")


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip(tmp_path, arch):
    sae = build_sae(_cfg(arch, n_models=2, scale_factor=2.0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    extra = {"train": {"lr": 1e-3}, "source": {"model": "planted", "layer": 3}}
    d = sae.save(tmp_path / "sae", extra=extra)
    assert (d / "cfg.json").is_file() and (d / "weights.safetensors").is_file()
    doc = json.loads((d / "cfg.json").read_text())
    assert doc["architecture"] == arch and doc["d_in"] == 16 and doc["extra"] == extra
    loaded = load_sae(d)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg and loaded.extra == extra
    loaded2 = SAE.load(d)
    x = torch.randn(7, 16)
    for a, b in zip(sae(x), loaded(x)):  # the same weights through the same code: bit for bit
        assert_bitwise_equal(a, b, msg="loaded SAE output")
    assert_bitwise_equal(loaded2(x)[0], sae(x)[0], msg="SAE.load output")


def test_load_errors(tmp_path):
    with pytest.raises(SAEFormatError, match="does not exist"):
        load_sae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEFormatError, match="cfg.json is missing"):
        load_sae(tmp_path / "empty")
    d = build_sae(_cfg()).save(tmp_path / "s")
    doc = json.loads((d / "cfg.json").read_text())
    doc["d_sae"] = 50
    (d / "cfg.json").write_text(json.dumps(doc))
    with pytest.raises(SAEFormatError, match="cfg.json is damaged or was edited"):
        load_sae(d)
    doc.pop("checksums")  # the documented way to load an edited cfg.json: unverified, with a warning
    (d / "cfg.json").write_text(json.dumps(doc))
    with pytest.raises(SAEFormatError, match="do not fit"), pytest.warns(UserWarning, match="records no checksums"):
        load_sae(d)


@pytest.mark.parametrize("arch", ARCHS)
def test_k_is_validated_only_where_it_is_used(tmp_path, arch):
    # d_sae=8 < k=32 (the default k) and aux_k=512: only topk / batchtopk read k.
    if arch in ("topk", "batchtopk"):
        with pytest.raises(ValueError, match="k=32 exceeds d_sae=8"):
            _cfg(arch, d_sae=8, k=32)
        with pytest.raises(ValueError, match="k must be positive"):
            _cfg(arch, k=0)
        cfg = _cfg(arch, d_sae=8, k=8, aux_k=512)  # aux_k > d_sae is fine: clamped where used
    else:
        cfg = _cfg(arch, d_sae=8, k=32, aux_k=512)
    sae = build_sae(cfg)
    out = sae.training_loss(_unit(6, 16), l1_coeff=1e-3, dead_mask=torch.ones(1, 8, dtype=torch.bool))
    assert torch.isfinite(out.loss) and out.l0.item() <= 8
    loaded = load_sae(sae.save(tmp_path / "s"))
    assert loaded.cfg == cfg

def test_d_in_mismatch_error():
    sae = build_sae(_cfg())
    with pytest.raises(SAEFormatError, match="d_in=16"):
        sae(torch.randn(4, 32))
    with pytest.raises(SAEFormatError, match="d_in=16"):
        sae.training_loss(torch.randn(4, 32))
    with pytest.raises(SAEFormatError, match="members"):
        build_sae(_cfg(n_models=2))(torch.randn(3, 4, 16))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("keep_codes", [False, True])
def test_fold_export_roundtrip(tmp_path, arch, keep_codes):
    """The exported SAE on RAW activations equals the training-time SAE on normalised ones."""
    c = 4.0
    sae = build_sae(_cfg(arch, n_models=2, scale_factor=c))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.05)
    raw = torch.randn(20, 16) * torch.rand(20, 1) * 30 + 0.5
    norm = raw.norm(dim=-1, keepdim=True)
    shard = raw / norm  # what the shards store
    # training-time view: the weights act on shard * c
    with torch.no_grad():
        pre = sae.preacts(shard * c)
        f_train = sae._activate(pre)
        x_hat_train = sae._decode_sae(f_train)  # SAE space
    exported = sae.exported(keep_codes=keep_codes)
    assert exported.cfg.scale_factor == 1.0
    loaded = load_sae(exported.save(tmp_path / "exp"))
    x_hat, f = loaded(raw)
    # The same forward up to the folding (weights and biases times or over c: a few more roundings);
    # scales from the training-time view, then to raw space (x norm / c) and to exported codes (/ c).
    bd = sae_step_bounds(sae, shard * c, torch.zeros(2))
    n_x, s_x = bd["x_hat"]
    n_f, s_f = bd["codes"]
    assert_close_derived(x_hat, x_hat_train / c * norm, n_terms=n_x + 6, scale=s_x / c * norm.double(),
                         dtype=torch.float32, probabilistic=True, msg="exported x_hat")
    assert_close_derived(f, f_train if keep_codes else f_train / c, n_terms=n_f + 6, dtype=torch.float32,
                         scale=s_f if keep_codes else s_f / c, probabilistic=True, msg="exported codes")
    if not keep_codes:
        n = loaded.W_dec.norm(dim=-1)
        assert_close_derived(n, torch.ones_like(n), n_terms=16 + 3, scale=1.0, dtype=torch.float32, msg="row norms")


def test_jumprelu_reset_latents():
    sae = build_sae(_cfg("jumprelu", n_models=2, jumprelu_init_threshold=0.01))
    with torch.no_grad():
        sae.log_threshold.fill_(0.0)
    mask = torch.zeros(2, 48, dtype=torch.bool)
    mask[1, :5] = True
    sae.reset_latents_(mask)
    assert_close_derived(sae.threshold[1, :5], torch.full((5,), 0.01), n_terms=3, scale=0.01, dtype=torch.float32,
                         msg="threshold after reset")  # exp(log 0.01): a log, an exp, a cast
    assert (sae.threshold[0] == 1.0).all() and (sae.threshold[1, 5:] == 1.0).all()
