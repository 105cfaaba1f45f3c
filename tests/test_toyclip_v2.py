"""visae-toyclip v2's recipe (issue 12): negatives from outside the world and the naming list, shifts, a tiny run."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from visae import toyclip
from visae import world2 as w2

VOCAB_20K = Path(__file__).resolve().parents[1].parent / "shared" / "vocab" / "20k.txt"


def test_negative_words_avoid_the_naming_list_and_the_world(tmp_path):
    excl = tmp_path / "excl.txt"
    excl.write_text("cannot\nlegit\nthe\n")
    negs = toyclip.negative_words(excl, n_candidates=20000, seed=0, n=500)
    assert len(negs) == 500 and len(set(negs)) == 500
    world = toyclip.world2_words()
    assert {"red", "crimson", "star", "striped", "left"} <= world
    assert not set(negs) & world
    assert not set(negs) & {"cannot", "legit", "the"}
    assert negs == toyclip.negative_words(excl, n_candidates=20000, seed=0, n=500)
    assert negs != toyclip.negative_words(excl, n_candidates=20000, seed=1, n=500)
    with pytest.raises(FileNotFoundError, match="nothere"):
        toyclip.negative_words(tmp_path / "nothere.txt")


@pytest.mark.skipif(not VOCAB_20K.is_file(), reason="../shared/vocab/20k.txt not present")
def test_negatives_are_unseen_by_the_20k_naming_list():
    words20k = {x.strip().lower() for x in VOCAB_20K.read_text().splitlines() if x.strip()}
    negs = toyclip.negative_words(VOCAB_20K, seed=0, n=2000)
    assert len(negs) == 2000 and not set(negs) & words20k


def test_negative_captions_are_true_of_no_image():
    import open_clip

    toyclip.register()
    s = toyclip._CaptionSamplerV2(open_clip.get_tokenizer(toyclip.MODEL_NAME))
    rows = w2.sample_world2(16, seed=4).factors
    rng = np.random.default_rng(0)
    tok, cons, texts = s(rows, rng)
    ntok, ncons, ntexts = s.negatives(["zebrafish", "quartet"], 6, len(w2.FACTORS), rng)
    pos = toyclip._positives(rows, np.concatenate([cons, ncons])).numpy()
    assert pos[:, :16].diagonal().all()  # every image's own caption is true of it
    assert not pos[:, 16:].any()
    assert all(("zebrafish" in t) or ("quartet" in t) for t in ntexts)


def test_shift_scene_moves_within_frame():
    sc = w2.sample_scenes(30, seed=5, max_objects=1)
    for s in sc:
        o = s.objects[0]
        t = toyclip.shift_scene(s, 8.0, -8.0).objects[0]
        assert o.radius <= t.cx <= 64 - o.radius and o.radius <= t.cy <= 64 - o.radius
        # Moved by 8 px unless the frame stopped it.
        assert t.cx == pytest.approx(min(o.cx + 8, 64 - o.radius)) and t.cy == pytest.approx(max(o.cy - 8, o.radius))


def test_tiny_v2_run_exports_a_loadable_model(tmp_path):
    # One-object scenes only, so the default curriculum (single-object batches) has enough of them.
    # The naming list kept out of the negatives: a world word ("red"), words sharing its token red</w>, others.
    naming = tmp_path / "naming.txt"
    naming.write_text("red\nincurred\nwhispered\npencil\ntable\nriver\ncloud\n")
    cfg = toyclip.ToyClipV2Config(out=str(tmp_path / "run"), n_train=64, max_objects=1, steps=3, batch_size=16, warmup=1,
                                  eval_n=64, eval_every=0, negatives_per_step=4, negatives_exclude=str(naming),
                                  n_negative_words=50, threads=1, progress=False)
    path = toyclip.train_toy_clip_v2(cfg, [])
    card = json.loads(path.with_suffix(".json").read_text())
    inh = card["evaluation"]["subword_inheritance"]  # the final evaluation measures it on the unseen naming words
    assert inh["n_heldout"] == 6 and inh["n_pairs"] == 2  # "red" is a world word; incurred / whispered share red</w>
    assert set(inh["per_word"]) == {"red"} and 0 <= inh["fraction_no_closer"] <= 1
    from visae.config import ConfigError

    with pytest.raises(ConfigError, match="word list"):  # a usage error: exit 2, one line
        toyclip.train_toy_clip_v2(dataclasses.replace(cfg, negatives_exclude=str(tmp_path / "missing.txt"),
                                                      out=str(tmp_path / "never")), [])
    assert not (tmp_path / "never").exists()
    # no held-out word shares a token with a world word: the fraction is undefined, null in the card (valid JSON)
    naming.write_text("pencil\ntable\n")
    path = toyclip.train_toy_clip_v2(dataclasses.replace(cfg, out=str(tmp_path / "run_none"), steps=1), [])
    text = path.with_suffix(".json").read_text()
    assert json.loads(text)["evaluation"]["subword_inheritance"]["fraction_no_closer"] is None
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the card"))
    assert set(card["evaluation"]["pil"]) == set(toyclip.V2_COARSE)
    assert set(card["evaluation"]["shift"]) == {"0.5", "2.0", "4.0", "8.0"}
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    # Every record carries the time so far and each factor head's batch accuracy (a fraction).
    assert all(set(r["aux_acc"]) == set(w2.MAIN_FACTORS) and all(0 <= a <= 1 for a in r["aux_acc"].values()) for r in log)
    assert all(0 < r["wall"] and 0 < r["cpu"] for r in log) and log[0]["wall"] <= log[-1]["wall"]
    assert set(card["evaluation"]["pil_by_size"]) <= set(w2.SIZES)
    assert all(set(v) == {"shape", "texture"} for v in card["evaluation"]["pil_by_size"].values())
    assert len((tmp_path / "run" / "negatives.txt").read_text().split()) == 50
    assert card["model"] == "visae-toyclip2" and path.name == "visae-toyclip2.safetensors"
    model, _, _ = toyclip.create_toyclip(path, model=card["model"])
    assert sum(p.numel() for p in model.parameters()) > 0
    # the exported fp16 weights are the trained model's, rounded once to float16
    from safetensors.torch import load_file
    sd = load_file(str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k].float()), k


def test_batches_follow_the_single_object_curriculum():
    rows = w2.sample_world2(200, seed=6).factors
    single = np.flatnonzero(rows[:, w2.FACTOR_INDEX["n_objects"]] == 0)
    assert 16 <= len(single) < 200
    cfg = toyclip.ToyClipV2Config(batch_size=16, curriculum_steps=5, single_object_fraction=0.25)
    for step in range(10):
        idx = toyclip._v2_batch_indices(step, cfg, len(rows), single, np.random.default_rng(step))
        assert len(idx) == 16 and len(set(idx.tolist())) == 16 and idx.min() >= 0 and idx.max() < 200
        n1 = int(np.isin(idx, single).sum())
        if step < 5:
            assert n1 == 16
        else:  # 4 drawn from the single-object scenes, 12 from all scenes (some of them single too)
            assert n1 >= 4 and np.isin(idx[:4], single).all()
    plain = toyclip.ToyClipV2Config(batch_size=16)
    idx = toyclip._v2_batch_indices(0, plain, len(rows), single, np.random.default_rng(0))
    assert len(set(idx.tolist())) == 16
    with pytest.raises(ValueError, match="single_object_fraction"):
        toyclip.train_toy_clip_v2(toyclip.ToyClipV2Config(single_object_fraction=1.5, out="/nonexistent/x"), [])
    with pytest.raises(ValueError, match="texture_style_jitter"):
        toyclip.train_toy_clip_v2(toyclip.ToyClipV2Config(texture_style_jitter=2.0, out="/nonexistent/x"), [])
    with pytest.raises(ValueError, match="visae-toyclip2"):  # an unknown architecture, before anything is written
        toyclip.train_toy_clip_v2(toyclip.ToyClipV2Config(model="visae-toyclip3", out="/nonexistent/x"), [])


def test_input_errors_are_one_line_before_anything_is_written(tmp_path, capsys):
    """``visae train-toy-clip2``'s input errors (checked by the config or before the run directory is made) are one line
    naming the field and exit 2, and leave nothing behind: an unknown architecture, a head-weight spec that does not
    parse, too few single-object scenes for a batch (64 scenes of up to 4 objects hold about 12), --out a file."""
    from visae import cli

    (tmp_path / "afile").write_text("x")
    for argv, words in ((["--model", "visae-toyclip3"], ["ToyClipV2Config.model", "visae-toyclip2-reg4"]),
                        (["--aux_factor_weights", "shap:3"], ["ToyClipV2Config.aux_factor_weights", "shap:3"]),
                        (["--n_train", "64", "--batch_size", "16"], ["ToyClipV2Config.n_train = 64", "single-object",
                                                                     "batch_size = 16"]),
                        (["--out", str(tmp_path / "afile")], ["ToyClipV2Config.out", "is a file"]),
                        (["--out", str(tmp_path / "afile" / "sub")], ["ToyClipV2Config.out", "afile is a file"])):
        out = ["--out", str(tmp_path / "run")] if "--out" not in argv else []
        rc = cli.main(["train-toy-clip2", *out, *argv, "--negatives_exclude", "", "--no_progress", "--threads", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and all(w in err[0] for w in words), (argv, err)
        assert not (tmp_path / "run").exists() and (tmp_path / "afile").read_text() == "x"


def test_resume_of_a_checkpoint_from_before_the_model_field(tmp_path):
    """A v2 run checkpointed before ToyClipV2Config.model existed (v1's patchify tower, no 'model' in its config)
    resumes with --model visae-toyclip and is refused, naming the field, under the default visae-toyclip2."""
    import open_clip

    cfg = toyclip.ToyClipV2Config(out=str(tmp_path), model=toyclip.MODEL_NAME)
    old_cfg = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("model", "aux_factor_weights")}
    toyclip.register()
    torch.manual_seed(0)
    model = open_clip.create_model(toyclip.MODEL_NAME)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": 7, "aux_heads": {}, "train_seconds": 1.5,
                "config": old_cfg}, tmp_path / "checkpoint.pt")
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (5, 7, 9)))
    torch.manual_seed(1)
    fresh = open_clip.create_model(toyclip.MODEL_NAME)
    step, secs = toyclip._resume(tmp_path / "checkpoint.pt", cfg, dataclasses.asdict(cfg), fresh, None,
                                 torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    assert (step, secs) == (7, 1.5)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [5, 7]
    v2 = toyclip.ToyClipV2Config(out=str(tmp_path))
    with pytest.raises(ValueError, match=r"'model': \('visae-toyclip', 'visae-toyclip2'\)"):
        toyclip._resume(tmp_path / "checkpoint.pt", v2, dataclasses.asdict(v2), fresh, None,
                        torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    # the run trained with equal head weights: resuming it with other weights is refused, naming the field
    weighted = dataclasses.replace(cfg, aux_factor_weights="shape:6")
    with pytest.raises(ValueError, match=r"'aux_factor_weights': \('', 'shape:6'\)"):
        toyclip._resume(tmp_path / "checkpoint.pt", weighted, dataclasses.asdict(weighted), fresh, None,
                        torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    # the checkpoint has no world_version: it was trained on world2 format 1, and is not continued on another format
    with pytest.raises(ValueError, match=f"trained on world format 1, this visae draws format {w2.FORMAT_VERSION}"):
        toyclip._resume(tmp_path / "checkpoint.pt", cfg, dataclasses.asdict(cfg), fresh, None,
                        torch.optim.AdamW(fresh.parameters(), lr=1e-3), world_version=w2.FORMAT_VERSION)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    torch.save({**state, "world_version": w2.FORMAT_VERSION}, tmp_path / "checkpoint.pt")
    assert toyclip._resume(tmp_path / "checkpoint.pt", cfg, dataclasses.asdict(cfg), fresh, None,
                           torch.optim.AdamW(fresh.parameters(), lr=1e-3), world_version=w2.FORMAT_VERSION)[0] == 7


def test_aux_factor_weights():
    order = list(w2.MAIN_FACTORS)
    assert toyclip.aux_factor_weights("") == [1.0] * len(order)
    got = toyclip.aux_factor_weights(" shape:6 , texture:2.5,background:0")
    assert got == [{"shape": 6.0, "texture": 2.5, "background": 0.0}.get(f, 1.0) for f in order]
    for bad, match in (("shap:2", "factor one of"), ("shape", "factor one of"), ("shape:x", "not a number"),
                       ("shape:-1", ">= 0"), ("shape:nan", ">= 0"), ("shape:1,shape:2", "twice"),
                       (",".join(f"{f}:0" for f in order), "every weight is 0")):
        with pytest.raises(ValueError, match=match):
            toyclip.aux_factor_weights(bad)
    # the loss is the weighted mean of the heads' cross-entropies (a zero weight drops a head)
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(6, n, generator=g, dtype=torch.float64) for n in (3, 4)]
    labels = torch.tensor([[0, 1], [1, 2], [2, -1], [0, 3], [1, 0], [2, 1]])
    ce = [torch.nn.functional.cross_entropy(lg, labels[:, i], ignore_index=-1) for i, lg in enumerate(logits)]
    # the same two products, one sum and one division on both sides, in another order: <= 4 roundings each
    assert torch.allclose(toyclip.aux_factor_loss(logits, labels, [6.0, 1.0]), (6 * ce[0] + ce[1]) / 7,
                          rtol=8 * torch.finfo(torch.float64).eps, atol=0)
    assert torch.equal(toyclip.aux_factor_loss(logits, labels, [0.0, 2.0]), 2 * ce[1] / 2)
    # checked before anything is written
    with pytest.raises(ValueError, match="aux_factor_weights"):
        toyclip.train_toy_clip_v2(toyclip.ToyClipV2Config(aux_factor_weights="size:big", out="/nonexistent/x"), [])


def test_create_toyclip_errors_name_the_architecture(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"visae-toyclip2 weights .*nothere\.safetensors not found; they ship in assets/toyclip/ .*visae train-toy-clip2 --model visae-toyclip2 "):
        toyclip.create_toyclip(tmp_path / "nothere.safetensors", model=toyclip.MODEL_NAME_V2)
    with pytest.raises(FileNotFoundError, match=r"visae-toyclip weights .* they ship in assets/toyclip/"):
        toyclip.create_toyclip(tmp_path / "nothere.safetensors")
    with pytest.raises(ValueError, match=r"unknown toy CLIP architecture 'visae-toyclip3'"):
        toyclip.create_toyclip(model="visae-toyclip3")


def test_pretrain_steps_train_the_image_tower_on_the_factor_heads_only(tmp_path):
    """During pretrain_steps the loss is the chosen factor heads only: the text tower and the logit scale keep their
    initial values (no gradient reaches them; AdamW skips parameters without one), the image tower moves, and the
    log marks those steps."""
    import open_clip
    from safetensors.torch import load_file

    cfg = toyclip.ToyClipV2Config(out=str(tmp_path / "run"), n_train=48, max_objects=1, steps=2, batch_size=16, warmup=1,
                                  pretrain_steps=2, pretrain_factor_weights="shape:1,texture:0.5", eval_n=8,
                                  eval_every=0, negatives_per_step=4, negatives_exclude="", n_negative_words=20,
                                  threads=1, progress=False)
    path = toyclip.train_toy_clip_v2(cfg, [])
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r.get("pretrain") for r in log] == [True, True] and all(np.isfinite(r["aux"]) for r in log)
    toyclip.register_v2()
    torch.manual_seed(cfg.seed)
    init = open_clip.create_model(cfg.model).state_dict()
    got = load_file(str(path))
    text_keys = [k for k in init if not k.startswith("visual.")]
    assert "logit_scale" in text_keys and len(text_keys) > 5
    for k in text_keys:
        assert torch.equal(got[k].float(), init[k].half().float()), k
    assert any(not torch.equal(got[k].float(), init[k].half().float()) for k in init if k.startswith("visual.") and init[k].is_floating_point())
    with pytest.raises(ValueError, match="every weight is 0"):  # unnamed factors weigh 0 while pretraining
        toyclip.train_toy_clip_v2(dataclasses.replace(cfg, pretrain_factor_weights="shape:0", out="/nonexistent/x"), [])


def test_records_hold_absolute_paths_and_resume_a_record_written_as_typed(tmp_path, monkeypatch):
    """config.json / the checkpoint / the card record out, export and negatives_exclude absolute (read from anywhere,
    they say which files were used); a checkpoint of an older visae, its paths as typed, resumes from its directory,
    and one that excluded another word list is refused naming the field."""
    import open_clip

    monkeypatch.chdir(tmp_path)
    cfg = toyclip.ToyClipV2Config(out="run", model=toyclip.MODEL_NAME, negatives_exclude="naming.txt")
    rec = toyclip._config_record(cfg)
    assert rec["out"] == str(tmp_path / "run") and rec["negatives_exclude"] == str(tmp_path / "naming.txt")
    assert rec["export"] == "" and rec["seed"] == cfg.seed  # empty kept, other fields as they are
    toyclip.register()
    model = open_clip.create_model(toyclip.MODEL_NAME)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": 3, "aux_heads": {}, "train_seconds": 1.0,
                "config": dataclasses.asdict(cfg)}, ckpt)  # as typed: "naming.txt"
    assert toyclip._resume(ckpt, cfg, rec, model, None, opt) == (3, 1.0)
    other = dataclasses.replace(cfg, negatives_exclude=str(tmp_path / "other.txt"))
    with pytest.raises(ValueError, match="negatives_exclude"):
        toyclip._resume(ckpt, other, toyclip._config_record(other), model, None, opt)


def test_patch_labels_name_the_object_under_each_patch():
    """Each 8 x 8 patch gets the factors of the object covering most of it when that covers >= a quarter of the
    patch, else the 'no object' class; patches in the ViT's row-major order."""
    scenes = w2.sample_scenes(2, seed=3, max_objects=2, occlusion=0.0)
    _, labs, _ = w2._render_rows(scenes, "pil", w2.IMAGE_SIZE)
    labs = np.zeros_like(labs)
    labs[0, 0:8, 8:16] = 1  # patch 1 (row 0, column 1): object 0 fully
    labs[0, 8:12, 0:8] = 1  # patch 8 (row 1, column 0): half object 0 ...
    labs[0, 12:16, 0:8] = 2  # ... half object 1 (ties go to the first object)
    labs[0, 56:58, 56:64] = 1  # patch 63: a quarter exactly
    labs[0, 48:49, 48:64] = 1  # patches 54, 55: an eighth each
    labs[1, :, :] = 1
    got = toyclip.patch_labels(scenes, labs, ["shape", "colour_family", "texture"], min_cover=0.25)
    assert got.shape == (2, 64, 3)
    fam = w2.colour_families()
    o0, none = scenes[0].objects[0], [len(w2.FACTORS[f]) for f in ("shape", "colour_family", "texture")]
    want0 = [o0.shape, fam[o0.colour], o0.texture]
    for p in (1, 8, 63):
        assert got[0, p].tolist() == want0, p
    for p in (0, 2, 54, 55, 9):
        assert got[0, p].tolist() == none, p
    o1 = scenes[1].objects[0]
    assert (got[1] == np.array([o1.shape, fam[o1.colour], o1.texture])).all()
    half = toyclip.patch_labels(scenes, labs, ["shape"], min_cover=0.5)  # the quarter-covered patch is background now
    assert half[0, 8, 0] == o0.shape and half[0, 63, 0] == none[0] and half[0, 1, 0] == o0.shape
    with pytest.raises(ValueError, match="patch_labels"):
        toyclip.patch_labels(scenes[:1], labs, ["shape"])


def test_dense_loss_balances_object_and_background_patches():
    """Half the loss is the object patches' mean cross-entropy, half the background's, whatever their counts."""
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 4)  # 3 values + no object
    tok = torch.randn(2, 10, 6)
    y = torch.full((2, 10, 1), 3)
    y[0, :2, 0] = torch.tensor([0, 1])  # 2 object patches of 20
    loss, acc = toyclip.dense_loss(tok, [head], y, [3])
    ce = torch.nn.functional.cross_entropy(head(torch.nn.functional.layer_norm(tok, (6,))).flatten(0, 1),
                                           y.flatten(), reduction="none")
    obj = y.flatten() != 3
    torch.testing.assert_close(loss, (ce[obj].mean() + ce[~obj].mean()) / 2)
    assert 0.0 <= acc[0] <= 1.0
    loss_bg, acc_bg = toyclip.dense_loss(tok, [head], torch.full((2, 10, 1), 3), [3])  # no object patch: background only
    torch.testing.assert_close(loss_bg, ce[~obj].new_tensor(
        torch.nn.functional.cross_entropy(head(torch.nn.functional.layer_norm(tok, (6,))).flatten(0, 1),
                                          torch.full((20,), 3)).item()))
    assert np.isnan(acc_bg[0])


