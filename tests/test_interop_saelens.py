"""SAELens directories <-> visae SAEs, checked against the real sae_lens package (the `saelens` extra)."""

import json
import math

import pytest
import torch

from visae.interop import InteropError
from visae.interop.saelens import export_saelens, import_saelens
from visae.sae import SAEConfig, SAEFormatError, build_sae, load_sae

sae_lens = pytest.importorskip("sae_lens", reason="the sae_lens package (pip install -e '.[saelens]')")

EPS = torch.finfo(torch.float32).eps
D_IN, D_SAE = 24, 64


def _raw(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) * 3.0 + 0.5  # raw activations, norms ~ 15


def _tol(*ts, terms=D_IN + D_SAE):
    # float32 dot products of `terms` summands, plus the folded factors: eps * terms * magnitude
    return 4 * EPS * terms * max(float(t.abs().max()) for t in ts)


def _visae_sae(arch, norm, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=6, input_normalization=norm,
                              scale_factor=scale), generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05, generator=g)
        sae.b_dec.normal_(0, 0.2, generator=g)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.empty_like(sae.log_threshold).uniform_(-4, -2, generator=g))
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.03)
    sae.extra = {"source": {"model": "visae-tiny-test", "layer": 1, "token": "patch"}, "train": {"lr": 1e-3}}
    return sae.eval()


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("norm,scale", [("unit_norm", 2.5), ("none", 0.3)])
def test_export_loads_in_sae_lens_with_same_reconstructions(tmp_path, arch, norm, scale):
    sae = _visae_sae(arch, norm, scale)
    out = export_saelens(sae, tmp_path / "sl")
    loaded = sae_lens.SAE.load_from_disk(str(out))
    x = _raw()
    with torch.no_grad():
        want, f = sae(x)
        got = loaded(x)
        got_f = loaded.encode(x)
    assert (got - want).abs().max() <= _tol(want, x), f"{arch}/{norm}: {(got - want).abs().max():.3g}"
    # codes are kept (the factors are folded into W_enc / W_dec, not the codes)
    assert torch.equal(got_f > 0, f > 0)
    assert (got_f - f).abs().max() <= _tol(f, terms=D_IN)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "visae-tiny-test"
    assert (f > 0).any() and not (f > 0).all()  # a real sparse code, not a trivial one


def _saelens_sae(arch, *, norm="none", apply_b_dec=True, rescale=False, seed=0):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name="visae-tiny-test", hook_name="blocks.2.hook_resid_post")
    common = dict(d_in=D_IN, d_sae=D_SAE, normalize_activations=norm, apply_b_dec_to_input=apply_b_dec, metadata=meta)
    if arch == "standard":
        s = StandardSAE(StandardSAEConfig(**common))
    elif arch == "topk":
        s = TopKSAE(TopKSAEConfig(k=5, rescale_acts_by_decoder_norm=rescale, **common))
    else:
        s = JumpReLUSAE(JumpReLUSAEConfig(**common))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in s.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.2 - 0.02)  # some thresholds <= 0 too
            elif name in ("W_dec",):
                p.copy_(torch.randn(p.shape, generator=g) * (1.7 if rescale else 0.3))  # not unit norm
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return s.eval()


@pytest.mark.parametrize("arch,norm,apply_b_dec,rescale", [
    ("standard", "none", True, False),
    ("standard", "constant_norm_rescale", False, False),
    ("topk", "none", True, True),
    ("topk", "constant_norm_rescale", True, False),
    ("jumprelu", "none", False, False),
])
def test_import_matches_sae_lens_forward(tmp_path, arch, norm, apply_b_dec, rescale):
    s = _saelens_sae(arch, norm=norm, apply_b_dec=apply_b_dec, rescale=rescale)
    s.save_model(tmp_path / "sl")
    sae = import_saelens(tmp_path / "sl", out=tmp_path / "visae")
    again = load_sae(tmp_path / "visae")  # a plain visae directory now
    x = _raw(seed=1)
    with torch.no_grad():
        want = s(x)
        got, f = again(x)
        ref_f = s.encode(x)
    assert (got - want).abs().max() <= _tol(want, x), f"{arch}: {(got - want).abs().max():.3g}"
    if not rescale:
        assert (f - ref_f).abs().max() <= _tol(ref_f, x, terms=D_IN)
    assert again.extra["source"] == {"model": "visae-tiny-test", "hook_name": "blocks.2.hook_resid_post",
                                     "token": "all", "layer": 2}
    assert again.extra["imported_from"]["format"] == "sae_lens"
    assert sae.cfg.input_normalization == ("unit_norm" if norm == "constant_norm_rescale" else "none")
    if norm == "constant_norm_rescale":
        assert sae.cfg.scale_factor == pytest.approx(math.sqrt(D_IN))


def test_visae_saelens_visae_round_trip_keeps_config_and_source(tmp_path):
    sae = _visae_sae("topk", "unit_norm", 1.7, seed=3)
    export_saelens(sae, tmp_path / "sl")
    back = import_saelens(tmp_path / "sl")
    x = _raw(seed=3)
    with torch.no_grad():
        a, b = sae(x)[0], back(x)[0]
    assert (a - b).abs().max() <= _tol(a, x)
    assert back.extra["source"] == sae.extra["source"] and back.extra["train"] == {"lr": 1e-3}
    assert back.cfg.k == 6 and back.architecture == "topk"
    # the same export / import again into its own directory: a re-export / re-import, allowed
    export_saelens(sae, tmp_path / "sl")
    import_saelens(tmp_path / "sl", out=tmp_path / "imp")
    import_saelens(tmp_path / "sl", out=tmp_path / "imp")


