"""The demo end to end at the reduced (--quick) size: every artifact, resumption, and a real signal."""

import dataclasses
import hashlib
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from visae import demo  # noqa: E402
from visae.config import config_from_dict, config_to_dict, parse_config  # noqa: E402
from visae.toyclip import SHIPPED_WEIGHTS, TOYCLIP_WEIGHTS, WORLD2_MODEL  # noqa: E402
from visae.toyworld import WorldError  # noqa: E402


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    assert TOYCLIP_WEIGHTS.is_file(), f"{TOYCLIP_WEIGHTS} is missing (see assets/toyclip/README.md)"
    out = tmp_path_factory.mktemp("demo") / "out"
    # the first toy world (the demo's default is world2: tests/test_world2_demo_truth.py runs that one)
    argv = ["--config", str(demo.config_yaml("demo_toy.yaml")), "--out", str(out), "--quick", "--no_progress", "--threads", "2",
            "--text_cache", str(out.parent / "text_cache")]
    assert demo.main(argv) == 0
    return out, argv


def test_demo_writes_every_artifact(quick_demo, capsys):
    out, _ = quick_demo
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["stages"]) == set(demo.STAGES)
    world = json.loads((out / "world" / "world.json").read_text())
    assert world["n"] == demo.QUICK.quick_n_images
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_examples"] == world["n"] and manifest["d"] == 96
    assert manifest["source"]["model"] == "visae-toyclip"
    assert (out / "sweep" / "best" / "cfg.json").is_file() and (out / "sweep" / "leaderboard.md").is_file()
    concepts = json.loads((out / "concepts" / "concepts.json").read_text())
    assert concepts["num_named"] > 0
    index = out / "site" / "index.html"
    assert index.is_file() and any((out / "site" / "concepts").glob("*.html")) and any((out / "site" / "thumbs").glob("*"))
    rec = json.loads((out / "recovery.json").read_text())
    assert rec["summary"]["n_values"] == 6 + 8 + 2 + 3 + 3


def test_demo_finds_a_real_signal(quick_demo):
    """With the trained toy CLIP even the quick demo's SAE has latents that detect the world's concepts,
    named with the right words more often than chance would. Measured with seeds 0-3 of the quick demo (2026-12-02,
    AMD EPYC, 2 threads; since --quick scales the warm-ups to its 580 steps): mean best AUROC 0.978-0.987, the weakest
    colour 0.978-0.999, named right 77-91 %, a latent at AUROC >= 0.95 named right for 77-86 % of the values,
    selection score 0.98-1.00 (with the 1,000-step lambda warm-up that outlasted the run, 2026-12-01: 0.975-0.990,
    0.950-0.991, 59-86 %, 77-91 %, 0.98-1.00)."""
    out, _ = quick_demo
    rec = json.loads((out / "recovery.json").read_text())
    assert rec["summary"]["mean_best_auroc"] > 0.9, rec["summary"]
    colours = [r["auroc"] for r in rec["values"] if r["factor"] == "colour"]
    assert min(colours) > 0.8, colours
    assert rec["summary"]["fraction_named_right"] >= 0.4, rec["summary"]
    sel = json.loads((out / "sweep" / "selection.json").read_text())
    # the per-trial ground truth (names matched again from the trial's own weights) agrees for the selected trial
    assert rec["selected_trial"] == sel["trial"]
    assert rec["sweep_trials"][sel["trial"]]["fraction_named_at"] == rec["summary"]["fraction_named_at"]
    assert rec["summary"]["fraction_named_at"] >= 0.3, rec["summary"]
    assert sel["score"] > 3 / 48  # zero-shot on reconstructions, well above the 1/48 chance


def test_demo_rerun_skips_finished_stages(quick_demo, capsys):
    out, argv = quick_demo
    before = json.loads((out / "demo.json").read_text())["stages"]
    assert demo.main(argv) == 0
    err = capsys.readouterr().err
    assert all(f"{s}: done before" in err for s in demo.STAGES)
    assert json.loads((out / "demo.json").read_text())["stages"] == before
    summary = json.loads((out / "demo.json").read_text())
    assert demo.format_summary(summary).count(" s this run, the rest done before)") == 1  # not the stages' sum alone
    # another demo's directory: refused with one line on stderr (exit 2), not a traceback
    assert demo.main(argv + ["--seed", "1"]) == 2
    assert "other settings" in capsys.readouterr().err
    # made with the world's own model, asked with another: the error says how to finish the run
    assert demo.main(argv + ["--model", "ViT-B-32", "--pretrained", "openai"]) == 2
    assert "to finish it, rerun with --model visae-toyclip" in capsys.readouterr().err
    assert demo.main(argv + ["--model", "ViT-B-32", "--pretrained", "openai", "--seed", "1"]) == 2
    assert "to finish it" not in capsys.readouterr().err  # the model is not all that differs: no such hint


