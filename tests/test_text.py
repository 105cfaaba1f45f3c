"""visae.text: fast causal-truncation text path equals encode_text; on-disk cache."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP  # noqa: E402

from tolerances import (assert_bitwise_equal, assert_close_derived, assert_same_unit_vectors,  # noqa: E402
                        backbone_in_float64)
from visae.text import (context_length, embed_prompts, encode_texts, fast_text_parts,  # noqa: E402
                        prompts_that_do_not_fit, texts_that_do_not_fit)

# Words of varied token lengths: one token, several BPE pieces, a phrase, one of exactly the context (75 BPE
# tokens + start and end) and one longer than it (cut).
WORDS = ["cat", "a", "hippopotamus", "antidisestablishmentarianism", "photograph of a red bicycle near the sea",
         "x" * 300, "dog", "Zürich", "0.5", "", " ".join(["x"] * 100)]


@functools.lru_cache(maxsize=None)
def _tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


@functools.lru_cache(maxsize=None)
def tiny_backbone(cls=CLIP, pool="argmax", seed=0, name="tiny"):
    torch.manual_seed(seed)
    model = cls(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, patch_size=16, image_size=32, head_width=16),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2, pool_type=pool, eos_id=49407),
    ).eval()
    tok = _tokenizer()
    return SimpleNamespace(name=name, pretrained=None, model=model, tokenizer=tok, encode_text=model.encode_text,
                           embed_dim=32, has_text=True)


def reference(bb, texts):
    with torch.no_grad():
        return F.normalize(bb.model.encode_text(bb.tokenizer(texts)).float(), dim=-1)



@pytest.mark.parametrize("cls", [CLIP, CustomTextCLIP])
@pytest.mark.parametrize("pool", ["argmax", "eos", "first"])
def test_fast_path_equals_encode_text_tiny(cls, pool):
    bb = backbone_in_float64(tiny_backbone(cls, pool))
    assert fast_text_parts(bb.model) is not None
    got = embed_prompts(bb, WORDS, batch_size=3)
    assert_same_unit_vectors(got, reference(bb, WORDS), f"{cls.__name__} {pool}")


def test_last_pooling_falls_back_to_full_context():
    bb = backbone_in_float64(tiny_backbone(CLIP, "last"))
    assert fast_text_parts(bb.model) is None
    assert_same_unit_vectors(embed_prompts(bb, WORDS[:4]), reference(bb, WORDS[:4]), "last pooling")


def test_fast_path_equals_encode_text_vit_b32_random_init():
    try:
        from visae.backbones import load_backbone
    except ImportError:
        load_backbone = None
    if load_backbone is not None:
        bb = load_backbone("ViT-B-32", random_init=True)
    else:  # before the registry lands: the same model straight from open_clip
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32").eval()
        bb = SimpleNamespace(name="ViT-B-32", pretrained=None, model=model, tokenizer=open_clip.get_tokenizer("ViT-B-32"),
                             encode_text=model.encode_text, embed_dim=512, has_text=True)
    got = embed_prompts(bb, WORDS, batch_size=4)
    ref = reference(bb, WORDS)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    assert got.shape == (len(WORDS), 512)


def test_templates_are_mean_of_unit_prompt_embeddings():
    bb = tiny_backbone()
    words, templates = ["cat", "dog", "sea urchin"], ["a photo of a {}.", "{}", "a drawing of the {}"]
    got = encode_texts(bb, words, templates)
    per = torch.stack([embed_prompts(bb, [t.format(w) for w in words]) for t in templates])  # [T, n, D]
    # float32 arithmetic after the same unit prompt embeddings: a mean of T terms, then a norm of D squares and
    # a division; every term and result is at most 1 in absolute value.
    D = got.shape[-1]
    assert_close_derived(got, F.normalize(per.mean(0), dim=-1), n_terms=len(templates) + D + 4, scale=1.0,
                         dtype=torch.float32, msg="template mean")
    assert_close_derived(got.norm(dim=-1), torch.ones(3), n_terms=D + 6, scale=1.0, dtype=torch.float32, msg="norms")
    with pytest.raises(ValueError, match="exactly one"):
        encode_texts(bb, words, ["no placeholder"])


def test_cache_hit_identical_and_changed_inputs_miss(tmp_path, monkeypatch):
    bb = tiny_backbone()
    words = ["cat", "dog", "bird"]
    first = encode_texts(bb, words, ["a photo of a {}."], cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1

    calls = []
    import visae.text as text_mod

    real = text_mod.embed_prompts
    monkeypatch.setattr(text_mod, "embed_prompts", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = encode_texts(bb, words, ["a photo of a {}."], cache_dir=tmp_path)
    assert calls == [] and torch.equal(first, again)  # served from disk, bit-identical

    other = encode_texts(bb, words, ["a drawing of a {}."], cache_dir=tmp_path)  # template changed: miss
    assert calls == [1] and len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not torch.allclose(first, other)

    encode_texts(bb, words + ["fish"], ["a photo of a {}."], cache_dir=tmp_path)  # texts changed: miss
    assert calls == [1, 1]

    # Same name, different weights (another random init): must miss, not return stale embeddings.
    bb2 = tiny_backbone(seed=1)
    fresh = encode_texts(bb2, words, ["a photo of a {}."], cache_dir=tmp_path)
    assert calls == [1, 1, 1]
    assert_bitwise_equal(fresh, encode_texts(bb2, words, ["a photo of a {}."]), msg="new weights, no cache")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp files left behind


def test_no_text_tower_is_a_clear_error():
    bb = SimpleNamespace(name="timm:resnet18", pretrained=None, model=torch.nn.Linear(2, 2), tokenizer=None,
                         has_text=False)
    with pytest.raises(ValueError, match="no text tower"):
        encode_texts(bb, ["cat"])


def test_fast_path_equals_encode_text_toyclip():
    from visae.backbones import load_backbone

    pytest.importorskip("visae.toyclip")
    bb = load_backbone("visae-toyclip", random_init=True)
    words = ["red", "circle", "a photo of a red circle on the left", "something striped", "hippopotamus", "x" * 100]
    assert fast_text_parts(bb.model) is not None
    bb64 = backbone_in_float64(bb)
    assert_same_unit_vectors(embed_prompts(bb64, words, batch_size=4), reference(bb64, words), "toy CLIP")
    # and through the registry's Backbone (its encode_text), with templates and the cache key it exposes
    emb = encode_texts(bb, words[:2], ["a {} object", "something {}"])
    assert emb.shape == (2, bb.embed_dim)


# ----------------------------------------------------------------------------- text the tower cannot represent


def _n_tokens(tok, text):
    return len(tok.encode(text)) + 2  # with the start and end tokens


def test_prompts_that_do_not_fit_the_context_exactly():
    tok = _tokenizer()
    ctx = context_length(tok)
    assert ctx == 77
    fits = " ".join(["cat"] * (ctx - 2))  # exactly the context
    over = fits + " cat"  # one token more: the tokenizer cuts it to the same tokens as `fits`
    assert _n_tokens(tok, fits) == ctx and _n_tokens(tok, over) == ctx + 1
    assert torch.equal(tok([fits])[0], tok([over])[0])
    prompts = ["cat", fits, over, "x" * 1000, "", "x" * 300]
    expected = [i for i, p in enumerate(prompts) if _n_tokens(tok, p) > ctx]
    assert prompts_that_do_not_fit(tok, prompts) == expected == [2, 3]
    long = " ".join(["cat"] * 72)  # 74 tokens bare, 79 in "a photo of a {}."
    assert texts_that_do_not_fit(tok, ["cat", long], ["{}", "a photo of a {}."]) == [long]
    assert texts_that_do_not_fit(tok, ["cat", long]) == []

    def no_context_argument(texts):  # a tokenizer that only cuts to its own context: judged conservatively
        return tok(texts)

    assert prompts_that_do_not_fit(no_context_argument, prompts) == [1, 2, 3, 5]


def test_embed_prompts_warns_when_it_cuts(caplog):
    bb = tiny_backbone()
    with caplog.at_level("WARNING", logger="visae.text"):
        embed_prompts(bb, ["cat", "x" * 1000, "dog", "x" * 300])
    assert "1 prompt(s) longer than the text context of 77 tokens" in caplog.text and "x" * 1000 in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="visae.text"):
        embed_prompts(bb, ["cat", " ".join(["cat"] * 75)])  # exactly 77 tokens: not cut, no warning
    assert "longer than the text context" not in caplog.text


def _toy_tokenizer():
    from visae import toyclip

    toyclip.register()
    return open_clip.get_tokenizer(toyclip.MODEL_NAME)


def test_every_toy_zero_shot_prompt_fits_the_toy_clip_context():
    from visae import toyworld as tw

    tok = _toy_tokenizer()
    assert context_length(tok) == 16
    for name, bench in tw.toy_classnames_and_templates().items():
        assert texts_that_do_not_fit(tok, bench["classnames"], bench["templates"]) == [], name


@pytest.mark.xfail(strict=True, reason="known, left to the toy CLIP's owner: with colour and colour2 both 'cyan' "
                   "(2 BPE tokens) the caption 'a large cyan circle and a small cyan circle on a plain background' "
                   "needs 17 tokens and is cut to the toy CLIP's 16 during its training")
def test_every_toy_caption_fits_the_toy_clip_context():
    """The toy CLIP reads 16 tokens; a training caption longer than that is learnt cut. CLIP's BPE is per word,
    so a caption's length is the sum of its words': the row with the longest value word of every factor gives
    every caption form its longest text."""
    from visae import toyworld as tw

    tok = _toy_tokenizer()
    ctx = context_length(tok)
    row = [max(range(len(tw.FACTORS[f])), key=lambda v: _n_tokens(tok, str(tw.FACTORS[f][v]))) for f in tw.FACTORS]
    row[tw.FACTOR_INDEX["n_objects"]] = 1  # two objects (shape2 / colour2 set above): the longest captions
    assert row[tw.FACTOR_INDEX["shape2"]] != tw.ABSENT
    captions = [c.text for c in tw.caption_options(row)]
    assert len(captions) > 20
    assert prompts_that_do_not_fit(tok, captions) == [], [(c, _n_tokens(tok, c)) for c in captions
                                                          if _n_tokens(tok, c) > ctx]