def test_import_and_export_do_not_write_over_another_directory(tmp_path):
    """The newcomer's report: export_saelens into a trained visae SAE's directory replaced its cfg.json (the SAE was
    lost), and import_saelens into a training run's directory left that run's metrics and checkpoint beside another
    SAE. Both refuse, naming the directory, and change nothing."""
    from visae.interop import InteropError

    sae = _visae_sae("topk", "unit_norm", 1.7, seed=3)
    sae.save(tmp_path / "trained")
    (tmp_path / "trained" / "metrics.jsonl").write_text("{}\n")
    before = {f.name: f.read_bytes() for f in (tmp_path / "trained").iterdir()}
    with pytest.raises(InteropError, match="already holds other files"):
        export_saelens(sae, tmp_path / "trained")
    export_saelens(sae, tmp_path / "sl")
    with pytest.raises(InteropError, match="already holds other files .*metrics.jsonl"):
        import_saelens(tmp_path / "sl", out=tmp_path / "trained")
    assert {f.name: f.read_bytes() for f in (tmp_path / "trained").iterdir()} == before
    sae.save(tmp_path / "bare")  # a visae SAE directory with nothing else: not an export's place, not an import's
    with pytest.raises(InteropError, match=r"already holds other files \(weights.safetensors\)"):
        export_saelens(sae, tmp_path / "bare")
    with pytest.raises(InteropError, match="not an earlier import"):
        import_saelens(tmp_path / "sl", out=tmp_path / "bare")
    assert load_sae(tmp_path / "bare").cfg == sae.cfg
    (tmp_path / "afile").write_text("x")  # a file at the directory's place, or above it: refused, nothing written
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(InteropError, match=f"export_saelens: --out {out}: {tmp_path / 'afile'} is a file"):
            export_saelens(sae, out)


def test_load_sae_points_to_the_importer_and_refusals(tmp_path):
    s = _saelens_sae("standard")
    s.save_model(tmp_path / "sl")
    with pytest.raises(SAEFormatError, match="SAELens SAE directory.*import_saelens"):
        load_sae(tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    cfg["normalize_activations"] = "layer_norm"
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InteropError, match="normalize_activations='layer_norm'"):
        import_saelens(tmp_path / "sl", out=tmp_path / "never")
    assert not (tmp_path / "never").exists()  # refused before anything was written


def test_imported_saelens_sae_splices_into_the_model(tmp_path):
    """An imported SAELens SAE on blocks.1.hook_resid_post goes into the ViT at block 1, all tokens."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from visae.backbones import load_backbone, register_tiny_clip
    from visae.splice import splice, splice_target

    bb = load_backbone(register_tiny_clip(), random_init=True)
    s = StandardSAE(StandardSAEConfig(d_in=bb.width, d_sae=64, metadata=SAEMetadata(
        model_name=bb.name, hook_name="blocks.1.hook_resid_post")))
    with torch.no_grad():
        s.b_enc.fill_(0.05)
    s.save_model(tmp_path / "sl")
    sae = import_saelens(tmp_path / "sl")
    assert splice_target(bb, sae) == (1, "all")
    imgs = torch.randn(2, 3, *bb.image_size, generator=torch.Generator().manual_seed(0))

    def pre(_m, args):  # by hand: the SAELens SAE itself applied to the input of block 2
        x = args[0]
        return (s(x.reshape(-1, x.shape[-1])).reshape(x.shape), *args[1:])

    with torch.no_grad():
        h = bb.blocks[2].register_forward_pre_hook(pre)
        try:
            ref = bb.encode_image(imgs)
        finally:
            h.remove()
        with splice(bb, sae) as sp:
            out = bb.encode_image(imgs)
        clean = bb.encode_image(imgs)
    assert sp.calls == 1
    tol = _tol(ref, terms=bb.width + 64)
    assert (out - ref).abs().max() <= tol, f"{(out - ref).abs().max():.3g}"
    assert (clean - ref).abs().max() > 100 * tol


@pytest.mark.parametrize("rescale", [False, True])
def test_import_saelens_batchtopk_training_dir(tmp_path, rescale):
    """A SAELens BatchTopK training directory (topk_threshold) imports as visae batchtopk and matches the
    inference SAE sae_lens itself makes of it (save_inference_model: a JumpReLU)."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    s = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5,
                                                        rescale_acts_by_decoder_norm=rescale))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in s.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 if name == "W_dec" else 0.3))
        s.topk_threshold = torch.tensor(0.4)
    s.save_model(tmp_path / "train")
    s.save_inference_model(tmp_path / "infer")
    ref = sae_lens.SAE.load_from_disk(str(tmp_path / "infer"))
    sae = import_saelens(tmp_path / "train")
    assert sae.architecture == "batchtopk" and sae.cfg.k == 5
    x = _raw(seed=5)
    with torch.no_grad():
        want, got = ref(x), sae(x)[0]
    assert (got - want).abs().max() <= _tol(want, x), f"{(got - want).abs().max():.3g}"
