import pytest

from visae import cli


def test_usage_lists_every_subcommand(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out


def test_unknown_subcommand_is_an_error(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_every_subcommand_has_main_and_help(name, capsys):
    assert callable(cli.entry_point(name)), f"{cli.SUBCOMMANDS[name][0]} is not a function"
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert "--" in capsys.readouterr().out


# ----------------------------------------------------------------------------- usage errors (visae sweep)

import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import typing  # noqa: E402
from pathlib import Path  # noqa: E402

from visae.sweep import SET_BY_SWEEP, SweepConfig  # noqa: E402

# Free-form strings (a directory to create, a name, a cache path, a tag) have no value that is a typo;
# for them the typo is a flag left without its value.
_FREE = {"out", "wandb_project", "wandb_name", "label_column", "text_cache", "pretrained"}
# Values that name something that does not exist (checked before anything is written)
_MISSING = {"shards": "/nonexistent/shards", "val_shards": "/nonexistent/val", "classnames_file": "/nonexistent/c.txt",
            "templates_file": "/nonexistent/t.txt", "device": "cpuu", "model": "ViT-B-32x", "benchmark": "toyy",
            "architecture": "reluu"}
_ZEROSHOT = {"model", "benchmark"}  # only read (and checked) when selecting by zero-shot accuracy


def _leaf_fields(cls, fixed=()):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in fixed:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, f.metadata.get("fixed", ()))
        else:
            yield f.name, tp


SWEEP_FIELDS = dict(_leaf_fields(SweepConfig))


def _typo(name, tp):
    """argv that gets field ``name`` wrong."""
    if name in _FREE:
        return [f"--{name}"]
    if name in _MISSING:
        return [f"--{name}", _MISSING[name]] + (["--metric", "zeroshot_top1"] if name in _ZEROSHOT else [])
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if typing.get_origin(tp) is typing.Union else tp
    if base is bool:
        return [f"--{name}", "maybe"]
    if typing.get_origin(base) is typing.Literal:
        return [f"--{name}", f"{typing.get_args(base)[0]}x"]
    if typing.get_origin(base) is tuple:
        return [f"--{name}", "2", "x"]
    if base in (int, float):
        return [f"--{name}", "3x"]
    raise AssertionError(f"no typo defined for field {name} of type {tp}: add it to _FREE or _MISSING")


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    from visae.synthetic import make_planted_dictionary, write_planted_shards

    d = tmp_path_factory.mktemp("cli_shards") / "s"
    write_planted_shards(d, n=512, dictionary=make_planted_dictionary(d=8, n_atoms=16, seed=0), shard_size=256, seed=0)
    return d


def _sweep_argv(shards, out):
    return ["--shards", str(shards), "--out", str(out), "--lrs", "1e-3", "--l1_coeffs", "1e-4",
            "--expansion_factors", "2", "--num_epochs", "1", "--batch_size", "128", "--lr_warmup_steps", "2",
            "--l1_warmup_steps", "2", "--device", "cpu", "--no_progress", "--no_plot", "--metric",
            "explained_variance"]


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _run_sweep(argv, capsys):
    from visae.sweep import main

    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr()


def test_every_sweep_field_has_a_flag():
    """Every sweep setting is reachable from the command line (the trainer's too), except those the sweep sets."""
    assert {"num_epochs", "architecture", "shards", "metric", "max_l0", "lrs", "select"} <= set(SWEEP_FIELDS)
    assert not set(SET_BY_SWEEP) & set(SWEEP_FIELDS) - {"out"}


@pytest.mark.parametrize("name", sorted(SWEEP_FIELDS))
def test_a_typo_in_any_sweep_field_exits_2_with_one_line_and_writes_nothing(name, small_shards, tmp_path, capsys):
    out = tmp_path / "sw"
    before = _tree_hash(tmp_path)
    rc, cap = _run_sweep(_sweep_argv(small_shards, out) + _typo(name, SWEEP_FIELDS[name]), capsys)
    lines = cap.err.strip().splitlines()
    assert rc == 2, cap.err
    assert len(lines) == 1 and lines[0].startswith("visae sweep: error: "), cap.err
    assert _tree_hash(tmp_path) == before and not out.exists()
    # the corrected command (without the typo) passes every check that precedes writing; that such a command
    # then runs to the end is the next test (one real sweep, not one per field)
    from visae.config import parse_config
    from visae.sweep import check_sweep

    check_sweep(parse_config(SweepConfig, _sweep_argv(small_shards, out)))
    assert not out.exists()


def test_a_sweep_typo_then_the_corrected_command_runs(small_shards, tmp_path, capsys):
    out = tmp_path / "sw"
    argv = _sweep_argv(small_shards, out)
    rc, cap = _run_sweep(argv + ["--architecture", "reluu"], capsys)
    assert rc == 2 and "architecture" in cap.err and "relu" in cap.err and len(cap.err.strip().splitlines()) == 1
    assert not out.exists()
    rc, cap = _run_sweep(argv + ["--architecture", "relu"], capsys)
    assert rc == 0, cap.err
    assert cap.out.strip() == str(out) and (out / "selection.json").is_file()
    assert "1 of 1 planned trials finished" in cap.err and "chosen:" in cap.err  # the summary


def test_bare_boolean_flags_and_bad_values(small_shards, tmp_path, capsys):
    from visae.config import parse_config

    cfg = parse_config(SweepConfig, ["--shards", "s", "--no_select", "--keep_checkpoint", "--bf16", "--no_progress"])
    assert (cfg.select, cfg.train.keep_checkpoint, cfg.train.bf16, cfg.train.progress) == (False, True, True, False)
    assert parse_config(SweepConfig, ["--shards", "s", "--max_l0", "3", "--max_l0", "None"]).selection.max_l0 is None
    for bad, words in ((["--num_epochs", "0"], ["num_epochs", "positive"]), (["--lrs"], ["lrs", "empty"]),
                       (["--metric", "top1"], ["--metric", "zeroshot_top1"]), (["--num_ep", "3"], ["--num_ep"]),
                       (["--lr", "1e-3"], ["--lr"]), ([], ["--shards"])):
        rc, cap = _run_sweep((["--shards", str(small_shards)] if bad else []) + ["--out", str(tmp_path / "o")] + bad,
                             capsys)
        lines = cap.err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, (bad, cap.err)
        assert all(w in lines[0] for w in words), (bad, lines[0])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_every_subcommand_takes_the_runtime_options(name, capsys):
    """--config, --threads (default: all cores) and --verbose on every command; bare booleans shown with --no_."""
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--config", "--threads", "--verbose, --no_verbose"):
        assert flag in out, f"visae {name} --help does not list {flag}"
    assert "true}" not in out  # no {true,false} valued booleans left


def test_train_ends_with_a_summary(tmp_path, capsys):
    from visae.train import main

    out = tmp_path / "sae"
    rc = main(["--synthetic", "--synthetic_examples", "1024", "--synthetic_d", "8", "--synthetic_atoms", "16",
               "--num_epochs", "2", "--batch_size", "128", "--lr_warmup_steps", "2", "--l1_warmup_steps", "2",
               "--expansion_factor", "2", "--out", str(out), "--no_progress", "--no_plot", "--threads", "1"])
    cap = capsys.readouterr()
    assert rc == 0 and cap.out.strip() == str(out)
    assert "trained relu SAE 8 -> 16 latents" in cap.err and "finished" in cap.err
    assert "held-out EV" in cap.err and "L0" in cap.err and "dead" in cap.err and f"SAE: {out}" in cap.err


@pytest.mark.parametrize("error, hint", [
    (FileNotFoundError("init: weights /x/w.safetensors not found"), "check the path"),
    (OSError(28, "No space left on device", "/x/shard_00001.acts.npy"), "free space"),
])
def test_an_os_error_is_one_line_with_a_hint_that_fits_it(error, hint, capsys):
    """A missing path is not told to free disk space; a full disk is (cli.run_main, exit status 1, no traceback)."""
    def fail(argv):
        raise error

    assert cli.run_main("visae x", fail, []) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("visae x: error: ") and hint in err
    assert ("free space" in err) == (hint == "free space")


def test_a_visae_warning_is_one_line_naming_the_command():
    """A UserWarning raised in visae's code printed as Python formats it (file, line number, the source line); on the
    command line it is one line under the command's name, and other packages' warnings keep Python's format. (In a
    child process: pytest records warnings instead of printing them.)"""
    import subprocess
    import sys

    code = """if True:
        import sys, warnings
        from visae.cli import run_main
        from visae.train import data

        def fn(argv):
            warnings.warn_explicit("the lr warm-up\\nwill not complete", UserWarning, data.__file__, 10)
            warnings.warn_explicit("elsewhere", UserWarning, "/home/u/visae/.venv/site-packages/torch/mod.py", 3)
            warnings.warn_explicit("no spread", RuntimeWarning, data.__file__, 20)
            return 0

        rc = run_main("visae train", fn, [])
        assert warnings.formatwarning.__name__ == "formatwarning", warnings.formatwarning  # restored
        sys.exit(rc)
    """
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "visae train: warning: the lr warm-up; will not complete\n" in p.stderr, p.stderr  # one_line joins lines
    assert "torch/mod.py:3: UserWarning: elsewhere" in p.stderr, p.stderr  # another package, under a visae checkout
    assert "visae train: warning: no spread\n" in p.stderr, p.stderr


# the same fault, the same exit status in every command (visae.errors): an --sae that is not an SAE directory
_SAE_COMMANDS = {
    "name": ["--out", "{o}"],
    "zeroshot": ["--label_column", "label"],
    "browse": ["--out", "{o}"],
    "cbm": ["--concepts", "{o}", "--label_column", "label", "--out", "{o}"],
    "recovery": [],
    "patch-recovery": [],
}


@pytest.mark.parametrize("name", sorted(_SAE_COMMANDS))
@pytest.mark.parametrize("sae", ["missing", "empty"])
def test_a_bad_sae_is_exit_2_and_one_line_in_every_command(name, sae, small_shards, tmp_path, capsys):
    d = tmp_path / sae
    if sae == "empty":
        d.mkdir()
    extra = [a.format(o=tmp_path / "o") for a in _SAE_COMMANDS[name]]
    shard_flags = (["--train_shards", str(small_shards), "--val_shards", str(small_shards)] if name == "cbm"
                   else ["--shards", str(small_shards)])
    rc = cli.main([name, "--sae", str(d), *shard_flags, *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"visae {name}: error: ") and str(d) in err, err
    assert not (tmp_path / "o").exists()


# --device: its spelling checked when the flags are parsed, its availability before the stage writes (visae.devices)
_DEVICE_COMMANDS = {
    "name": ["--sae", "{d}/sae", "--out", "{d}/o"],
    "extract": ["--model", "visae-tiny-test", "--random_init", "--images", "{d}", "--out", "{d}/o"],
    "train": ["--shards", "{s}", "--out", "{d}/o"],
    "sweep": ["--shards", "{s}", "--out", "{d}/o"],
    "zeroshot": ["--sae", "{d}/sae", "--shards", "{s}", "--label_column", "label"],
    "cbm": ["--sae", "{d}/sae", "--concepts", "{d}/c", "--train_shards", "{s}", "--val_shards", "{s}",
            "--label_column", "label", "--out", "{d}/o"],
    "select": ["--sweep", "{d}/sw"],
    "recovery": ["--sae", "{d}/sae", "--shards", "{s}"],
    "demo": ["--out", "{d}/o"],
}


@pytest.mark.parametrize("name", sorted(_DEVICE_COMMANDS))
@pytest.mark.parametrize("device", ["banana", "cuda:7"])
def test_a_device_that_is_not_one_or_not_here_is_exit_2_before_anything_is_written(name, device, small_shards,
                                                                                    tmp_path, capsys):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    flag = {"demo": "--sweep.device"}.get(name, "--device")
    argv = [a.format(d=tmp_path, s=small_shards) for a in _DEVICE_COMMANDS[name]]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc = cli.main([name, *argv, flag, device])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and f"{device}" in err and "Traceback" not in err, err
    assert ("not a torch device" in err) == (device == "banana"), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("name,argv", [("name", ["--sae", "s"]), ("extract", ["--images", "i"]),
                                       ("train", ["--shards", "s"]), ("browse", ["--sae", "s"]), ("demo", []),
                                       ("sweep", ["--shards", "s"]), ("toyworld", [])])
@pytest.mark.parametrize("out", ["", "  "])
def test_an_empty_out_is_a_usage_error_not_the_current_directory(name, argv, out, tmp_path, monkeypatch, capsys):
    """--out "" was Path("."): visae extract and visae name wrote their files into the working directory."""
    monkeypatch.chdir(tmp_path)
    assert cli.main([name, *argv, "--out", out]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--out is empty" in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name, module, fn", [("name", "visae.naming", "name_concepts"),
                                              ("zeroshot", "visae.zeroshot", "zeroshot"),
                                              ("cbm", "visae.cbm", "train_cbm"),
                                              ("recovery", "visae.recovery", "concept_recovery")])
def test_device_auto_is_resolved_before_the_stage_runs(name, module, fn, small_shards, tmp_path, capsys, monkeypatch):
    """--device auto passed the check but reached torch as the string 'auto' (RuntimeError traceback): each command
    hands its stage the device 'auto' means here (cpu on this machine, cuda on a GPU one)."""
    import importlib

    import torch

    from visae.config import ConfigError

    seen = []

    def stage(*a, **k):
        seen.append(k.get("device", getattr(a[0], "device", None)))
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(importlib.import_module(module), fn, stage)
    argv = [a.format(d=tmp_path, s=small_shards) for a in _DEVICE_COMMANDS[name]]
    assert cli.main([name, *argv, "--device", "auto"]) == 2
    assert "stopped by the test" in capsys.readouterr().err
    assert seen == ["cuda:0" if torch.cuda.is_available() else "cpu"]


def test_train_device_auto_leaves_the_gpu_to_the_rank(monkeypatch):
    """'auto' on a CUDA machine is 'cuda' without an index, which visae.train.dist.DataParallel turns into the rank's
    own GPU; resolved to cuda:0 every rank of a torchrun landed on GPU 0."""
    import torch

    from visae.devices import resolve_device
    from visae.train.data import resolve_device as train_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert train_device("auto") == torch.device("cuda") and train_device("auto").index is None
    assert train_device("cuda:3") == torch.device("cuda", 3)
    assert resolve_device("auto", local_rank=5) == torch.device("cuda", 5)  # extraction: the rank's GPU itself


@pytest.mark.parametrize("argv, damaged", [
    (["toyworld", "--n", "4", "--out", "{d}"], "world.json"),
    (["demo", "--quick", "--out", "{d}"], "demo_state.json"),
])
def test_a_damaged_record_in_out_is_one_line_exit_2(argv, damaged, tmp_path, capsys, monkeypatch):
    """A world.json / demo_state.json that is not JSON was a JSONDecodeError traceback (the mains caught any
    ValueError before; now only project errors)."""
    monkeypatch.delenv("VISAE_TRACEBACK", raising=False)
    d = tmp_path / "out"
    d.mkdir()
    (d / damaged).write_text('{"seed": 1,')
    assert cli.main([a.format(d=d) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{d / damaged} is damaged" in err, err


def test_a_missing_class_names_file_is_a_bad_input(small_shards, tmp_path, capsys):
    """--classnames_file that does not exist: exit 2 naming the flag (it was the machine's OSError branch, exit 1)."""
    rc = cli.main(["zeroshot", "--shards", str(small_shards), "--benchmark", "files", "--classnames_file",
                   str(tmp_path / "nope.txt"), "--label_column", "label"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--classnames_file {tmp_path / 'nope.txt'}" in err, err


def test_zeroshot_out_that_is_a_directory_is_refused_before_the_evaluation(small_shards, tmp_path, capsys):
    """It ended, after the whole evaluation, with the machine's "Is a directory" (exit 1, the flag unnamed)."""
    assert cli.main(["zeroshot", "--shards", str(small_shards), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a directory" in capsys.readouterr().err