def test_demo_rerun_follows_a_reselected_sweep(quick_demo, capsys):
    """`visae select --sweep <out>/sweep ...` may put another trial in best/ after the demo finished: a rerun then
    names, browses and scores the new choice (it skipped them and reported the old trial). Simulated by concepts
    recorded for other weights (the digest the naming checks), the quick demo having one trial to select."""
    from visae.naming import sae_weights_sha256

    out, argv = quick_demo
    path = out / "concepts" / "concepts.json"
    doc = json.loads(path.read_text())
    doc["sae_weights_sha256"] = "0" * 64
    path.write_text(json.dumps(doc))
    assert demo.main(argv) == 0
    err = capsys.readouterr().err
    assert "the sweep's selection changed since the naming" in err, err
    assert "sweep: done before" in err and not any(f"{s}: done before" in err for s in ("name", "browse", "recovery"))
    assert json.loads(path.read_text())["sae_weights_sha256"] == sae_weights_sha256(out / "sweep" / "best")
    assert demo.main(argv) == 0  # and then everything is done
    err = capsys.readouterr().err
    assert all(f"{s}: done before" in err for s in demo.STAGES), err


# ----------------------------------------------------------------------------- the config: nested stage configs


def _leaves(cfg, prefix=""):
    """{dotted path: field name} of every non-config field under ``cfg``."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_leaves(v, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = f.name
    return out


def _fixed_inside(cfg, path):
    """Whether a config between the demo and ``path``'s leaf fixes that leaf itself (the sweep: each trial's out)."""
    parts = path.split(".")
    owner = getattr(cfg, parts[0])
    for i in range(1, len(parts) - 1):
        f = next(f for f in dataclasses.fields(owner) if f.name == parts[i])
        if ".".join(parts[i + 1:]) in f.metadata.get("fixed", ()):
            return True
        owner = getattr(owner, parts[i])
    return False


def test_a_copied_demo_directory_finishes_on_its_own_files(quick_demo, tmp_path, capsys):
    """A demo directory copied elsewhere (the original then gone) read the original's world and shards (its stages
    recorded absolute paths) and its sweep refused the copy's shards as "another config". Now the recorded paths
    follow the directory and the sweep goes by the shards' content: a copy whose sweep lost its trials finishes."""
    import shutil

    out, argv = quick_demo
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for d in (copy / "sweep" / "trials").iterdir():  # the sweep's work lost (as after a kill): it must train again
        shutil.rmtree(d)
    for f in (copy / "sweep" / "groups").glob("*/done.json"):
        f.unlink()
    shutil.rmtree(copy / "sweep" / "best")
    (copy / "sweep" / "selection.json").unlink()
    hidden = out.parent / "hidden"
    out.rename(hidden)  # the original is gone while the copy runs
    try:
        assert demo.main([a if a != str(out) else str(copy) for a in argv]) == 0
    finally:
        hidden.rename(out)
    err = capsys.readouterr().err
    assert "world: done before" in err and "extract: done before" in err
    summary = json.loads((copy / "demo.json").read_text())
    assert summary["stages"]["world"]["dir"] == str(copy / "world")
    assert summary["stages"]["extract"]["dir"] == str(copy / "shards")
    assert (copy / "sweep" / "best" / "cfg.json").is_file()


def test_a_word_list_edited_in_place_is_refused_not_reused(tmp_path, monkeypatch, capsys):
    """--distractors FILE edited after a demo ran: every stage was "done before" and the site kept names made from
    the old words (a newcomer's find). The demo records its input files' SHA-256 and refuses one changed since the
    stage that reads it finished; before that stage ran the new content is simply read."""
    def generate(out, n, seed, progress, workers):
        raise WorldError("stopped after the record")  # a stage's own error: exit 2, the state already written

    monkeypatch.setitem(demo.WORLDS, "world2", dataclasses.replace(demo.WORLDS["world2"], generate=generate))
    words = tmp_path / "d.txt"
    words.write_text("crimson\nincurred\n")
    argv = ["--out", str(tmp_path / "o"), "--distractors", str(words), "--no_progress"]
    assert demo.main(argv) == 2 and "stopped after the record" in capsys.readouterr().err
    words.write_text("crimson\nzzyzx\n")  # edited before naming ran: read as it is now, not refused
    assert demo.main(argv) == 2 and "stopped after the record" in capsys.readouterr().err
    st = json.loads((tmp_path / "o" / demo.STATE).read_text())
    assert st["inputs"]["distractors"]["sha256"] == hashlib.sha256(words.read_bytes()).hexdigest()
    # once the naming stage has finished, a later edit is stale: refused, naming the file
    st["stages"]["name"] = {"seconds": 1.0}
    words.write_text("crimson\nother\n")
    assert demo.stale_inputs(st, demo._input_digests(st["config"])) == ["distractors"]
    assert demo.stale_inputs({**st, "stages": {}}, demo._input_digests(st["config"])) == []
    (tmp_path / "o" / demo.STATE).write_text(json.dumps(st))
    assert demo.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--distractors ({words}) changed since this demo read it" in err and "stopped" not in err, err


