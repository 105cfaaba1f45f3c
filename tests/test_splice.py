"""visae.splice: an SAE inside open_clip / timm ViTs (tiny random-init models)."""

import pytest
import torch

from visae.backbones import load_backbone, register_tiny_clip
from visae.sae import SAEConfig, build_sae
from visae.splice import SpliceError, splice, splice_target

TINY = register_tiny_clip()  # open_clip ViT: 32x32 images, patch 8 -> 1 + 16 tokens, width 48, 3 blocks
TIMM_SMALL = {"img_size": 32, "patch_size": 8, "depth": 3}
EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


def _backbone(family: str, double: bool = False):
    if family == "open_clip":
        bb = load_backbone(TINY, random_init=True)
    else:
        bb = load_backbone("timm:vit_tiny_patch16_224", random_init=True, model_kwargs=TIMM_SMALL)
    if double:
        bb.model.double()
    return bb


@pytest.fixture(scope="module", params=["open_clip", "timm"])
def family(request):
    return request.param


def _sae(bb, layer, token, *, norm="unit_norm", seed=0, d_sae=96):
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig(architecture="relu", d_in=bb.width, d_sae=d_sae, input_normalization=norm), generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.05, generator=g)
        sae.b_dec.normal_(0.0, 0.1, generator=g)
    sae.extra = {"source": {"model": bb.name, "layer": layer, "token": token}}
    return sae.eval()


def _images(bb, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = next(bb.model.parameters()).dtype
    return torch.randn(n, 3, *bb.image_size, generator=g).to(dtype)


def _select(x, token, p):
    """Indices (as a slice) of the tokens an SAE with ``token`` reads in x [B, N, W]."""
    return {"cls": slice(0, 1), "patch": slice(p, None), "all": slice(None)}[token]


@pytest.mark.parametrize("token", ["cls", "patch", "all"])
def test_error_node_splice_equals_clean_forward(family, token):
    # float64 model and SAE: x_hat + (x - x_hat) differs from x by rounding only (<= 2 eps |.|
    # per element at the splice), which the 2 blocks after it and the head carry to the output.
    bb = _backbone(family, double=True)
    sae = _sae(bb, 0, token).double()
    imgs = _images(bb)
    with torch.no_grad():
        clean_res = bb.encode_layer(imgs, 0, "patch" if token == "patch" else "cls")
        clean = bb.encode_image(imgs)
        with splice(bb, sae, error_node=True) as sp:
            res = bb.encode_layer(imgs, 0, "patch" if token == "patch" else "cls")
            out = bb.encode_image(imgs)
        # the SAE really reconstructs badly (random weights): without the error node the output moves
        with splice(bb, sae):
            moved = bb.encode_image(imgs)
    assert sp.calls == 2 and sp.layer == 0 and sp.token == token
    # at the splice point: |x_hat + (x - x_hat) - x| <= 2 eps (|x_hat| + |x|) elementwise (two roundings)
    x_hat = sae(clean_res.reshape(-1, bb.width))[0].reshape(clean_res.shape)
    bound = 2 * EPS64 * (x_hat.abs() + clean_res.abs())
    assert bool(((res - clean_res).abs() <= bound).all()), f"max diff {(res - clean_res).abs().max():.3g}"
    # end to end: a perturbation of relative size ~eps64 stays far below 1e-9 after 2 random blocks
    scale = clean.abs().max()
    diff = (out - clean).abs().max()
    assert diff <= 1e-9 * scale, f"error-node splice differs from the clean forward by {diff:.3g} (scale {scale:.3g})"
    assert (moved - clean).abs().max() > 1e-3 * scale


@pytest.mark.parametrize("sparse", [False, True])
def test_identity_splice_equals_the_clean_model(family, sparse):
    """An SAE that reconstructs exactly (d_sae = 2W, W_enc = [I, -I], W_dec = its transpose, no biases, no input
    normalisation: x_hat = ReLU(x) - ReLU(-x) = x) spliced in gives the clean model's output bit for bit, dense or
    sparse decode: every sum has one non-zero term (x_i times 1, or ReLU(-x_i) times -1), so no rounding happens."""
    bb = _backbone(family)
    W = bb.width
    sae = build_sae(SAEConfig(architecture="relu", d_in=W, d_sae=2 * W, input_normalization="none"))
    eye = torch.eye(W)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1)[None])
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=1).t()[None])
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.extra = {"source": {"model": bb.name, "layer": 1, "token": "all"}}
    imgs = _images(bb, seed=5)
    with torch.no_grad():
        clean = bb.encode_image(imgs)
        with splice(bb, sae.eval(), sparse=sparse) as sp:
            out = bb.encode_image(imgs)
    assert sp.calls == 1 and sp.sparse_decodes == int(sparse)
    assert torch.equal(out, clean), f"max diff {(out - clean).abs().max():.3g}"


