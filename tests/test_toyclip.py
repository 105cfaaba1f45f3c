"""The toy CLIP: open_clip registration, the loss, resumable training, and the shipped model's zero-shot accuracy."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tolerances import assert_close_derived, unit_roundoff  # noqa: E402
from visae import toyclip as tc  # noqa: E402
from visae import toyworld as tw  # noqa: E402

HELD_OUT_SEED = 424242  # neither the training world (0) nor the training-time evaluation world (1000)
HELD_OUT_N = 300
# What the shipped model must reach on the held-out set (issue 4: >= 0.9 for colour and shape).
REQUIRED = {"colour": 0.9, "shape": 0.9}


def test_register_with_open_clip():
    import open_clip

    assert tc.register() == "visae-toyclip"
    assert "visae-toyclip" in open_clip.list_models()
    cfg = open_clip.get_model_config("visae-toyclip")
    assert cfg["embed_dim"] == 96 and cfg["vision_cfg"]["image_size"] == 64 and cfg["vision_cfg"]["patch_size"] == 8
    tok = open_clip.get_tokenizer("visae-toyclip")
    t = tok(["a large red triangle on the left on a striped background"])
    assert t.shape == (1, cfg["text_cfg"]["context_length"])
    assert int((t != 0).sum()) < t.shape[1]  # the longest caption fits without truncation


def test_shipped_tag_loads_the_shipped_weights():
    """A shard set made with the shipped weights records pretrained="shipped"; later stages load it back by that tag."""
    import open_clip

    from visae.backbones import load_backbone

    tc.register()
    assert "shipped" in open_clip.list_pretrained_tags_by_model("visae-toyclip")
    default = load_backbone("visae-toyclip")
    tagged = load_backbone("visae-toyclip", "shipped")
    assert default.pretrained == "shipped" and tagged.cache_key == default.cache_key
    model = open_clip.create_model("visae-toyclip", pretrained="shipped")
    for sd in (tagged.model.state_dict(), model.state_dict()):
        assert all(torch.equal(a, b) for a, b in zip(default.model.state_dict().values(), sd.values()))


def test_images_to_tensor_matches_open_clip_preprocess():
    _, preprocess, _ = tc.create_toyclip(None)
    w = tw.sample_world(3, seed=1)
    x = tc.images_to_tensor(w.images)
    y = torch.stack([preprocess(w.pil(i)) for i in range(3)])
    # both sides: pixel / 255, minus the mean, over the std (a few float32 roundings of each value's size;
    # |value| <= (1 + |mean|) / std); two computations
    mean, std = torch.tensor(OPENAI_DATASET_MEAN), torch.tensor(OPENAI_DATASET_STD)
    scale = ((1 + mean.abs()) / std)[:, None, None].expand_as(y[0])
    assert_close_derived(x, y, n_terms=4, scale=scale, dtype=torch.float32, msg="images_to_tensor vs open_clip preprocess")


def test_multi_positive_loss():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 8), dim=-1)
    txt = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    # With only the diagonal positive it is CLIP's loss.
    eye = torch.eye(6, dtype=torch.bool)
    logits = scale * img @ txt.T
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    # logits: an 8-term dot product of unit vectors times the scale (|z| <= 10); log-softmax over 6 (max|z| + log 6);
    # a mean of 6 and the average of two directions: 27 roundings at most of size 10 + log 6, two computations
    loss_tol = dict(n_terms=27, scale=10 + math.log(6), dtype=torch.float32)
    assert_close_derived(tc.multi_positive_clip_loss(img, txt, scale, eye), clip, msg="diagonal positives = CLIP", **loss_tol)
    # Captions 0 and 1 are both true of images 0 and 1 (e.g. "something red" and "a red circle"
    # of two red circles): which image gets which caption no longer matters, as it does for CLIP.
    pos = eye.clone()
    pos[0, 1] = pos[1, 0] = True
    swapped = txt[[1, 0, 2, 3, 4, 5]]
    assert_close_derived(tc.multi_positive_clip_loss(img, txt, scale, pos), tc.multi_positive_clip_loss(img, swapped, scale, pos),
                         msg="swapped true captions", **loss_tol)
    assert not torch.allclose(  # asserts a change, not rounding
        tc.multi_positive_clip_loss(img, txt, scale, eye), tc.multi_positive_clip_loss(img, swapped, scale, eye))


def test_positives_from_caption_constraints():
    f = tw.sample_factors(64, seed=2)
    sampler = tc._CaptionSampler(lambda texts: torch.zeros(len(texts), 16, dtype=torch.long))
    _, cons, texts = sampler(f, np.random.default_rng(0))
    pos = tc._positives(f, cons).numpy()
    assert pos.diagonal().all()
    for j in range(64):
        for k in range(64):
            opts = {c.text: c for c in tw.caption_options(f[k])}
            assert pos[j, k] == opts[texts[k]].matches(f[j])
    assert pos.sum() > 64  # partial captions are true of other images too


def _tiny_cfg(out, **kw):
    base = dict(out=str(out), n_train=48, steps=4, batch_size=8, warmup=1, eval_n=16, eval_every=0,
                checkpoint_every=2, threads=1, progress=False)
    base.update(kw)
    return tc.ToyClipConfig(**base)


def test_training_resumes_exactly(tmp_path):
    """A run killed after a checkpoint and resumed ends with the same weights as an unbroken run."""
    from safetensors.torch import load_file

    full = tc.train_toy_clip(_tiny_cfg(tmp_path / "a"))
    assert tc.train_toy_clip(_tiny_cfg(tmp_path / "b"), stop_after=3) is None  # "killed" at step 3, checkpoint at 2
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 2
    resumed = tc.train_toy_clip(_tiny_cfg(tmp_path / "b"))
    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float16 for v in a.values())
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    card = json.loads(full.with_suffix(".json").read_text())
    assert card["config"]["seed"] == 0 and card["steps"] == 4 and set(card["zero_shot_top1"]["all"]) >= {"colour", "shape"}
    record = (tmp_path / "b" / "config.json").read_text()
    with pytest.raises(ValueError, match="different config"):
        tc.train_toy_clip(_tiny_cfg(tmp_path / "b", lr=0.5))
    assert (tmp_path / "b" / "config.json").read_text() == record  # a refused rerun leaves the run's record as it was


@pytest.fixture(scope="module")
def held_out():
    return tw.sample_world(HELD_OUT_N, seed=HELD_OUT_SEED)


def _zero_shot_through_backbone(bb, world):
    """Zero-shot top-1 per benchmark using only the registry's Backbone (its preprocess, tokenizer, encoders)."""
    with torch.no_grad():
        x = torch.stack([bb.preprocess(world.pil(i)) for i in range(len(world))])
        img = F.normalize(bb.encode_image(x).float(), dim=-1)
        acc = {}
        for name, b in tw.toy_classnames_and_templates().items():
            texts = [t.format(c) for c in b["classnames"] for t in b["templates"]]
            emb = F.normalize(bb.encode_text(bb.tokenizer(texts)).float(), dim=-1)
            cls = F.normalize(emb.view(len(b["classnames"]), len(b["templates"]), -1).mean(1), dim=-1)
            pred = (img @ cls.T).argmax(1).numpy()
            y = world.factor(b["column"])
            acc[name] = float((pred == y)[y >= 0].mean())
    return acc