def test_every_knob_is_declared_once():
    """The demo re-declares no stage's knob: a top-level field name appears in a nested config only where the demo
    passes the top-level value on (visae.demo.PROPAGATED) or the nested stage sets it itself (the sweep: each
    trial's out); the stage knobs the demo used to copy live in the nested configs only."""
    cfg = demo.DemoConfig()
    top = {f.name for f in dataclasses.fields(cfg) if not dataclasses.is_dataclass(getattr(cfg, f.name))}
    leaves = _leaves(cfg)
    clashes = {p for p, name in leaves.items() if "." in p and name in top}
    assert clashes, "the check below would be empty"
    undocumented = {p for p in clashes if p not in demo.PROPAGATED and not _fixed_inside(cfg, p)}
    assert not undocumented, f"declared both at the top of DemoConfig and in a nested config: {sorted(undocumented)}"
    for path in ("sweep.lrs", "sweep.l1_coeffs", "sweep.expansion_factors", "sweep.train.architecture",
                 "sweep.train.num_epochs", "sweep.train.batch_size", "naming.templates", "naming.subtract_mean",
                 "naming.n_top"):  # the knobs the demo used to copy: only in the stage's config now
        assert path in leaves and leaves[path] not in top, path
    assert set(demo._propagated_values(cfg)) == set(demo.PROPAGATED)  # resolve() sets exactly the documented ones
    for path, source in demo.PROPAGATED.items():  # every documented one is a real nested field and a top-level one
        assert path in leaves, path
        assert source == "" or source in top, (path, source)


@pytest.mark.parametrize("flag", ["--sweep.lrz", "--sweep.num_epoch", "--sweep.metrc", "--sweep.benchmrk",
                                  "--naming.n_tops", "--num_epochs"])
def test_nested_flag_typo_is_one_line_exit_2(tmp_path, capsys, flag):
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), flag, "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("visae demo: error: ") and flag in err[0], err
    assert "did you mean --" in err[0], err
    assert not out.exists()


def test_a_field_the_demo_sets_is_refused_naming_the_demo_flag(tmp_path, capsys):
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), "--sweep.seed", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give --seed instead" in err[0], err
    y = tmp_path / "c.yaml"  # a YAML file that contradicts a top-level field: refused, not silently overridden
    y.write_text("seed: 2\nsweep:\n  train:\n    seed: 3\n")
    assert demo.main(["--out", str(out), "--config", str(y)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sweep.train.seed = 3 conflicts with seed = 2" in err[0], err
    y.write_text("seed: 3\nsweep:\n  train:\n    seed: 3\n")  # agreeing with it is fine (a recorded config loads back)
    cfg = parse_config(demo.DemoConfig, ["--config", str(y)])
    assert demo.effective(cfg).sweep.train.seed == 3 and demo.effective(cfg).naming.seed == 3
    assert not out.exists()


def test_quick_keeps_a_nested_override_and_it_reaches_the_sweep(tmp_path, monkeypatch):
    """--quick replaces the nested sizes left at the demo's defaults; one given on the command line reaches the stage."""
    import visae.sweep

    got = {}

    def fake_sweep(cfg):
        got["cfg"] = cfg
        raise RuntimeError("stop after the sweep's config")

    monkeypatch.setattr(visae.sweep, "sweep", fake_sweep)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--quick", "--quick_n_images", "60", "--no_progress", "--sweep.num_epochs", "3",
            "--sweep.architecture", "topk", "--naming.templates", "a photo of {}.", "--seed", "4"]
    with pytest.raises(RuntimeError, match="stop after"):
        demo.main(argv)
    sweep = got["cfg"]
    assert sweep.train.num_epochs == 3 and sweep.train.architecture == "topk"  # the overrides
    assert sweep.train.batch_size == demo.QUICK.quick_batch_size and len(sweep.lrs) == 1  # --quick's own
    assert sweep.train.seed == 4 and sweep.train.progress is False and sweep.out == str(out / "sweep")  # propagated
    assert sweep.train.shards == str(out / "shards") and sweep.selection.classifier.benchmark == "auto"
    # the recorded config is the whole nested one, as the stages run it
    rec = json.loads((out / demo.STATE).read_text())["config"]
    assert _keys(rec) == _keys(config_to_dict(demo.DemoConfig()))
    assert rec["sweep"]["train"]["num_epochs"] == 3 and rec["naming"]["templates"] == ["a photo of {}."]
    assert rec["naming"]["n_top"] == demo.QUICK.quick_n_top and rec["naming"]["sae"] == str(out / "sweep" / "best")
    assert config_from_dict(demo.DemoConfig, rec) == demo.effective(parse_config(demo.DemoConfig, argv))


def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_bad_vocab_file_and_an_older_demo_directory_are_refused_before_any_stage(tmp_path, capsys):
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), "--vocab", str(tmp_path / "missing.txt")]) == 2
    assert "no such word-list file" in capsys.readouterr().err and not out.exists()
    out.mkdir()  # a demo directory of the flat DemoConfig before the stage configs were nested
    (out / demo.STATE).write_text(json.dumps({"stages": {}, "config": {"out": str(out), "lrs": [0.002]}}))
    assert demo.main(["--out", str(out)]) == 2
    assert "older visae" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == [demo.STATE]


