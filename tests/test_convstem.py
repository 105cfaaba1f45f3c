"""visae.convstem (the conv-stem ViT image tower of visae-toyclip2) and its open_clip / backbone packaging."""

from __future__ import annotations

import numpy as np
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
    assert widths == [24, 48, 96, 96]
    assert [m.kernel_size for m in emb.proj if isinstance(m, torch.nn.Conv2d)] == [(4, 4)] * 3 + [(1, 1)]  # three stride-2 convs doubling the width, then the 1x1 to embed_dim
    for bad, match in (({"patch_size": 6}, "power of two"), ({"patch_size": 1}, "power of two"),
                       ({"img_size": 60}, "multiple of patch_size"), ({"embed_dim": 90}, "divisible by 4")):
        with pytest.raises(ValueError, match=match):
            convstem.ConvStemPatchEmbed(**{"img_size": 64, "patch_size": 8, "embed_dim": 96, **bad})
    with pytest.raises(ValueError, match=r"input \(32, 32\)"):
        emb(torch.randn(1, 3, 32, 32))


def test_token_i_sees_its_own_grid_cell():
    """Token i of the stem depends on pixels of grid cell i and its neighbourhood only (its cell and 7 px on each
    side after three 4x4 stride-2 convs), so patch heatmaps keep their meaning: a change in the top-left corner
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
    # No file: the shipped weights (tag "shipped"), not an accidental random init.
    shipped = load_backbone("visae-toyclip2")
    assert shipped.pretrained == "shipped"
    with torch.no_grad():
        assert not torch.equal(shipped.model.encode_image(x), got)


def test_register_variant_has_four_distinct_registers_and_loads_from_a_file(tmp_path):
    """visae-toyclip2-reg4: the residual stream holds the class token, 4 register tokens and the 64 patch tokens
    (``num_prefix_tokens`` 5, so ``token="patch"`` gives the 64 patches); the registers are drawn at std 0.02 (at
    timm's std 1e-6 they trained into one token copied 4 times, docs/toyclip_v2_recipe.md section 17); a build is
    reproducible from the torch seed; exported weights load back bit for bit; with no file the backbone loads the
    shipped weights (world2's model) and records the tag; a visae-toyclip2 file is refused by its metadata."""
    import open_clip

    from visae.backbones import BackboneError

    bb = load_backbone("visae-toyclip2-reg4", random_init=True, seed=3)
    assert (bb.width, bb.num_prefix_tokens, bb.has_cls_token, len(bb.blocks)) == (96, 5, True, 4)
    reg = bb.model.visual.trunk.reg_token.detach()[0]
    assert reg.shape == (4, 96)
    # drawn at REGISTER_INIT_STD (0.02), not timm's 1e-6: 384 draws, so their std is within 15 % of it (a
    # chi-square of 384 degrees of freedom: relative sd 3.6 %; 15 % is 4 of those)
    assert abs(float(reg.std()) / convstem.REGISTER_INIT_STD - 1) < 0.15, float(reg.std())
    x = torch.randn(2, 3, 64, 64)
    layers = bb.encode_layers(x, [0, 3], token="patch")
    assert {k: tuple(v.shape) for k, v in layers.items()} == {0: (2, 64, 96), 3: (2, 64, 96)}
    toyclip.register_v2_reg4()
    states = []
    for _ in range(2):
        torch.manual_seed(7)
        states.append(open_clip.create_model("visae-toyclip2-reg4").state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    path = toyclip.export_fp16(bb.model, tmp_path / "w.safetensors", toyclip.MODEL_NAME_V2_REG4)
    again = load_backbone("visae-toyclip2-reg4", str(path))
    with torch.no_grad():
        assert torch.equal(bb.model.half().float().encode_image(x), again.model.encode_image(x))
    shipped = load_backbone("visae-toyclip2-reg4")
    assert shipped.pretrained == "shipped" and shipped.num_prefix_tokens == 5
    from safetensors.torch import load_file

    sd, file = shipped.model.state_dict(), load_file(str(toyclip.TOYCLIP2_REG4_WEIGHTS))  # the shipped file, every tensor
    assert set(file) <= set(sd) and all(torch.equal(sd[k], file[k].to(sd[k].dtype)) for k in file)
    # a model with no pretrained tags and no file: the message offers the flags, not a '<name>:<tag>' form
    with pytest.raises(BackboneError, match=r"no weights asked for; give a checkpoint file .*--pretrained FILE.*--random_init"):
        load_backbone("visae-tiny-test")
    v2 = toyclip.export_fp16(load_backbone("visae-toyclip2", random_init=True).model, tmp_path / "v2.safetensors",
                             toyclip.MODEL_NAME_V2)
    with pytest.raises(BackboneError, match=r"weights of 'visae-toyclip2'.*not 'visae-toyclip2-reg4'"):
        load_backbone("visae-toyclip2-reg4", str(v2))


def test_stem_receptive_field_is_its_cell_and_seven_pixels_around_it():
    """The receptive field ConvStemPatchEmbed's docstring states, pixel by pixel: token (r, c) reads rows and columns
    8r - 7 .. 8r + 14 (8c - 7 .. 8c + 14): its cell 8r .. 8r + 7 and 7 pixels on each side, centred on the cell. A
    pixel changes exactly the tokens whose field holds it (eval mode: every other token is computed from identical
    inputs by identical operations, hence bit for bit unchanged)."""
    torch.manual_seed(0)
    emb = convstem.ConvStemPatchEmbed(img_size=64, patch_size=8, embed_dim=96).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = emb(x).view(8, 8, 96)
        for r, c in ((0, 0), (0, 5), (7, 7), (8, 8), (12, 9), (15, 0), (40, 63), (63, 63)):
            y = x.clone()
            y[..., r, c] += 1.0
            moved = (emb(y).view(8, 8, 96) != a).any(-1)
            want = {(i, j) for i in range(8) for j in range(8) if 8 * i - 7 <= r <= 8 * i + 14 and 8 * j - 7 <= c <= 8 * j + 14}
            centre = np.mean([[8 * i + 3.5, 8 * j + 3.5] for i, j in want], 0)  # the touched cells' centres
            assert want and np.all(np.abs(centre - [r, c]) <= 7.5), (r, c, centre)
            assert {tuple(t) for t in moved.nonzero().tolist()} == want, (r, c)


def test_export_keeps_integer_buffers_and_loads_back(tmp_path):
    """export_fp16 rounds floats to float16 once and keeps BatchNorm's num_batches_tracked an int64 (in float16 a count
    of 70,001 would be inf and load back as a garbage int)."""
    from safetensors import safe_open

    bb = load_backbone("visae-toyclip2", random_init=True, seed=1)
    bn = [m for m in bb.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 3
    for m in bn:
        m.num_batches_tracked.fill_(70_001)
    path = toyclip.export_fp16(bb.model, tmp_path / "w.safetensors", toyclip.MODEL_NAME_V2)
    with safe_open(str(path), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert {k for k, d in dtypes.items() if d != torch.float16} == {k for k in dtypes if k.endswith("num_batches_tracked")}
    again = load_backbone("visae-toyclip2", str(path))
    counts = [int(m.num_batches_tracked) for m in again.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert counts == [70_001] * 3


def test_weights_of_the_other_toy_architecture_are_refused(tmp_path):
    """A v1 weights file given as visae-toyclip2 (or a v2 file as visae-toyclip) fails up front with BackboneError naming
    the file and the architecture its metadata records, not with load_state_dict's list of missing keys."""
    from visae.backbones import BackboneError

    v1 = str(toyclip.TOYCLIP_WEIGHTS)
    with pytest.raises(BackboneError, match=r"weights of 'visae-toyclip'.*not 'visae-toyclip2'.*--model visae-toyclip$"):
        load_backbone("visae-toyclip2", v1)
    v2 = toyclip.export_fp16(load_backbone("visae-toyclip2", random_init=True).model, tmp_path / "v2.safetensors",
                             toyclip.MODEL_NAME_V2)
    with pytest.raises(BackboneError, match=r"v2\.safetensors: weights of 'visae-toyclip2'.*not 'visae-toyclip'"):
        load_backbone("visae-toyclip", str(v2))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(BackboneError, match=r"bad\.safetensors: not a readable safetensors file"):
        load_backbone("visae-toyclip2", str(bad))


def test_a_fresh_process_builds_both_routes_and_timm_preprocesses_like_open_clip():
    """A new process (a torchrun rank, a spawned worker) that only calls load_backbone gets the timm tower registered:
    'visae-toyclip2' and the image tower alone as 'timm:visae_toyvit_convstem'. The timm route's eval transform equals
    open_clip's on a non-square photo (resize the short side to 64, centre crop, no timm crop_pct cut)."""
    import subprocess
    import sys
    from pathlib import Path

    img = sorted((Path(__file__).resolve().parents[2] / "shared" / "imagenet-sample").glob("*.JPEG"))
    if not img:
        pytest.skip("../shared/imagenet-sample is not here")
    code = (
        "import sys, torch; from PIL import Image; from visae.backbones import load_backbone\n"
        "b = load_backbone('timm:visae_toyvit_convstem', random_init=True)\n"  # first: nothing registered it yet
        "a = load_backbone('visae-toyclip2', random_init=True)\n"
        "im = Image.open(sys.argv[1]).convert('RGB'); assert im.size[0] != im.size[1], im.size\n"
        "pa, pb = a.preprocess(im), b.preprocess(im)\n"
        "print(tuple(pa.shape), torch.equal(pa, pb), b.width, b.num_layers, tuple(b.encode_layer(pb[None], -1, 'patch').shape))\n")
    res = subprocess.run([sys.executable, "-c", code, str(img[0])], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[0] == "(3, 64, 64) True 96 4 (1, 64, 96)", res.stdout
