"""visae.convstem (the conv-stem ViT image tower of visae-toyclip2) and its open_clip / backbone packaging."""

from __future__ import annotations

import pytest
import torch

from visae import convstem, toyclip
from visae.backbones import load_backbone

from tolerances import assert_close_derived


def test_conv_stem_shapes_and_errors():
    emb = convstem.ConvStemPatchEmbed(img_size=64, patch_size=8, embed_dim=96)
    x = torch.randn(2, 3, 64, 64)
    assert emb(x).shape == (2, 64, 96) and emb.num_patches == 64 and emb.grid_size == (8, 8)
    widths = [m.out_channels for m in emb.proj if isinstance(m, torch.nn.Conv2d)]
    assert widths == [24, 48, 96, 96]  # three stride-2 convs doubling the width, then the 1x1 to embed_dim
    for bad, match in (({"patch_size": 6}, "power of two"), ({"patch_size": 1}, "power of two"),
                       ({"img_size": 60}, "multiple of patch_size"), ({"embed_dim": 90}, "divisible by 4")):
        with pytest.raises(ValueError, match=match):
            convstem.ConvStemPatchEmbed(**{"img_size": 64, "patch_size": 8, "embed_dim": 96, **bad})
    with pytest.raises(ValueError, match=r"input \(32, 32\)"):
        emb(torch.randn(1, 3, 32, 32))


def test_token_i_sees_its_own_grid_cell():
    """Token i of the stem depends on pixels of grid cell i and its neighbourhood only (receptive field 8 + 7 px per
    side after three 3x3 stride-2 convs), so patch heatmaps keep their meaning: a change in the top-left corner
    leaves the tokens of the bottom-right half exactly unchanged (eval mode: BatchNorm is a per-channel affine map)."""
    torch.manual_seed(0)
    emb = convstem.ConvStemPatchEmbed(img_size=64, patch_size=8, embed_dim=96).eval()
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[..., :8, :8] += 1.0
    with torch.no_grad():
        a, b = emb(x).view(8, 8, 96), emb(y).view(8, 8, 96)
    assert torch.equal(a[4:, 4:], b[4:, 4:]) and not torch.equal(a[0, 0], b[0, 0])


def test_an_image_embedding_does_not_depend_on_its_batch_in_eval_mode():
    """In eval mode (extraction, zero-shot, naming) BatchNorm uses its running statistics: an image's embedding is
    the same alone or among others. In training mode it normalises by the batch, so the embedding moves."""
    toyclip.register_v2()
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(toyclip.MODEL_NAME_V2).double()
    x = torch.randn(5, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        model.train()
        model.encode_image(x * 2 + 0.5)  # move the running statistics away from their init
        model.eval()
        alone, batch = model.encode_image(x[:1]), model.encode_image(x)[:1]
    # Same arithmetic on the same row; the batch size may change the kernels' summation order only. Bound:
    # the sums along the way (stem conv 3*3*48 terms, then per block q/k/v 96, attention 64, MLP 384), each
    # rounded in float64; a batch statistic would move the embedding by O(1) instead (checked below).
    assert_close_derived(alone, batch, n_terms=3 * 3 * 48 + 4 * (96 + 64 + 384), scale=float(alone.abs().max()),
                         dtype=torch.float64, msg="eval mode: one image alone vs in a batch of 5")
    model.train()
    with torch.no_grad():
        moved = (model.encode_image(x[:2])[:1] - model.encode_image(x)[:1]).abs().max()
    assert moved > 1e-3 * float(alone.abs().max()), moved


def test_toyclip2_backbone_random_init_and_weights_file(tmp_path):
    bb = load_backbone("visae-toyclip2", random_init=True, seed=3)
    assert (bb.family, bb.width, bb.num_prefix_tokens, bb.has_cls_token, len(bb.blocks)) == ("open_clip", 96, 1, True, 4)
    x = torch.randn(2, 3, 64, 64)
    layers = bb.encode_layers(x, [1, 3], token="patch")
    assert {k: tuple(v.shape) for k, v in layers.items()} == {1: (2, 64, 96), 3: (2, 64, 96)}
    path = toyclip.export_fp16(bb.model, tmp_path / "w.safetensors", toyclip.MODEL_NAME_V2)
    again = load_backbone("visae-toyclip2", str(path))
    with torch.no_grad():
        ref = bb.model.half().float().encode_image(x)
        got = again.model.encode_image(x)
    assert torch.equal(ref, got)
    with pytest.raises(Exception, match="no weights asked for"):
        load_backbone("visae-toyclip2")