# ----------------------------------------------------------------------------- world2


def test_a_world_without_shipped_weights_and_an_unknown_world_are_refused_before_anything_is_written(
        tmp_path, capsys, monkeypatch):
    """A world whose toy CLIP ships no weights (world2's until they shipped) needs --pretrained; a weights file of
    the world's other architecture is refused by its metadata; a world's toy CLIP is refused on the other world."""
    from visae import toyclip

    monkeypatch.delitem(toyclip.SHIPPED_WEIGHTS, toyclip.WORLD2_MODEL)
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), "--world", "world2"]) == 2
    assert f"the model {toyclip.WORLD2_MODEL} has no shipped weights; pass --pretrained FILE" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.undo()
    # world2's model (4 registers) and the one before it (visae-toyclip2) are both world2's, not the first world's
    assert demo.main(["--out", str(out), "--world", "toy", "--model", "visae-toyclip2-reg4"]) == 2
    assert "toy CLIP of the 'world2' world" in capsys.readouterr().err and not out.exists()
    assert demo.main(["--out", str(out), "--world", "world2", "--model", "visae-toyclip2-reg4", "--pretrained",
                      str(toyclip.TOYCLIP2_WEIGHTS)]) == 2  # weights of the plain architecture: refused by metadata
    assert "not 'visae-toyclip2-reg4'" in capsys.readouterr().err and not out.exists()
    assert demo.main(["--out", str(out), "--world", "world2", "--model", "visae-toyclip2", "--pretrained",
                      str(toyclip.TOYCLIP2_REG4_WEIGHTS)]) == 2  # and the reverse
    assert "weights of 'visae-toyclip2-reg4'" in capsys.readouterr().err and not out.exists()
    assert demo.main(["--out", str(out), "--model", "visae-toyclip2-reg"]) == 2  # a typo: before the world stage
    assert "did you mean 'visae-toyclip2-reg4'" in capsys.readouterr().err and not out.exists()
    assert demo.main(["--out", str(out), "--world", "world3"]) == 2
    assert "expected one of ['toy', 'world2']" in capsys.readouterr().err and not out.exists()
    assert demo.main(["--out", str(out), "--distractors", str(tmp_path / "nope.txt")]) == 2
    assert "--distractors" in capsys.readouterr().err and not out.exists()


def test_world2_demo_runs_every_stage_on_its_own_world_benchmark_and_vocabulary(tmp_path, capsys):
    """The demo on world2 (weights: a random-initialised world2 model, so no signal is asserted): its world, the
    253-class family x shape selection benchmark, world2's words plus a distractors file, world2's factors."""
    from visae import toyclip, world2
    from visae.backbones import load_backbone

    weights = toyclip.export_fp16(load_backbone(WORLD2_MODEL, random_init=True).model, tmp_path / "w.safetensors",
                                  WORLD2_MODEL)
    (tmp_path / "d.txt").write_text("incurred\nwellbutrin\ncrimson\n")
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), "--world", "world2", "--pretrained", str(weights), "--quick",
                      "--quick_n_images", "200", "--no_progress", "--threads", "2", "--distractors",
                      str(tmp_path / "d.txt"), "--text_cache", str(tmp_path / "tc")]) == 0
    assert "img/s" not in capsys.readouterr().err  # --no_progress reaches every bar (browse's thumbnails too)
    assert json.loads((out / "world" / "world.json").read_text())["format"] == world2.FORMAT_NAME
    assert json.loads((out / "shards" / "manifest.json").read_text())["source"]["model"] == WORLD2_MODEL
    score = next((out / "sweep" / "trials").glob("*/zeroshot.json"))
    assert '"world2"' in score.read_text()
    words = (out / "vocab.txt").read_text().split("\n")
    assert {"crescent", "crimson", "checked", "incurred", "wellbutrin"} <= set(words) and words.count("crimson") == 1
    rec = json.loads((out / "recovery.json").read_text())
    assert set(rec["factors"]) <= set(world2.MAIN_FACTORS) and "colour_family" in rec["factors"]
    svr = rec["selection_vs_recovery"]
    assert svr["n_trials"] == 1 and svr["spearman_score"] is None and svr["selected_within_one"] is True
    assert not (out / demo.RECOVERY_PLOT).exists()  # one trial: nothing to plot