def _hand_forward_timm(bb, imgs, layer, fn):
    """timm ViT forward written out block by block, ``fn`` applied to the residual after ``layer``."""
    m = bb.model
    x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(imgs))))
    for i, blk in enumerate(m.blocks):
        x = blk(x)
        if i == layer:
            x = fn(x)
    return m.forward_head(m.norm(x), pre_logits=True)


def _hand_forward_open_clip(bb, imgs, layer, fn):
    """open_clip forward with ``fn`` applied to the INPUT of block layer + 1 (a pre-hook: another mechanism)."""
    assert layer + 1 < bb.num_layers

    def pre(_m, args):
        return (fn(args[0]), *args[1:])

    h = bb.blocks[layer + 1].register_forward_pre_hook(pre)
    try:
        return bb.encode_image(imgs)
    finally:
        h.remove()


def _insert(sae, token, p):
    def fn(x):
        x = x.clone()
        s = _select(x, token, p)
        sel = x[:, s]
        x[:, s] = sae(sel.reshape(-1, sel.shape[-1]))[0].reshape(sel.shape)
        return x
    return fn


@pytest.mark.parametrize("token", ["cls", "patch", "all"])
def test_splice_equals_forward_by_hand(family, token):
    bb = _backbone(family)
    layer = 1
    sae = _sae(bb, layer, token, seed=1)
    imgs = _images(bb, seed=1)
    hand = _hand_forward_timm if family == "timm" else _hand_forward_open_clip
    with torch.no_grad():
        ref = hand(bb, imgs, layer, _insert(sae, token, bb.num_prefix_tokens))
        with splice(bb, sae):
            out = bb.encode_image(imgs)
        clean = bb.encode_image(imgs)
    # the same float32 operations in the same order: equal up to a few roundings of the output's size
    tol = 8 * EPS32 * ref.abs().max()
    assert (out - ref).abs().max() <= tol, f"splice vs hand forward: {(out - ref).abs().max():.3g} > {tol:.3g}"
    assert (clean - ref).abs().max() > 1e3 * tol  # the SAE changed the output: the comparison is not vacuous


def test_splice_last_block_by_hand_timm():
    bb = _backbone("timm")
    sae = _sae(bb, -1, "all", seed=2)
    imgs = _images(bb, seed=2)
    with torch.no_grad():
        ref = _hand_forward_timm(bb, imgs, bb.num_layers - 1, _insert(sae, "all", bb.num_prefix_tokens))
        with splice(bb, sae) as sp:
            out = bb.encode_image(imgs)
    assert sp.layer == bb.num_layers - 1
    tol = 8 * EPS32 * ref.abs().max()
    assert (out - ref).abs().max() <= tol, f"{(out - ref).abs().max():.3g}"


@pytest.mark.parametrize("token", ["cls", "patch"])
def test_ablating_every_latent_is_mean_ablation(family, token):
    bb = _backbone(family)
    layer = 1
    imgs = _images(bb, n=4, seed=3)
    p = bb.num_prefix_tokens
    with torch.no_grad():
        res = bb.encode_layer(imgs, layer, token)  # [B, W] (cls) or [B, P, W] (patch)
        mean = res.reshape(-1, bb.width).mean(0)
        sae = _sae(bb, layer, token, norm="none", seed=3)
        sae.b_dec.copy_(mean[None])  # decode(0) = b_dec = the tokens' mean over the data

        def mean_ablate(_m, _i, out):
            x = out.clone()
            x[:, _select(x, token, p)] = mean
            return x

        h = bb.blocks[layer].register_forward_hook(mean_ablate)
        try:
            ref = bb.encode_image(imgs)
        finally:
            h.remove()
        with splice(bb, sae, ablate=range(sae.d_sae)):
            out = bb.encode_image(imgs)
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max():.3g}"


