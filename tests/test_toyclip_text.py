"""Stage 2 of visae-toyclip2 (visae.toyclip_text): the text tower tuned alone against sub-word inheritance."""

import dataclasses
import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from visae import toyclip
from visae import toyclip_text as tt
from visae.config import ConfigError


@pytest.fixture(scope="module")
def tokenizer():
    toyclip.register_toy_model(toyclip.MODEL_NAME_V2)
    return open_clip.get_tokenizer(toyclip.MODEL_NAME_V2)


def test_token_negatives_keep_a_world_token_and_are_never_a_world_word(tokenizer):
    world = ["red", "parallelogram", "semicircle", "heptagon"]
    seqs = tt.world_token_sequences(tokenizer, world)
    assert [len(s) for s in seqs][0] == 1 and all(len(s) >= 2 for s in seqs[1:])  # one- and many-token words
    sot, eot = int(tokenizer.sot_token_id), int(tokenizer.eot_token_id)
    kw = dict(context=16, sot=sot, eot=eot, vocab_size=49408)
    out = tt.token_negatives(seqs, 400, np.random.default_rng(0), **kw)
    assert out.shape == (400, 16) and out.dtype == torch.long
    assert torch.equal(out, tt.token_negatives(seqs, 400, np.random.default_rng(0), **kw))  # seeded
    world_tokens = set().union(*map(set, seqs))
    kinds = set()
    for row in out.tolist():
        n = row.index(eot)
        assert row[0] == sot and n >= 2 and not any(row[n + 1:])  # start, >= 1 token, end, then padding
        body = tuple(row[1:n])
        assert body not in set(seqs) and sot not in body and eot not in body
        assert set(body) & world_tokens  # each keeps some of a world word's tokens
        kinds.add("part" if set(body) <= world_tokens else "mixed")
    assert kinds == {"part", "mixed"}  # parts of a word alone ("gram") and words with random tokens
    # words that must stay unseen (the naming list's "gram", a part of "parallelogram") are never drawn
    gram = tt.world_token_sequences(tokenizer, ["gram"])
    assert gram[0] == seqs[1][-1:]  # "gram" is parallelogram's last token alone
    kept = tt.token_negatives(seqs, 400, np.random.default_rng(0), **kw, forbidden=gram)
    bodies = {tuple(r[1:r.index(eot)]) for r in kept.tolist()}
    assert gram[0] not in bodies and gram[0] in {tuple(r[1:r.index(eot)]) for r in out.tolist()}
    with pytest.raises(ValueError, match="context"):
        tt.token_negatives(seqs, 1, np.random.default_rng(0), **dict(kw, context=2))