def test_selection_vs_recovery_is_spearman_of_the_leaderboard(tmp_path):
    from visae.sweepdir import SweepDir

    swd = SweepDir(tmp_path)
    rows = [("a", 1, 0.5, 10), ("b", 2, 0.4, 8), ("c", 3, 0.3, 9), ("d", 4, 0.2, 1)]  # trial, rank, score, recovery
    swd.leaderboard_csv.write_text("rank,trial,score\n" + "".join(f"{r},{t},{s}\n" for t, r, s, _ in rows))
    trials = {t: {"fraction_named_at": n / 20} for t, _, _, n in rows}
    svr = demo.selection_vs_recovery(swd, trials, "b", 20)
    # ranks of score 4 3 2 1, of recovery 4 2 3 1: rho = 1 - 6 * 2 / (4 * 15) = 0.8 (exact in binary to 1 ulp)
    assert svr["spearman_score"] == pytest.approx(0.8, rel=4 * 2.0 ** -52) and svr["spearman_rule"] == svr["spearman_score"]
    assert svr["recovery"] == {"a": 10, "b": 8, "c": 9, "d": 1} and svr["best_recovery"] == 10
    assert svr["selected_recovery"] == 8 and svr["selected_within_one"] is False
    flat = demo.selection_vs_recovery(swd, {t: {"fraction_named_at": 0.5} for t in trials}, "a", 20)
    assert flat["spearman_score"] is None and flat["selected_within_one"] is True  # constant recovery: undefined