def test_clamp_and_record_codes():
    bb = _backbone("open_clip")
    sae = _sae(bb, 1, "patch", seed=4)
    imgs = _images(bb, n=2, seed=4)
    with torch.no_grad():
        x = bb.encode_layer(imgs, 1, "patch")  # [2, 16, 48]
        with splice(bb, sae, clamp={5: 3.0}, ablate=[7], record_codes=True) as sp:
            got = bb.encode_layer(imgs, 1, "patch")
        flat = x.reshape(-1, bb.width)
        f = sae.encode(flat)
        assert sp.codes.shape == (2, 16, sae.d_sae) and torch.equal(sp.codes.reshape(-1, sae.d_sae), f)
        f[:, 5], f[:, 7] = 3.0, 0.0
        want = sae.decode(f, flat.norm(dim=-1, keepdim=True)).reshape(x.shape)
    assert torch.equal(got, want)


def _sparse_sae(bb, arch, layer, token, seed):
    """A TopK SAE with k = 4 of 96 latents (4 %: the automatic choice decodes sparsely), or a ReLU SAE whose
    encoder bias is lowered until about 4 latents of a token fire (as a trained SAE's L0 is small)."""
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(architecture=arch, d_in=bb.width, d_sae=96, k=4, input_normalization="unit_norm")
    sae = build_sae(cfg, generator=g)
    with torch.no_grad():
        sae.b_dec.normal_(0.0, 0.1, generator=g)
        if arch == "relu":
            sae.b_enc.fill_(-0.3)
    sae.extra = {"source": {"model": bb.name, "layer": layer, "token": token}}
    return sae.eval()


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_sparse_decode_equals_dense_decode(arch):
    """The splice's decode from the active codes only (embedding-bag) against the dense decode, at the splice point,
    with and without interventions. Both sum the same non-zero products f_j W_dec[j, d] (plus b_dec, plus the
    clamped latents' value * W_dec[j]) in different orders: each result is within gamma_m = m eps A of the exact
    sum, A = |f| |W_dec| + |b_dec| + sum |clamp| |W_dec[clamp]| (SAE space), m = the terms of the longest row, so they
    differ by at most 2 m eps A, times the input norm (the same multiplication on both sides)."""
    bb = _backbone("open_clip")
    layer, token = 1, "patch"
    sae = _sparse_sae(bb, arch, layer, token, seed=11)
    imgs = _images(bb, n=3, seed=11)
    kw = {"ablate": [3, 40], "clamp": {5: 2.5, 60: 0.75}}
    with torch.no_grad():
        x = bb.encode_layer(imgs, layer, token).reshape(-1, bb.width)
        f = sae.encode(x)
        norm = x.norm(dim=-1, keepdim=True)
        l0 = (f != 0).sum(-1)
        assert 1 <= l0.float().mean() <= 8 and int((f != 0).sum()) <= 0.05 * f.numel(), l0  # sparse enough for auto
        for interv in ({}, kw):
            got = {}
            for mode in (None, True, False):
                with splice(bb, sae, sparse=mode, record_codes=True, **interv) as sp:
                    got[mode] = bb.encode_layer(imgs, layer, token).reshape(-1, bb.width)
                assert sp.sparse_decodes == (0 if mode is False else 1), (mode, sp)
                assert torch.equal(sp.codes.reshape(-1, sae.d_sae), f)  # the codes are sae.encode's, both ways
            assert torch.equal(got[None], got[True])
            g = f.clone()
            cl = torch.zeros(bb.width)
            for j in interv.get("ablate", []):
                g[:, j] = 0.0
            for j, v in interv.get("clamp", {}).items():
                g[:, j] = 0.0
                cl += abs(v) * sae.W_dec[0, j].abs()
            A = g.abs() @ sae.W_dec[0].abs() + sae.b_dec[0].abs() + cl
            m = int(l0.max()) + 1 + len(interv.get("clamp", {})) + 1  # codes, b_dec, clamps, one more sum of rounding
            tol = 2 * m * EPS32 * A * norm
            diff = (got[True] - got[False]).abs()
            assert bool((diff <= tol).all()), f"sparse vs dense decode: max diff {diff.max():.3g}, " \
                                               f"max excess {(diff - tol).max():.3g}"
            assert (got[False] - x).abs().max() > 1e3 * tol.max()  # the SAE changed the residual: not vacuous


