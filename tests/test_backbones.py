"""Backbone registry: names, random init, local checkpoints, offline errors, hook read-outs."""

import math
import time

import pytest
import torch

from tolerances import assert_bitwise_equal, assert_close_derived
from visae.backbones import (
    Backbone,
    BackboneError,
    WeightsNotAvailableError,
    load_backbone,
    parse_backbone_name,
    register_tiny_clip,
)

TINY = register_tiny_clip()
TIMM_SMALL = {"img_size": 32, "patch_size": 8, "depth": 3}


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return load_backbone(TINY, random_init=True)


@pytest.fixture(scope="module")
def tiny_timm() -> Backbone:
    # a small timm ViT (32x32 images, patch 8, 3 blocks) to keep the tests fast
    return load_backbone("timm:vit_tiny_patch16_224", random_init=True, model_kwargs=TIMM_SMALL)


def test_parse_names():
    assert parse_backbone_name("ViT-B-32:laion2b_s34b_b79k", None) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert parse_backbone_name("ViT-B-32", "openai") == ("ViT-B-32", "openai")
    assert parse_backbone_name("timm:vit_base_patch16_224.augreg_in21k", None) == ("timm:vit_base_patch16_224.augreg_in21k", None)
    assert parse_backbone_name("hf-hub:org/repo", None) == ("hf-hub:org/repo", None)
    with pytest.raises(BackboneError, match="pretrained given twice"):
        parse_backbone_name("ViT-B-32:openai", "laion2b_s34b_b79k")


def test_tiny_clip_random_init(tiny):
    assert tiny.family == "open_clip" and tiny.has_text and tiny.random_init and tiny.pretrained is None
    assert tiny.embed_dim == 32 and tiny.width == 48 and tiny.num_layers == 3
    assert not tiny.model.training
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        e = tiny.encode_image(x)
        t = tiny.encode_text(tiny.tokenizer(["a red square", "a blue circle"]))
    assert e.shape == (3, 32) and t.shape == (2, 32)
    # log(1/0.07) stored in float32 (relative error u of 2.66 -> 2.66 u after exp), exp rounded (<= 1 ulp = 2 u)
    assert_close_derived(tiny.logit_scale, 1 / 0.07, n_terms=1, scale=(1 / 0.07) * (math.log(1 / 0.07) + 2),
                         dtype=torch.float32, computations=1, msg="logit_scale")
    # same seed -> same weights (multi-rank extraction relies on it); other seed -> different
    again = load_backbone(TINY, random_init=True)
    other = load_backbone(TINY, random_init=True, seed=1)
    sd, sd2, sd3 = tiny.model.state_dict(), again.model.state_dict(), other.model.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not torch.equal(sd["visual.proj"], sd3["visual.proj"])


def test_local_checkpoint_roundtrip(tmp_path, tiny):
    other = load_backbone(TINY, random_init=True, seed=5)
    ckpt = tmp_path / "ckpt.bin"
    torch.save(other.model.state_dict(), ckpt)
    loaded = load_backbone(TINY, str(ckpt))
    assert loaded.pretrained == str(ckpt) and not loaded.random_init
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        # the same weights loaded twice, the same forward on the same input: bit for bit
        assert_bitwise_equal(loaded.encode_image(x), other.encode_image(x), "same checkpoint loaded twice")
        assert not torch.allclose(loaded.encode_image(x), tiny.encode_image(x))  # asserts a change (other weights), not rounding
    with pytest.raises(WeightsNotAvailableError, match="does not exist"):
        load_backbone(TINY, str(tmp_path / "nope.bin"))


