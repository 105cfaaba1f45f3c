"""SAE family: shapes, stacking, init recipe, decoder constraints, save/load, fold/export, errors."""

from __future__ import annotations

import json

import pytest
import torch

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
    torch.testing.assert_close(norms, torch.ones_like(norms))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.transpose(1, 2))
    assert sae.b_enc.abs().sum() == 0 and sae.b_dec.abs().sum() == 0
    # members are initialised independently
    assert not torch.allclose(sae.W_dec[0], sae.W_dec[1])


def test_init_b_dec():
    sae = build_sae(_cfg(n_models=2))
    x = _unit(200, 16) + torch.linspace(0, 1, 16)
    x[:5] += 100.0  # outliers: the geometric median resists them, the mean does not
    med = sae.init_b_dec_(x, method="geometric_median")
    torch.testing.assert_close(sae.b_dec[1], med)
    mean = x.mean(0)
    clean_mean = x[5:].mean(0)
    assert (med - clean_mean).norm() < 0.2 * (mean - clean_mean).norm()
    sae.init_b_dec_(x, method="mean")
    torch.testing.assert_close(sae.b_dec[0], mean)


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
    for i, s in enumerate(singles):
        o = s.training_loss(x, l1_coeff=float(coeff[i]), impl="reference")
        o.loss.backward()
        torch.testing.assert_close(out.mse[i], o.mse[0])
        torch.testing.assert_close(out.l1[i], o.l1[0])
        torch.testing.assert_close(out.sq_err[i], o.sq_err[0])
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(stacked, name).grad[i], getattr(s, name).grad[0], rtol=1e-4, atol=1e-6)
        # inference on other raw inputs (not the batch that set a batchtopk threshold: no ties)
        x2 = _unit(12, 16, seed=2)
        x_hat, f = stacked(x2 * 3)
        x_hat1, f1 = s(x2 * 3)
        torch.testing.assert_close(x_hat[i], x_hat1, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f[i], f1, rtol=1e-4, atol=1e-5)
        # member() gives back the same SAE; unit_norm input: raw scale does not change the codes
        m = stacked.member(i)
        torch.testing.assert_close(m(x2)[0], x_hat1 / 3, rtol=1e-4, atol=1e-5)


def test_decoder_constraints():
    sae = build_sae(_cfg())
    out = sae.training_loss(_unit(32, 16), l1_coeff=1e-2, impl="reference")
    out.loss.backward()
    sae.remove_parallel_grad_()
    par = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert par.abs().max() < 1e-6
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        sae.training_loss(_unit(32, 16), l1_coeff=1e-2).loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
    norms = sae.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


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
    for a, b in zip(sae(x), loaded(x)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(loaded2(x)[0], sae(x)[0])


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
    with pytest.raises(SAEFormatError, match="do not fit"):
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
    torch.testing.assert_close(x_hat, x_hat_train / c * norm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f, f_train if keep_codes else f_train / c, rtol=1e-4, atol=1e-5)
    if not keep_codes:
        n = loaded.W_dec.norm(dim=-1)
        torch.testing.assert_close(n, torch.ones_like(n))


def test_jumprelu_reset_latents():
    sae = build_sae(_cfg("jumprelu", n_models=2, jumprelu_init_threshold=0.01))
    with torch.no_grad():
        sae.log_threshold.fill_(0.0)
    mask = torch.zeros(2, 48, dtype=torch.bool)
    mask[1, :5] = True
    sae.reset_latents_(mask)
    torch.testing.assert_close(sae.threshold[1, :5], torch.full((5,), 0.01))
    assert (sae.threshold[0] == 1.0).all() and (sae.threshold[1, 5:] == 1.0).all()