def test_sparse_decode_gradients_match_dense():
    """Attribution through the error node runs on the sparse path too: the gradients of the decoder (float64) agree
    with the dense path's to the rounding of sums over the batch's rows."""
    bb = _backbone("open_clip", double=True)
    sae = _sparse_sae(bb, "topk", 1, "all", seed=12).double()
    imgs = _images(bb, n=2, seed=12)
    grads = {}
    for mode in (True, False):
        sae.zero_grad()
        with splice(bb, sae, sparse=mode, error_node=True, ablate=[1]) as sp:
            bb.encode_image(imgs).square().sum().backward()
        assert sp.sparse_decodes == int(mode)
        grads[mode] = (sae.W_dec.grad.clone(), sae.W_enc.grad.clone())
    for a, b in zip(grads[True], grads[False]):
        assert a.abs().max() > 0
        # rows of the batch (2 x 17 tokens) summed: ~34 terms, eps64 ~ 2e-16: far below 1e-10 relative
        assert (a - b).abs().max() <= 1e-10 * b.abs().max(), f"{(a - b).abs().max():.3g}"


def test_refusals():
    bb = _backbone("open_clip")
    with pytest.raises(SpliceError, match="mean of the patch tokens"):
        with splice(bb, _sae(bb, 1, "mean")):
            pass
    with pytest.raises(SpliceError, match="final image embedding"):
        splice_target(bb, _sae(bb, None, None))
    wrong = build_sae(SAEConfig(d_in=bb.width + 1, d_sae=8))
    wrong.extra = {"source": {"model": bb.name, "layer": 0, "token": "cls"}}
    with pytest.raises(SpliceError, match="width 48"):
        splice_target(bb, wrong)
    other = _sae(bb, 0, "cls")
    other.extra["source"]["model"] = "ViT-B-16"
    with pytest.raises(SpliceError, match="ViT-B-16"):
        splice_target(bb, other)
    with pytest.raises(SpliceError, match="out of range"):
        with splice(bb, _sae(bb, 0, "cls"), ablate=[10_000]):
            pass
    with pytest.raises(SpliceError, match=r"1\.5 is not a latent index"):  # was latent 1, silently
        with splice(bb, _sae(bb, 0, "cls"), ablate=[1.5]):
            pass
    with pytest.raises(SpliceError, match=r"clamp: 1\.5 is not a latent index"):
        with splice(bb, _sae(bb, 0, "cls"), clamp={1.5: 2.0}):
            pass
    with pytest.raises(SpliceError, match=r"clamp: the values \{0: nan\} are not finite"):  # NaN embeddings
        with splice(bb, _sae(bb, 0, "cls"), clamp={0: float("nan")}):
            pass
    with pytest.raises(SpliceError, match="layer 7 out of range|out of range"):
        splice_target(bb, _sae(bb, 7, "cls"))
    # nothing left hooked after a refusal or a normal exit
    assert all(not blk._forward_hooks for blk in bb.blocks)


def test_tokens_given_to_the_sae_by_hand_get_a_clear_error():
    """Issue 13's report: a [B, N, W] residual tensor given to a single SAE was refused as a stack of B members with
    no hint; the error now says how to pass tokens (and that the splice does it)."""
    from visae.sae import SAEFormatError

    bb = _backbone("open_clip")
    sae = _sae(bb, 1, "all")
    with torch.no_grad():
        x = bb.encode_layer(_images(bb, n=2), 1, "patch")  # [2, 16, 48]
        with pytest.raises(SAEFormatError, match=r"stacked input has 2 members.*\[B\*N, W\].*visae\.splice"):
            sae(x)
        assert sae(x.reshape(-1, bb.width))[0].shape == (32, bb.width)