def test_unknown_names():
    from visae.backbones import check_backbone_name

    with pytest.raises(BackboneError, match="unknown backbone 'ViT-Nope-1'.*open_clip.list_models"):
        load_backbone("ViT-Nope-1", random_init=True)
    # checked without building anything; a typo of one of visae's own models is offered the model, not 200 names
    with pytest.raises(BackboneError, match=r"unknown backbone 'visae-toyclip2-reg'; did you mean 'visae-toyclip2-reg4'"):
        check_backbone_name("visae-toyclip2-reg:shipped")
    for ok in ("visae-toyclip2-reg4", "visae-toyclip2:shipped", "ViT-B-32:openai", "timm:anything", "hf-hub:org/repo"):
        check_backbone_name(ok)
    with pytest.raises(BackboneError, match="unknown timm model"):
        load_backbone("timm:not_a_model_xyz", random_init=True)
    with pytest.raises(BackboneError, match="neither a known pretrained tag"):
        load_backbone("ViT-B-32", "not_a_tag")


@pytest.mark.parametrize(
    "name, must_name",
    [
        ("ViT-B-32:laion2b_s34b_b79k", ["laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_pytorch_model.bin"]),
        ("timm:vit_base_patch16_224.augreg_in21k", ["timm/vit_base_patch16_224.augreg_in21k", "model.safetensors"]),
    ],
)
def test_offline_pretrained_fails_fast_with_remedy(tmp_path, monkeypatch, name, must_name):
    # offline, with an empty HF cache: no hang, an error naming the file and the remedies
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    import open_clip  # noqa: F401 - import time is not what is measured
    import timm  # noqa: F401

    t = time.time()
    with pytest.raises(WeightsNotAvailableError) as info:
        load_backbone(name)
    assert time.time() - t < 5.0  # no network wait (a hub timeout would be 10 s or more)
    msg = str(info.value)
    for s in must_name:
        assert s in msg
    assert str(tmp_path / "hub") in msg
    assert "--pretrained /path/to/" in msg and "HF cache" in msg and "HF_HUB_OFFLINE" in msg


def test_unreachable_hub_fails_fast(monkeypatch):
    # not offline by env, but the hub host does not answer: still no hang
    import visae.backbones as bb

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(bb, "HUB_HOST", "nonexistent.invalid")
    t = time.time()
    with pytest.raises(WeightsNotAvailableError, match="cannot be reached"):
        bb._resolve_open_clip_weights("ViT-B-32", "laion2b_s34b_b79k")
    assert time.time() - t < bb.HUB_PROBE_TIMEOUT_S + 2