def test_weights_that_cannot_serve_the_model_are_refused_before_anything_is_written(tmp_path, capsys):
    """A toy CLIP's weights are checked before the world is generated (a full world2 world takes minutes): a
    weights file of the other toy architecture (the shipped v1 file for world2), a file that does not exist, a file
    that is not safetensors (the model card)."""
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), "--world", "world2", "--pretrained", str(TOYCLIP_WEIGHTS)]) == 2
    err = capsys.readouterr().err
    assert "--pretrained" in err and "'visae-toyclip'" in err and f"not '{WORLD2_MODEL}'" in err and not out.exists()
    assert demo.main(["--out", str(out), "--world", "world2", "--pretrained", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors: no such weights file" in capsys.readouterr().err and not out.exists()
    # the card beside the weights is not the weights: one line, before the world stage (it crashed in torch.load)
    card = SHIPPED_WEIGHTS[WORLD2_MODEL].with_suffix(".json")
    assert demo.main(["--out", str(out), "--world", "world2", "--pretrained", str(card)]) == 2
    err = capsys.readouterr().err
    assert "not a .safetensors file" in err and len(err.strip().splitlines()) == 1 and not out.exists(), err


def test_an_unreadable_word_list_is_refused_before_anything_is_written(tmp_path, capsys):
    """A --distractors / --vocab file that exists but holds no usable word (empty, not UTF-8) failed only at the
    naming stage, after the world, the extraction and the whole sweep."""
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for flag, name, why in (("--distractors", "empty.txt", "empty after filtering"),
                            ("--distractors", "latin1.txt", "not UTF-8"), ("--vocab", "empty.txt", "empty after filtering")):
        assert demo.main(["--out", str(out), flag, str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {tmp_path / name}" in err and why in err and not out.exists(), err


def test_selection_vs_recovery_plot_marks_the_selected_trial_and_needs_two_trials(tmp_path):
    svr = {"n_values": 20, "score": {"a": 0.5, "b": 0.4, "c": 0.3}, "recovery": {"a": 10, "b": 8, "c": 9},
           "spearman_score": 0.5, "selected_recovery": 10, "best_recovery": 10}
    path = tmp_path / "p.png"
    assert demo.plot_selection_vs_recovery(svr, "a", path, "zeroshot_top1") and path.read_bytes()[:4] == b"\x89PNG"
    one = dict(svr, score={"a": 0.5})
    assert not demo.plot_selection_vs_recovery(one, "a", path) and not path.exists()  # a stale plot is removed


def test_selection_vs_recovery_leaves_a_nan_score_out_of_the_score_correlation(tmp_path):
    """A diverged trial scores nan on the leaderboard: the score's Spearman is over the finite scores (it was NaN,
    written as NaN into recovery.json, not JSON), the rule's order keeps it (ranked last)."""
    from visae.sweepdir import SweepDir

    swd = SweepDir(tmp_path)
    rows = [("a", 1, "0.5", 10), ("b", 2, "0.4", 8), ("c", 3, "0.3", 9), ("d", 4, "nan", 1)]
    swd.leaderboard_csv.write_text("rank,trial,score\n" + "".join(f"{r},{t},{s}\n" for t, r, s, _ in rows))
    svr = demo.selection_vs_recovery(swd, {t: {"fraction_named_at": n / 20} for t, _, _, n in rows}, "a", 20)
    json.dumps(svr, allow_nan=False)
    # a, b, c: score ranks 3 2 1, recovery ranks 3 1 2: rho = 1 - 6 * 2 / (3 * 8) = 0.5; all four by rank: 0.8
    assert svr["spearman_score"] == pytest.approx(0.5, rel=4 * 2.0 ** -52) and set(svr["score"]) == {"a", "b", "c"}
    assert svr["spearman_rule"] == pytest.approx(0.8, rel=4 * 2.0 ** -52) and svr["n_trials"] == 4


def test_threads_set_the_world_generations_worker_processes(tmp_path, monkeypatch):
    """--threads reaches the world stage as its number of worker processes (the world2 demo's world was one
    process: 30 of its 126 s); generate_world2 writes the same bytes with any number (tests/test_world2.py)."""
    seen = []

    def generate(out, n, seed, progress, workers):
        seen.append((n, seed, workers))
        raise WorldError("stopped after the world stage's call")  # a stage's own error: exit 2

    monkeypatch.setitem(demo.WORLDS, "world2", dataclasses.replace(demo.WORLDS["world2"], generate=generate))
    assert demo.main(["--out", str(tmp_path / "out"), "--threads", "2", "--no_progress", "--n_images", "40"]) == 2
    assert seen == [(40, 5000, 2)]


def test_a_toy_clip_on_the_other_toy_world_is_refused_before_anything_is_written(tmp_path, capsys):
    """--world world2 --model visae-toyclip ran every stage and reported zero-shot 0.000 (the first world's CLIP
    knows none of world2's class names); the error names both models and the one the world wants. Any other
    model stays allowed."""
    out = tmp_path / "out"
    for argv, model, world, want in ((["--world", "world2", "--model", "visae-toyclip"], "visae-toyclip", "world2",
                                      "visae-toyclip2-reg4"),
                                     (["--world", "toy", "--model", "visae-toyclip2"], "visae-toyclip2", "toy",
                                      "visae-toyclip"),
                                     (["--model", "visae-toyclip"], "visae-toyclip", "world2", "visae-toyclip2-reg4")):
        assert demo.main(["--out", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert f"DemoConfig.model = '{model}' is the toy CLIP of" in err and f"--world {world}" in err, err
        assert f"wants '{want}'" in err and not out.exists(), err
    cfg = demo.DemoConfig(world="world2", model="ViT-B-32", pretrained="openai")
    assert demo.effective(cfg).model == "ViT-B-32" and demo.effective(cfg).pretrained == "openai"
    assert demo.effective(demo.DemoConfig(world="world2")).model == "visae-toyclip2-reg4"


@pytest.mark.parametrize("flags,field", [
    (["--n_distractors", "-1"], "DemoConfig.n_distractors = -1"), (["--threads", "-2"], "DemoConfig.threads = -2"),
    (["--n_images", "0"], "DemoConfig.n_images = 0"), (["--quick_n_top", "-1"], "DemoConfig.quick_n_top = -1"),
    (["--seed", "-1"], "DemoConfig.seed = -1"), (["--world_seed_offset", "-5001"], "DemoConfig.seed + world_seed_offset"),
    (["--naming.top_k", "0"], "NameConfig.top_k = 0"),
    (["--naming.n_top", "-1"], "NameConfig.n_top = -1"), (["--naming.n_random", "-3"], "NameConfig.n_random = -3"),
    (["--naming.text_batch_size", "0"], "NameConfig.text_batch_size = 0"),
    (["--n_select_images", "-1"], "DemoConfig.n_select_images = -1"),
    (["--select_seed_offset", "-9001"], "DemoConfig.seed + select_seed_offset"),
    (["--select_seed_offset", "0"], "world seed 0 is the one the toy CLIPs were trained on"),
    (["--select_seed_offset", "5000"], "the selection world would be the SAEs' training world"),
    (["--sweep.rule", "best"], "max_drop (2) applies only with rule sparsest_within")])
def test_a_count_out_of_range_is_refused_at_flag_time_naming_the_field(tmp_path, capsys, flags, field):
    """A negative n_distractors became 0 distractors, a negative --threads torch's default, --naming.top_k 0 one
    candidate, a negative n_top / n_random none: each is now a usage error naming the field, before any write."""
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert field in err and "expected" in err and not out.exists(), err


def test_the_selection_world_and_rule_as_the_demo_resolves_them(tmp_path, monkeypatch):
    """The demo scores its sweep on a selection world of its own (<out>/select_shards, n_select_images scenes of seed
    + select_seed_offset) and selects by rule sparsest_within at DEMO_MAX_DROP; n_select_images 0 falls back to the
    held-out split; --quick selects its one SAE by rule best unless the rule or its tolerance was changed and keeps
    sizes given with it; a relative
    --out with the demo's own value written in a YAML file (a recorded config) loads back."""
    from visae.config import parse_config

    def eff(*argv):
        return demo.effective(parse_config(demo.DemoConfig, ["--out", "rel_out", *argv], default_yaml=demo.DEFAULT_YAML))

    monkeypatch.chdir(tmp_path)
    sel = eff().sweep.selection
    assert sel.val_shards == str(tmp_path / "rel_out" / "select_shards") and sel.rule == "sparsest_within"
    assert sel.max_drop == demo.DEMO_MAX_DROP == 2.0
    assert eff("--n_select_images", "0").sweep.selection.val_shards == ""
    from visae.config import ConfigError

    with pytest.raises(ConfigError, match=r"--n_images 4 with --sweep.val_fraction 0.1 holds out no image to select"):
        demo.run_demo(eff("--quick", "--n_images", "4"))  # refused before anything is written
    assert not (tmp_path / "rel_out").exists()
    warn = demo._selection_warnings(eff("--n_select_images", "0"))  # the 10k-calibrated tolerance on 1,000 rows
    assert len(warn) == 1 and "about 1,000 images" in warn[0] and "3.2x" in warn[0]
    assert demo._selection_warnings(eff()) == demo._selection_warnings(eff("--quick")) == []
    assert demo._selection_warnings(eff("--n_select_images", "0", "--sweep.max_drop", "5")) == []
    q = eff("--quick")
    assert (q.n_select_images, q.sweep.selection.val_shards, q.sweep.selection.rule) == (0, "", "best")
    assert q.sweep.selection.max_drop is None and q.n_images == demo.QUICK.quick_n_images
    # its warm-ups end within its 20 epochs of ceil(900 / 32) = 29 steps: lambda by step 290, the lr by step 58
    assert (q.sweep.train.l1_warmup_steps, q.sweep.train.lr_warmup_steps) == (290, 58)
    assert eff("--quick", "--sweep.l1_warmup_steps", "700").sweep.train.l1_warmup_steps == 700  # a set one is kept
    q = eff("--quick", "--n_images", "3000", "--n_select_images", "2000")  # sizes given with --quick are kept
    assert (q.n_images, q.n_select_images) == (3000, 2000)
    assert q.sweep.selection.val_shards == str(tmp_path / "rel_out" / "select_shards")
    q = eff("--quick", "--quick_n_select_images", "50", "--sweep.max_drop", "3")  # a changed tolerance is kept
    assert (q.n_select_images, q.sweep.selection.rule, q.sweep.selection.max_drop) == (50, "sparsest_within", 3.0)
    assert q.sweep.selection.val_shards == str(tmp_path / "rel_out" / "select_shards")
    assert eff("--sweep.rule", "best", "--sweep.max_drop", "None").sweep.selection.rule == "best"
    y = tmp_path / "rec.yaml"
    y.write_text("out: rel_out\nsweep:\n  selection:\n    val_shards: rel_out/select_shards\n")
    cfg = demo.effective(parse_config(demo.DemoConfig, ["--config", str(y)], default_yaml=demo.DEFAULT_YAML))
    assert cfg.sweep.selection.val_shards == str(tmp_path / "rel_out" / "select_shards")


def test_stage_configs_refuse_counts_out_of_range():
    import torch

    from visae.config import ConfigError
    from visae.naming import NameConfig, NamingError, match_names
    from visae.recovery import RecoveryConfig
    from visae.zeroshot import ZeroShotConfig

    for kw in ({"vocab_size": -1}, {"batch_size": 0}, {"member": -1}, {"top_k": -1}):
        with pytest.raises(ConfigError, match=f"NameConfig.{next(iter(kw))} = "):
            NameConfig(sae="x", **kw)
    for kw, msg in (({"recovered_at": 1.5}, "recovered_at"), ({"batch_size": 0}, "batch_size"), ({"member": -1}, "member")):
        with pytest.raises(ConfigError, match=f"RecoveryConfig.*{msg}"):
            RecoveryConfig(sae="x", shards="y", **kw)
    for kw in ({"batch_size": -1}, {"image_batch_size": 0}):
        with pytest.raises(ConfigError, match=f"ZeroShotConfig.{next(iter(kw))} = "):
            ZeroShotConfig(shards="x", **kw)
    with pytest.raises(NamingError, match="top_k = 0"):  # it kept one candidate
        match_names(torch.eye(3), torch.eye(3), ["a", "b", "c"], top_k=0)


def test_file_arguments_are_recorded_as_absolute_paths_and_keywords_as_typed(tmp_path, monkeypatch, capsys):
    """A relative --distractors / --vocab / --pretrained file was recorded as typed: the record did not say which
    file was used once read from another directory. Recorded now resolved; `wordfreq` stays a keyword (a file of
    that name in the directory is not read); a rerun with the same file named either way is the same demo, and a
    record of an older visae (relative paths) is accepted from its directory."""
    import shutil

    def generate(out, n, seed, progress, workers):
        raise WorldError("stopped at the world stage")  # a stage's own error: exit 2

    monkeypatch.setitem(demo.WORLDS, "world2", dataclasses.replace(demo.WORLDS["world2"], generate=generate))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.txt").write_text("crimson\nincurred\n")
    (tmp_path / "v.txt").write_text("red\ncircle\n")
    (tmp_path / "wordfreq").write_text("not read\n")
    shutil.copy(SHIPPED_WEIGHTS[WORLD2_MODEL], tmp_path / "w.safetensors")  # the default world's toy CLIP

    def recorded(out):
        return json.loads((tmp_path / out / demo.STATE).read_text())["config"]

    assert demo.main(["--out", "a", "--distractors", "d.txt", "--pretrained", "./w.safetensors", "--no_progress"]) == 2
    assert "stopped at the world stage" in capsys.readouterr().err
    rec = recorded("a")
    assert rec["distractors"] == str((tmp_path / "d.txt").resolve()) and rec["vocab"] == "toy"
    assert rec["pretrained"] == str((tmp_path / "w.safetensors").resolve())
    assert rec["out"] == str(tmp_path / "a") and rec["naming"]["vocab"] == str(tmp_path / "a" / "vocab.txt")
    (tmp_path / "classes.txt").write_text("red circle\n")
    assert demo.main(["--out", "b", "--vocab", "v.txt", "--no_progress", "--sweep.benchmark", "files",
                      "--sweep.classnames_file", "classes.txt", "--sweep.label_column", "label"]) == 2
    rec = recorded("b")
    assert rec["sweep"]["selection"]["classifier"]["classnames_file"] == str((tmp_path / "classes.txt").resolve())
    assert rec["sweep"]["selection"]["classifier"]["templates_file"] is None and rec["sweep"]["train"]["init_from"] == ""
    assert rec["vocab"] == rec["naming"]["vocab"] == str((tmp_path / "v.txt").resolve())
    assert rec["distractors"] == "wordfreq" and rec["pretrained"] is None
    # the same demo named by its absolute paths from another directory: the same settings, not refused
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert demo.main(["--out", str(tmp_path / "a"), "--distractors", str(tmp_path / "d.txt"), "--pretrained",
                      str(tmp_path / "w.safetensors"), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "stopped at the world stage" in err and "other settings" not in err, err
    # a record with the paths as typed (an older visae), rerun from its directory
    monkeypatch.chdir(tmp_path)
    st = json.loads((tmp_path / "b" / demo.STATE).read_text())
    st["config"]["vocab"] = st["config"]["naming"]["vocab"] = "v.txt"
    st["config"]["sweep"]["selection"]["classifier"]["classnames_file"] = "classes.txt"
    (tmp_path / "b" / demo.STATE).write_text(json.dumps(st))
    assert demo.main(["--out", "b", "--vocab", "v.txt", "--no_progress", "--sweep.benchmark", "files",
                      "--sweep.classnames_file", "classes.txt", "--sweep.label_column", "label"]) == 2
    err = capsys.readouterr().err
    assert "stopped at the world stage" in err and "other settings" not in err, err


def test_demo_rerun_retrains_a_trial_whose_weights_were_damaged(quick_demo, capsys):
    """A finished demo whose selected trial's weights were truncated, then deleted: the rerun says so, trains the
    trial again (the damaged directory set aside, not deleted) and names, browses and scores the retrained SAE; it
    used to skip the sweep and fail in recovery, or report success without the trial. (Last in this module: it
    retrains the shared demo's trial.)"""
    out, argv = quick_demo
    trials = out / "sweep" / "trials"
    (t,) = [p for p in trials.iterdir() if not p.name.startswith(".")]
    w = t / "weights.safetensors"
    size = w.stat().st_size
    with open(w, "r+b") as f:
        f.truncate(size // 2)
    assert demo.main(argv) == 0
    err = capsys.readouterr().err
    assert f"sweep: the finished sweep was damaged since ({w} is {size // 2} bytes" in err
    assert "sweep: done before" not in err and "name: done before" not in err and "recovery: done before" not in err
    assert w.stat().st_size == size and (trials / f".damaged-{t.name}" / "weights.safetensors").stat().st_size == size // 2
    rec = json.loads((out / "recovery.json").read_text())
    assert rec["selection_vs_recovery"]["n_trials"] == 1 and rec["selected_trial"] == t.name  # the retrained trial
    w.unlink()
    assert demo.main(argv) == 0
    assert f"({w} is missing)" in capsys.readouterr().err and w.stat().st_size == size
    best = out / "sweep" / "best" / "weights.safetensors"  # the selected SAE's copy, read by the later stages
    best.write_bytes(best.read_bytes()[:100])
    assert demo.main(argv) == 0
    assert f"({best} is 100 bytes" in capsys.readouterr().err and best.stat().st_size == size
    data = bytearray(best.read_bytes())  # one byte flipped, the size kept: best/ is checked in full
    data[-1] ^= 1
    best.write_bytes(bytes(data))
    assert demo.main(argv) == 0
    assert f"({best} has another SHA-256 than its cfg.json recorded" in capsys.readouterr().err
    (t / "cfg.json").unlink()  # a trial whose cfg.json went missing is damaged too
    assert demo.main(argv) == 0
    assert f"({t / 'cfg.json'} is missing)" in capsys.readouterr().err and (t / "cfg.json").is_file()
    assert demo.main(argv) == 0
    err = capsys.readouterr().err
    assert all(f"{s}: done before" in err for s in demo.STAGES)