def test_accuracy_recovered_has_the_right_end_points():
    """Zero-shot through the splice: an exact splice (error node) recovers 1, ablating every latent of an SAE
    whose b_dec is the tokens' mean recovers 0 (it is the mean-ablation baseline)."""
    from visae.splice import accuracy_recovered, spliced_accuracy, spliced_topk, zeroshot_baseline
    from visae.zeroshot import ZeroShotClassifier

    bb = _backbone("open_clip")
    g = torch.Generator().manual_seed(7)
    imgs = [torch.randn(8, 3, *bb.image_size, generator=g) for _ in range(4)]
    with torch.no_grad():
        # a random ViT's embeddings share a large common direction m: class directions orthogonal to it
        # make the predictions differ between images (labels of several classes)
        m = torch.cat([bb.encode_image(x) for x in imgs]).mean(0)
        m = m / m.norm()
        w = torch.randn(6, bb.embed_dim, generator=g)
        w = w - (w @ m)[:, None] * m
        clf = ZeroShotClassifier(weights=w / w.norm(dim=-1, keepdim=True), logit_scale=bb.logit_scale,
                                 classnames=[f"c{i}" for i in range(6)])
        labels = [clf.logits(bb.encode_image(x)).argmax(-1) for x in imgs]  # clean accuracy 1 by construction
    batches = list(zip(imgs, labels))
    assert len(torch.cat(labels).unique()) >= 3
    base = zeroshot_baseline(bb, batches, clf, layer=1, token="all")
    assert base["clean"] == 1.0 and base["n"] == 32 and base["ablated"] < 1.0, base
    with torch.no_grad():
        res = torch.cat([bb.encode_layer(x, 1, "patch") for x in imgs])  # patch tokens + the CLS token below
        cls = torch.cat([bb.encode_layer(x, 1, "cls") for x in imgs])
        mean = torch.cat([res.reshape(-1, bb.width), cls]).double().mean(0)
    assert (base["mean"].double() - mean).abs().max() <= 64 * EPS32 * mean.abs().max()
    exact = _sae(bb, 1, "all", seed=7)
    assert spliced_accuracy(bb, exact, batches, clf, error_node=True) == 1.0
    assert accuracy_recovered(1.0, base) == 1.0
    ablate = _sae(bb, 1, "all", norm="none", seed=8)
    with torch.no_grad():
        ablate.b_dec.copy_(base["mean"][None])
    acc0 = spliced_accuracy(bb, ablate, batches, clf, ablate=range(ablate.d_sae))
    assert acc0 == base["ablated"] and accuracy_recovered(acc0, base) == 0.0
    acc = spliced_accuracy(bb, _sae(bb, 1, "all", seed=9), batches, clf)  # a random SAE: somewhere, by the formula
    assert accuracy_recovered(acc, base) == pytest.approx((acc - base["ablated"]) / (1.0 - base["ablated"]))
    assert accuracy_recovered(0.5, {"clean": 0.5, "ablated": 0.5}) is None
    # the paired counts against the clean pass (clean accuracy 1 here: nothing can be gained, every miss is lost)
    assert base["clean_hits"][1].dtype == torch.bool and base["clean_hits"][1].tolist() == [True] * 32
    disc: dict = {}
    acc = spliced_topk(bb, ablate, batches, clf, ks=(1,), ref_hits=base["clean_hits"], discordant=disc,
                       ablate=range(ablate.d_sae))
    assert disc[1] == (round(32 * (1.0 - acc[1])), 0) and disc[1][0] > 0, (disc, acc)
    with pytest.raises(SpliceError, match="ref_hits"):
        spliced_topk(bb, exact, batches[:2], clf, ks=(1,), ref_hits=base["clean_hits"], discordant={})


# ----------------------------------------------------------------------------- naming away from the text space (issue 13 item 5)


@pytest.mark.parametrize("hook", ["blocks.2.hook_resid_post", "blocks.2.hook_mlp_out"])
def test_visae_name_refuses_an_imported_residual_saelens_sae_with_the_reason(tmp_path, hook):
    """A SAELens SAE from elsewhere (only its hook recorded) on the toy CLIP, whose residual width equals its embedding
    width (96): the width cannot tell the spaces apart, the recorded hook must. Refused before the vocabulary is read
    and before anything is written, with the reason and what to do instead; --assume_embedding_space does not
    override a recorded residual source."""
    import json

    from visae.interop.saelens import export_saelens, import_saelens
    from visae.naming import NameConfig, NamingError, name_concepts

    bb = load_backbone("visae-toyclip")
    assert bb.width == bb.embed_dim  # the case a width check cannot catch
    sae = _sae(bb, 2, "all")
    export_saelens(sae, tmp_path / "sl", hook_name=hook, model_name="visae-toyclip")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    cfg["metadata"].pop("visae", None)  # as if made by SAELens itself: only model_name and hook_name
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(cfg))
    import_saelens(tmp_path / "sl", out=tmp_path / "imported")
    for assume in (False, True):
        out = tmp_path / f"names_{assume}"
        with pytest.raises(NamingError) as e:
            name_concepts(NameConfig(sae=str(tmp_path / "imported"), out=str(out), vocab=str(tmp_path / "no_vocab.txt"),
                                     assume_embedding_space=assume, model="visae-toyclip", text_cache=None))
        msg = str(e.value)
        assert "not in the text tower's space" in msg and "naming through the splice is not implemented" in msg, msg
        assert ("layer 2" if hook.endswith("resid_post") else "layer 'unknown'") in msg, msg
        # nothing written (output_lock leaves only its own hidden lock file)
        assert not out.exists() or [q.name for q in out.iterdir()] == [".visae.lock"], sorted(out.iterdir())