def test_hard_negative_words_share_a_world_token_and_avoid_the_naming_list(tokenizer):
    by_tok = tt.hard_negative_words(tokenizer, {"endured", "dared"}, n_candidates=20000)
    world = toyclip.world2_words()
    words = {w for ws in by_tok.values() for w in ws}
    assert len(words) > 100 and not words & world and not words & {"endured", "dared"}
    red = int(tokenizer.encoder["red</w>"])
    assert red in by_tok and "stirred" in by_tok[red]  # stir + red</w>
    toks = dict(zip(sorted(words), toyclip.subword_tokens(tokenizer, sorted(words))))
    assert all(t in toks[w] for t, ws in by_tok.items() for w in ws)
    assert list(by_tok) == sorted(by_tok)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny v2 base run (exported weights, card and negatives beside them) and a naming list."""
    d = tmp_path_factory.mktemp("base")
    naming = d / "naming.txt"
    naming.write_text("incurred\nwhispered\nendured\npencil\ntable\nriver\n")
    cfg = toyclip.ToyClipV2Config(out=str(d / "run"), n_train=64, max_objects=1, steps=2, batch_size=16, warmup=1,
                                  eval_n=32, eval_every=0, negatives_per_step=4, negatives_exclude=str(naming),
                                  n_negative_words=30, threads=1, progress=False)
    return toyclip.train_toy_clip_v2(cfg, []), naming


def _cfg(tmp_path, base_run, **kw):
    init, naming = base_run
    return tt.TextTuneConfig(**{**dict(out=str(tmp_path / "tune"), init=str(init), n_pool=64, steps=4, batch_size=16,
                                       warmup=1, negatives_per_step=4, n_negative_words=30, hard_negatives_per_step=4,
                                       hard_candidates=5000, token_negatives_per_step=8, negatives_exclude=str(naming),
                                       eval_n=32, checkpoint_every=2, threads=1, progress=False), **kw})


def test_tune_changes_the_text_tower_only_and_records_its_base(tmp_path, base_run):
    init, naming = base_run
    path = tt.tune_text_tower(_cfg(tmp_path, base_run), [])
    before, after = load_file(str(init)), load_file(str(path))
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual.") or k.startswith("logit_"))
    assert any(not torch.equal(before[k], after[k]) for k in before if not k.startswith("visual."))
    card = json.loads(path.with_suffix(".json").read_text())
    base = json.loads(init.with_suffix(".json").read_text())
    assert card["base"] == base and card["config"]["init_sha256"] == base["sha256"]
    assert card["command"].startswith("visae.toyclip_text.main") and card["steps"] == 4
    # every word trained on is recorded; none is a word of the naming list (the unseen words of the evaluation)
    seen = set((tmp_path / "tune" / "negatives.txt").read_text().split())
    assert set((init.parent / "negatives.txt").read_text().split()) <= seen
    assert len(seen) == card["negatives"]["n"] and card["negatives"]["hard"] > 0
    assert not seen & set(naming.read_text().split())
    inh = card["evaluation"]["subword_inheritance"]
    assert inh["n_heldout"] == 6 and inh["n_pairs"] >= 2  # incurred, whispered, endured share red</w>
    log = [json.loads(x) for x in (tmp_path / "tune" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)


def test_tune_resumes_to_the_same_weights(tmp_path, base_run):
    whole = tt.tune_text_tower(_cfg(tmp_path / "a", base_run), [])
    cfg = _cfg(tmp_path / "b", base_run)
    assert tt.tune_text_tower(cfg, [], stop_after=3) is None  # killed after step 3: the checkpoint has step 2
    resumed = tt.tune_text_tower(cfg, [])
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.read_bytes() == resumed.read_bytes()  # the same file, byte for byte (sha256 in the cards agree)
    log = [json.loads(x) for x in (tmp_path / "b" / "tune" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # step 3 of the killed call was redone once, not logged twice
    card = resumed.with_suffix(".json").read_text()
    assert json.loads(card)["train_seconds"] > 0
    # rerun when finished: no training and no evaluation, so the card is not rewritten
    assert tt.tune_text_tower(cfg, []) == resumed and resumed.with_suffix(".json").read_text() == card
    record = (tmp_path / "b" / "tune" / "config.json").read_text()
    with pytest.raises(ConfigError, match="different config"):
        tt.tune_text_tower(dataclasses.replace(cfg, lr=1e-3), [])
    assert (tmp_path / "b" / "tune" / "config.json").read_text() == record  # the refused rerun left the record


def test_tune_refuses_bad_input_before_writing(tmp_path, base_run, tokenizer):
    init, _ = base_run
    with pytest.raises(ConfigError, match="weights"):
        tt.tune_text_tower(_cfg(tmp_path, base_run, init=str(tmp_path / "none.safetensors")), [])
    with pytest.raises(ConfigError, match="overwrite its base"):
        tt.tune_text_tower(_cfg(tmp_path, base_run, export=str(init)), [])
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):  # the file at out or above it (was: out only)
        with pytest.raises(ConfigError, match=f"out: --out {out}: {tmp_path / 'afile'} is a file"):
            tt.tune_text_tower(_cfg(tmp_path, base_run, out=str(out)), [])
    with pytest.raises(ConfigError, match="parent of"):
        tt.tune_text_tower(_cfg(tmp_path, base_run, export=str(tmp_path / "afile" / "w.safetensors")), [])
    with pytest.raises(ConfigError, match="single-object scenes"):  # 8 scenes cannot fill a batch of 16
        tt.tune_text_tower(_cfg(tmp_path, base_run, n_pool=8), [])
    other = tmp_path / "copy.safetensors"
    other.write_bytes(init.read_bytes()[:-8] + b"\0" * 8)
    card = json.loads(init.with_suffix(".json").read_text())
    other.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="sha256"):
        tt.tune_text_tower(_cfg(tmp_path, base_run, init=str(other)), [])
    other.with_suffix(".json").write_text(json.dumps(dict(card, sha256=None)))
    with pytest.raises(ConfigError, match="no sha256"):
        tt.tune_text_tower(_cfg(tmp_path, base_run, init=str(other)), [])
    other.with_suffix(".json").write_text(json.dumps(dict(card, world_version=1, sha256=toyclip._file_sha256(other))))
    with pytest.raises(ConfigError, match="world format 1"):
        tt.tune_text_tower(_cfg(tmp_path, base_run, init=str(other)), [])
    with pytest.raises(ConfigError, match="word list"):
        tt.tune_text_tower(_cfg(tmp_path, base_run, negatives_exclude=str(tmp_path / "missing.txt")), [])
    assert not (tmp_path / "tune").exists()
    # one writer of a run directory at a time: another process holds the lock (within a process it is re-entrant)
    import subprocess
    import sys

    from visae.atomic import OutputLockedError

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from visae.atomic import output_lock\n"
                               "with output_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "locked")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError):
            tt.tune_text_tower(_cfg(tmp_path, base_run, out=str(tmp_path / "locked")), [])
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(ConfigError, match="negatives_exclude"):
        tt.TextTuneConfig(negatives_exclude="")
    with pytest.raises(ConfigError, match="single_object_fraction"):
        tt.TextTuneConfig(single_object_fraction=1.5)
    with pytest.raises(ConfigError, match="steps"):
        tt.TextTuneConfig(steps=0)
    with pytest.raises(ConfigError, match="raise --hard_candidates"):
        tt.hard_negative_words(tokenizer, set(), n_candidates=3)
    with pytest.raises(ConfigError, match="direction_weight"):
        tt.TextTuneConfig(direction_weight=1.0, hard_negatives_per_step=0)
    with pytest.raises(ConfigError, match="direction_margin"):
        tt.TextTuneConfig(direction_margin=-0.1)



def test_direction_penalty_is_the_hinge_over_shared_token_pairs_plus_the_anchor_and_trains_down(base_run, tokenizer):
    """The penalty of ``direction_weight``: bare hard negatives against the concept directions of the world words they
    share a token with, relative to bare random words; the anchor: the world's naming vocabulary's drift from the base
    embeddings. The text tower can lower the push while the anchor holds the world's words."""
    from visae import world2 as w2

    init, _ = base_run
    model, _, _ = toyclip.create_toyclip(init, model=toyclip.MODEL_NAME_V2)
    model.eval()
    world = w2.sample_world2(200, 3, max_objects=1, occlusion=0.0)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(toyclip.encode_world_images(model, world.images), dim=-1)
    anchors, base = tt._DirectionPenalty.anchor_embeddings(model, tokenizer, "cpu")
    pen = tt._DirectionPenalty(tokenizer, emb, world.factors, ["incurred", "configured", "table"], anchors, base, "cpu")
    assert "red" in pen.words and pen.words.index("red") in pen.shares["incurred"]
    assert pen.shares["incurred"] == pen.shares["configured"]  # both share only red</w>
    assert "ring" in pen.anchors and "striped background" in pen.anchors and len(pen.base) == len(pen.anchors)
    ref = ["river", "pencil", "house", "music", "garden"]
    words = ["incurred", "table", "configured"]
    anchor_idx = [pen.anchors.index(a) for a in ("red", "ring", "rectangle")]
    # by hand: margin 1 makes every sharing pair count; the base model has not moved, so the anchor is 0
    with torch.no_grad():
        e = torch.nn.functional.normalize(model.encode_text(tokenizer(words + ref)), dim=-1) @ pen.dirs.T
        med = e[3:].median(0).values
        want = [float((e[i, j] - med[j] + 1.0) ** 2) for i, h in enumerate(words) for j in pen.shares[h]]
        push, anchor = pen(model, words, ref, anchor_idx, 1.0, "cpu")
    assert want and float(push) == pytest.approx(float(np.mean(want)), rel=1e-5)
    assert float(anchor) <= 1e-10  # the same weights embed the same text (float32 rounding at most)
    # Adam steps on the text tower alone, on the push only: it falls, and the anchor measures the words it moved
    tt._freeze_image_side(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    first = float(pen(model, words, ref, anchor_idx, 0.05, "cpu")[0].detach())
    for _ in range(30):
        loss = pen(model, words, ref, anchor_idx, 0.05, "cpu")[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    push, anchor = (float(x.detach()) for x in pen(model, words, ref, anchor_idx, 0.05, "cpu"))
    assert first > 0 and push < 0.5 * first, (first, push)
    assert anchor > 1e-4, anchor  # "red" itself moved with its token: what the anchor term exists to hold


def test_tune_with_the_direction_penalty_logs_it(tmp_path, base_run):
    path = tt.tune_text_tower(_cfg(tmp_path, base_run, direction_weight=5.0), [])
    log = [json.loads(x) for x in (tmp_path / "tune" / "log.jsonl").read_text().splitlines()]
    assert all(r["direction_push"] >= 0 and r["direction_anchor"] >= 0 for r in log)
    assert log[0]["direction_anchor"] <= 1e-10 < max(r["direction_anchor"] for r in log)  # starts at the base
    # no anchor: nothing embedded for it, the term is 0 every step
    tt.tune_text_tower(_cfg(tmp_path / "na", base_run, direction_weight=5.0, anchor_weight=0.0), [])
    log = [json.loads(x) for x in (tmp_path / "na" / "tune" / "log.jsonl").read_text().splitlines()]
    assert all(r["direction_anchor"] == 0.0 for r in log) and any(r["direction_push"] > 0 for r in log)
    assert json.loads(path.with_suffix(".json").read_text())["config"]["direction_weight"] == 5.0


def test_a_tuned_model_as_base_draws_the_root_trainers_world():
    """Tuning a stage's output again: the pool's world settings are the v2 trainer's at the root of the card chain
    (the stage's own config has no world settings; its defaults would draw another world)."""
    root = {"config": {"seed": 3, "max_objects": 2, "occlusion": 0.0, "colour_jitter": 4.0, "texture_style_jitter": 1.0}}
    stage = {"config": {"seed": 0, "steps": 10}, "base": root}
    a, ja = tt._pool_scenes(root, 20)
    b, jb = tt._pool_scenes({"config": {"seed": 1}, "base": stage}, 20)
    assert ja == jb == 1.0 and [repr(x) for x in a] == [repr(x) for x in b]
    assert max(len(x.objects) for x in b) <= 2


def test_a_non_finite_loss_stops_the_run_before_it_reaches_the_weights(tmp_path, base_run):
    """An absurd weight (finite, so the config takes it) overflows the update; the next loss is not finite and the run
    stops there, naming the step, with no export written."""
    cfg = _cfg(tmp_path, base_run, direction_weight=1e308, steps=6)
    with pytest.raises(RuntimeError, match="the loss is"):
        tt.tune_text_tower(cfg, [])
    assert not (tmp_path / "tune" / "visae-toyclip2.safetensors").exists()


def test_the_register_variant_trains_with_per_patch_heads_and_its_text_stage_keeps_the_architecture(tmp_path, base_run):
    """visae-toyclip2-reg4 through both stages: the v2 trainer (per-patch heads on its patch tokens, behind the 5
    prefix tokens) exports ``visae-toyclip2-reg4.safetensors`` with a card of that model; the text stage takes it as
    its base, writes the same architecture and keeps the image tower (registers included) bit for bit; the file loads
    as a backbone of that name only."""
    from visae.backbones import BackboneError, load_backbone

    _, naming = base_run
    base = toyclip.train_toy_clip_v2(toyclip.ToyClipV2Config(
        out=str(tmp_path / "base"), model="visae-toyclip2-reg4", n_train=64, max_objects=1, steps=2, batch_size=16,
        warmup=1, dense_weight=1.0, dense_layer=1, eval_n=32, eval_every=0, negatives_per_step=4,
        negatives_exclude=str(naming), n_negative_words=30, threads=1, progress=False), [])
    assert base.name == "visae-toyclip2-reg4.safetensors"
    assert json.loads(base.with_suffix(".json").read_text())["model"] == "visae-toyclip2-reg4"
    log = [json.loads(x) for x in (tmp_path / "base" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["dense"]) for r in log)
    path = tt.tune_text_tower(_cfg(tmp_path, (base, naming), steps=2, checkpoint_every=1), [])
    assert path.name == "visae-toyclip2-reg4.safetensors"
    assert json.loads(path.with_suffix(".json").read_text())["model"] == "visae-toyclip2-reg4"
    before, after = load_file(str(base)), load_file(str(path))
    assert "visual.trunk.reg_token" in after
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert load_backbone("visae-toyclip2-reg4", str(path)).num_prefix_tokens == 5
    with pytest.raises(BackboneError, match="not 'visae-toyclip2'"):
        load_backbone("visae-toyclip2", str(path))