def test_shipped_weights_file():
    assert tc.TOYCLIP_WEIGHTS.is_file(), f"{tc.TOYCLIP_WEIGHTS} missing: train with python scripts/train_toy_clip.py (see assets/toyclip/README.md)"
    assert tc.TOYCLIP_WEIGHTS.stat().st_size < 10 * 2**20
    card = json.loads(tc.TOYCLIP_CARD.read_text())
    assert card["sha256"] == tc._file_sha256(tc.TOYCLIP_WEIGHTS)
    assert "train_toy_clip.py" in card["command"] and card["config"]["seed"] == 0


def test_shipped_model_zero_shot_through_registry(held_out):
    from visae.backbones import load_backbone

    bb = load_backbone("visae-toyclip")
    assert bb.embed_dim == 96 and bb.image_size == (64, 64) and bb.has_text
    acc = _zero_shot_through_backbone(bb, held_out)
    for name, need in REQUIRED.items():
        assert acc[name] >= need, acc
    # Same numbers through open_clip directly and the in-memory fast path.
    model, _, tok = tc.load_toyclip()
    res = tc.zero_shot_eval(model, tok, held_out)
    for name in REQUIRED:
        # at most one held-out example decided differently (two float32 paths); each accuracy is count / n rounded
        # once in float64 (<= u64 each, accuracies <= 1)
        assert abs(res["all"][name] - acc[name]) <= 1.0 / HELD_OUT_N + 2 * unit_roundoff(np.float64), (res["all"], acc)


def test_random_init_is_near_chance(held_out):
    """The accuracy test above can fail: random weights are at chance."""
    from visae.backbones import load_backbone

    bb = load_backbone("visae-toyclip", random_init=True)
    acc = _zero_shot_through_backbone(bb, held_out)
    for name in REQUIRED:
        chance = 1.0 / len(tw.FACTORS[name])
        assert acc[name] < min(0.5, 2.5 * chance), acc