def test_dense_heads_and_init_fine_tune(tmp_path, monkeypatch):
    """init starts from a weights file (checked before any work); the per-patch heads add their loss and accuracy to
    the log and are not exported; bad dense settings are refused at construction."""
    from safetensors.torch import load_file

    from visae.config import ConfigError

    base = toyclip.train_toy_clip_v2(toyclip.ToyClipV2Config(  # another seed: another init than the fine-tune's own
        out=str(tmp_path / "base"), seed=1, n_train=48, max_objects=2, steps=1, batch_size=16, warmup=1, curriculum_steps=0,
        single_object_fraction=0.0, eval_n=8, eval_every=0, negatives_per_step=0, negatives_exclude="",
        threads=1, progress=False), [])
    cfg = toyclip.ToyClipV2Config(out=str(tmp_path / "ft"), init=str(base), dense_weight=1.0, dense_layer=2,
                                  dense_factors="shape,colour_family", n_train=48, max_objects=2, steps=2,
                                  batch_size=16, warmup=1, curriculum_steps=0, single_object_fraction=0.0, lr=1e-3,
                                  eval_n=8, eval_every=0, negatives_per_step=0, negatives_exclude="", threads=1,
                                  progress=False)
    path = toyclip.train_toy_clip_v2(cfg, [])
    log = [json.loads(x) for x in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["dense"]) and set(r["dense_acc"]) == {"shape", "colour_family"} for r in log)
    a, b = load_file(str(base)), load_file(str(path))
    assert set(a) == set(b)  # the heads are not part of the model
    # the run started from the base (seed 1): after 2 steps at lr 1e-3 its weights are near the base's, far from the
    # seed-0 random init it would have started from otherwise
    k = "visual.trunk.blocks.0.attn.qkv.weight"
    toyclip.register_v2()
    torch.manual_seed(0)
    import open_clip

    own = open_clip.create_model("visae-toyclip2").state_dict()[k]
    assert (b[k].float() - a[k].float()).abs().max() < 0.01 < (b[k].float() - own).abs().max()
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["config"]["init"] == str(base) and card["config"]["dense_layer"] == 2
    with pytest.raises(ConfigError, match="ToyClipV2Config.init: weights file .*not found"):
        toyclip.train_toy_clip_v2(dataclasses.replace(cfg, init=str(tmp_path / "no.safetensors"),
                                                      out=str(tmp_path / "never")), [])
    v1 = toyclip.export_fp16(torch.nn.Linear(2, 2), tmp_path / "v1.safetensors", toyclip.MODEL_NAME)
    with pytest.raises(ConfigError, match="holds weights of 'visae-toyclip'"):
        toyclip.train_toy_clip_v2(dataclasses.replace(cfg, init=str(v1), out=str(tmp_path / "never")), [])
    (tmp_path / "w.pt").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="w.pt is not a readable safetensors file"):
        toyclip.train_toy_clip_v2(dataclasses.replace(cfg, init=str(tmp_path / "w.pt"), out=str(tmp_path / "never")), [])
    assert not (tmp_path / "never").exists()
    for kw, msg in ((dict(dense_factors="shape,size"), "dense_factors"), (dict(dense_layer=4), "dense_layer"),
                    (dict(dense_min_cover=0.0), r"dense_min_cover = 0.0: expected in \(0, 1\]"),
                    (dict(dense_weight=1.0, dense_factors=""), "dense_factors is empty"),
                    (dict(dense_weight=1.0, model="visae-toyclip"), "needs a model with the timm image tower")):
        with pytest.raises(ConfigError, match=msg):
            toyclip.ToyClipV2Config(**kw)
    # valid on its own; refused by the run, before anything is written, for an architecture whose weights do not ship
    monkeypatch.delitem(toyclip.SHIPPED_WEIGHTS, "visae-toyclip2-reg4")
    with pytest.raises(ConfigError, match="no weights ship for 'visae-toyclip2-reg4'"):
        toyclip.train_toy_clip_v2(dataclasses.replace(cfg, init="shipped", model="visae-toyclip2-reg4",
                                                      out=str(tmp_path / "never")), [])
    assert not (tmp_path / "never").exists()
    assert toyclip.main_v2(["--dense_factors", "shape,size"]) == 2  # a usage error, one line
    # refused by the run's own checks (not the parser): one line and exit 2 too, not a traceback, nothing written
    assert toyclip.main_v2(["--model", "visae-toyclip2-reg4", "--init", "shipped", "--out", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()


def test_drawn_family_labels_follow_the_jittered_colour():
    """family_label drawn: each object's colour family is world2's rule applied to the colour actually drawn (jitter
    included); without jitter it equals the recorded family, with the recipe's jitter of 12 about 1 in 7 differ."""
    from visae import world2 as w2

    fi = w2.FACTOR_INDEX
    plain = w2.sample_scenes(300, 3, max_objects=2)
    _, _, rows = w2._render_rows(plain, "pil", w2.IMAGE_SIZE)
    assert np.array_equal(toyclip.drawn_family_factors(plain, rows), rows)
    jit = w2.sample_scenes(2000, 3, max_objects=2, colour_jitter=12.0)
    rows = np.stack([w2.scene_factors(sc) for sc in jit])
    out = toyclip.drawn_family_factors(jit, rows)
    drawn = w2.family_of_rgb(np.array([sc.objects[0].rgb for sc in jit], np.float64))
    assert np.array_equal(out[:, fi["colour_family"]], drawn)
    assert np.array_equal(out[:, fi["family_shape"]], drawn * len(w2.SHAPES) + rows[:, fi["shape"]])
    two = np.array([len(sc.objects) > 1 for sc in jit])
    assert np.array_equal(out[two, fi["colour_family2"]],
                          w2.family_of_rgb(np.array([sc.objects[1].rgb for sc in jit if len(sc.objects) > 1], np.float64)))
    assert (out[~two, fi["colour_family2"]] == w2.ABSENT).all()
    changed = out != rows
    assert not changed[:, [i for i in range(rows.shape[1]) if i not in
                           (fi["colour_family"], fi["family_shape"], fi["colour_family2"])]].any()
    # measured 0.146 on 20,000 scenes of seed 0; 2,000 scenes: binomial SE 0.008, so +-0.04 is 5 SE
    assert 0.10 <= changed[:, fi["colour_family"]].mean() <= 0.19
    with pytest.raises(Exception, match="family_label = 'painted'.*nominal"):
        toyclip.ToyClipV2Config(family_label="painted")
    with pytest.raises(Exception, match="family_label = 'drawn' with colour_jitter 0"):
        toyclip.ToyClipV2Config(family_label="drawn", colour_jitter=0.0)
    with pytest.raises(Exception, match="freeze_text needs init"):
        toyclip.ToyClipV2Config(freeze_text=True)
    with pytest.raises(ValueError, match="300 scenes but factors of shape"):
        toyclip.drawn_family_factors(jit[:300], rows)
    # the per-patch heads' targets follow the same label: an object whose drawn family differs carries it on its patches
    big = [i for i in np.flatnonzero(changed[:, fi["colour_family"]]) if jit[i].objects[0].radius >= 12][:3]
    _, maps, _ = w2._render_rows([jit[i] for i in big], "pil", w2.IMAGE_SIZE)
    nominal = toyclip.patch_labels([jit[i] for i in big], maps, ["colour_family"])[..., 0]
    dr = toyclip.patch_labels([jit[i] for i in big], maps, ["colour_family"], family_label="drawn")[..., 0]
    for j, i in enumerate(big):  # background ("no object") and other objects' patches agree; the main object's differ
        on = nominal[j] == dr[j]
        assert (~on).any() and (dr[j][~on] == drawn[i]).all() and (nominal[j][~on] == rows[i, fi["colour_family"]]).all()
    assert len(big) == 3


def test_family_label_drawn_reaches_the_training_batches(tmp_path, monkeypatch):
    """With family_label drawn the captions' and heads' factor rows of a training batch carry the drawn colour's
    family: every batch row is a row of drawn_family_factors of the training scenes, and some are no nominal row."""
    from visae import world2 as w2

    seen = []
    real = toyclip._positives
    monkeypatch.setattr(toyclip, "_positives", lambda fac, cons: (seen.append(np.array(fac)), real(fac, cons))[1])
    kw = dict(n_train=64, max_objects=2, occlusion=0.3, batch_size=32, warmup=1, curriculum_steps=0,
              single_object_fraction=0.0, eval_n=8, eval_every=0, negatives_per_step=0, negatives_exclude="", threads=1,
              progress=False, steps=2)
    toyclip.train_toy_clip_v2(toyclip.ToyClipV2Config(out=str(tmp_path / "d"), family_label="drawn", **kw), [])
    scenes = w2.sample_scenes(64, 0, 0, max_objects=2, occlusion=0.3, colour_jitter=12.0)  # the trainer's scenes
    nominal = np.stack([w2.scene_factors(sc) for sc in scenes])
    drawn = toyclip.drawn_family_factors(scenes, nominal)
    fi = w2.FACTOR_INDEX
    cols = [i for i in range(nominal.shape[1]) if i != fi["occluded"]]  # occluded: from the render, not the scene
    as_set = lambda a: {tuple(r[cols]) for r in a}  # noqa: E731
    rows = np.concatenate(seen)
    assert len(seen) == 2 and as_set(rows) <= as_set(drawn)
    assert as_set(rows) - as_set(nominal)  # the batches hold rows whose family was rewritten


def test_freeze_text_trains_the_image_tower_alone(tmp_path):
    """freeze_text: a fine-tune changes the image tower and keeps every text-tower tensor and the logit scale."""
    from safetensors.torch import load_file

    kw = dict(n_train=48, max_objects=2, batch_size=16, warmup=1, curriculum_steps=0, single_object_fraction=0.0,
              eval_n=8, eval_every=0, negatives_per_step=0, negatives_exclude="", threads=1, progress=False)
    base = toyclip.train_toy_clip_v2(toyclip.ToyClipV2Config(out=str(tmp_path / "base"), seed=1, steps=1, **kw), [])
    path = toyclip.train_toy_clip_v2(toyclip.ToyClipV2Config(out=str(tmp_path / "ft"), init=str(base), steps=3,
                                                             lr=1e-3, freeze_text=True, family_label="drawn", **kw), [])
    a, b = load_file(str(base)), load_file(str(path))
    text = [k for k in a if not k.startswith("visual.")]
    assert "logit_scale" in text and "token_embedding.weight" in text
    assert all(torch.equal(a[k], b[k]) for k in text)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("visual.trunk.blocks"))
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["config"]["freeze_text"] is True and card["config"]["family_label"] == "drawn"