def _direct_open_clip_block_output(bb: Backbone, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Run the ViT by hand up to block ``layer`` and return its output [B, N, W]."""
    v = bb.visual
    h = v._embeds(x)
    if not v.transformer.batch_first:
        h = h.transpose(0, 1)
    for blk in v.transformer.resblocks[: layer + 1]:
        h = blk(h)
    return h if v.transformer.batch_first else h.transpose(0, 1)


def _direct_timm_block_output(bb: Backbone, x: torch.Tensor, layer: int) -> torch.Tensor:
    m = bb.model
    h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
    for blk in m.blocks[: layer + 1]:
        h = blk(h)
    return h


@pytest.mark.parametrize("which", ["open_clip", "timm"])
def test_layer_hook_matches_direct_block_output(which, tiny, tiny_timm):
    bb = tiny if which == "open_clip" else tiny_timm
    size = bb.image_size
    x = torch.randn(2, 3, *size)
    layer = 1
    with torch.inference_mode():
        direct = (_direct_open_clip_block_output if which == "open_clip" else _direct_timm_block_output)(bb, x, layer)
        # blocks after the hooked one must not run
        ran = []
        h = bb.blocks[layer + 1].register_forward_hook(lambda *a: ran.append(1))
        try:
            cls = bb.encode_layer(x, layer, "cls")
            patch = bb.encode_layer(x, layer, "patch")
            mean = bb.encode_layer(x, layer, "mean")
        finally:
            h.remove()
        assert ran == []
        # negative index = from the end
        last = bb.encode_layer(x, -1, "cls")
        # the hook reads the output of the same block modules run on the same input shapes as the direct
        # run: the same operations in the same order, so bit for bit (issue 10: no tuned tolerance)
        assert_bitwise_equal(last, (_direct_open_clip_block_output if which == "open_clip" else _direct_timm_block_output)(bb, x, bb.num_layers - 1)[:, 0], "last block cls")
    n_patches = (size[0] // 8) * (size[1] // 8)
    assert cls.shape == (2, bb.width)
    assert patch.shape == (2, n_patches, bb.width)
    assert mean.shape == (2, bb.width)
    p = bb.num_prefix_tokens
    assert_bitwise_equal(cls, direct[:, 0], "cls")
    assert_bitwise_equal(patch, direct[:, p:], "patch")
    assert_bitwise_equal(mean, direct[:, p:].mean(1), "mean")  # the same mean over the same patch tensor
    # the final embedding still works after hooking (hook removed)
    with torch.inference_mode():
        assert bb.encode_image(x).shape == (2, bb.embed_dim)
    with pytest.raises(BackboneError, match="out of range"):
        bb.encode_layer(x, bb.num_layers, "cls")


def test_timm_backbone(tiny_timm):
    assert tiny_timm.family == "timm" and not tiny_timm.has_text and tiny_timm.tokenizer is None
    with pytest.raises(BackboneError, match="no text tower"):
        tiny_timm.encode_text(torch.zeros(1, 4, dtype=torch.long))
    from PIL import Image

    img = Image.new("RGB", (300, 200), (10, 200, 30))
    assert tiny_timm.preprocess(img).shape == (3, 32, 32) and tiny_timm.image_size == (32, 32)
    full = load_backbone("timm:vit_tiny_patch16_224", random_init=True)  # default size
    assert full.preprocess(img).shape == (3, 224, 224) and full.num_layers == 12 and full.embed_dim == 192


def test_toyclip_random_init_through_registry():
    bb = load_backbone("visae-toyclip", random_init=True)
    assert bb.name == "visae-toyclip" and bb.has_text and bb.random_init and bb.image_size == (64, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert bb.encode_image(x).shape == (2, bb.embed_dim)
        assert bb.encode_text(bb.tokenizer(["a photo of a red object"])).shape == (1, bb.embed_dim)
        assert bb.encode_layer(x, 1, "patch").shape == (2, 64, bb.width)


def test_toyclip_shipped_weights_through_registry():
    from visae import toyclip

    bb = load_backbone("visae-toyclip")
    assert bb.name == "visae-toyclip" and bb.pretrained == "shipped" and not bb.random_init
    assert bb.meta["weights"] == str(toyclip.TOYCLIP_WEIGHTS)
    # the registry's model is exactly toyclip's own loader's model
    ref, _, _ = toyclip.load_toyclip()
    sd, ref_sd = bb.model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    rnd = load_backbone("visae-toyclip", random_init=True)
    x = torch.randn(2, 3, *bb.image_size)
    with torch.inference_mode():
        assert not torch.allclose(bb.encode_image(x), rnd.encode_image(x))  # asserts a change, not rounding


@pytest.mark.parametrize("content", ["empty", "other_model", "garbage"])
def test_a_pretrained_file_that_is_not_the_models_weights_is_one_named_error(content, tmp_path):
    """--pretrained FILE that is empty, another model's state dict or not a checkpoint: a BackboneError naming the
    model and the file (it was torch's unpickler / load_state_dict traceback, thousands of characters of keys)."""
    import torch

    from visae.backbones import BackboneError, load_backbone

    f = tmp_path / f"{content}.pt"
    if content == "empty":
        f.write_bytes(b"")
    elif content == "other_model":
        torch.save({"W_enc": torch.zeros(4, 8)}, f)
    else:
        f.write_bytes(b"not a checkpoint\n" * 10)
    with pytest.raises(BackboneError) as e:
        load_backbone("visae-tiny-test", str(f))
    msg = str(e.value)
    assert msg.startswith("visae-tiny-test: --pretrained ") and str(f) in msg and "cannot be loaded" in msg
    assert len(msg) < 700  # the key list cut short
