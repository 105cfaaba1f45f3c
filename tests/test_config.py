import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from conftest import REPO
from visae.config import ConfigError, Runtime, config_to_dict, dump_yaml_config, load_yaml_config, parse_config


@dataclass(frozen=True)
class Toy:
    """A toy config."""

    num_epochs: int = field(default=200, metadata={"help": "passes over the data"})
    lr: float = 5e-4
    name: str = "run"
    bf16: bool = False
    arch: Literal["relu", "topk"] = "relu"
    lrs: tuple[float, ...] = (1e-4, 5e-4)
    limit: Optional[int] = None


@dataclass(frozen=True)
class Inner:
    """A nested config."""

    depth: int = 2
    out: str = field(default="inner", metadata={"help": "set by the parent"})
    tags: tuple[str, ...] = ("a",)


@dataclass(frozen=True)
class Outer:
    """A config with a nested one."""

    out: str = field(default="runs/x", metadata={"help": "the parent's output"})
    data: str = field(default="", metadata={"help": "input", "required": True})
    inner: Inner = field(default_factory=lambda: Inner(depth=3), metadata={"fixed": ("out",)})

    def __post_init__(self) -> None:
        if self.inner.depth < 0:
            raise ConfigError(f"Outer.inner.depth must be >= 0, got {self.inner.depth}")


def _usage_error(capsys, cls, argv):
    """parse_config must raise a one-line ConfigError (a usage error: exit status 2) and print nothing; returns it."""
    with pytest.raises(ConfigError) as e:
        parse_config(cls, argv, prog="visae toy")
    captured = capsys.readouterr()
    assert e.value.exit_code == 2 and not captured.err and not captured.out, captured
    line = str(e.value)
    assert line and "\n" not in line, line
    return line


def test_defaults_yaml_and_flags_in_order(tmp_path):
    assert parse_config(Toy, []) == Toy()
    y = tmp_path / "c.yaml"
    y.write_text("num_epochs: 3\nlr: 1.0e-3\nbf16: true\n")
    cfg = parse_config(Toy, ["--config", str(y), "--num_epochs", "7", "--lrs", "1", "2", "3"])
    assert cfg == Toy(num_epochs=7, lr=1e-3, bf16=True, lrs=(1.0, 2.0, 3.0))
    assert parse_config(Toy, [], default_yaml=y).num_epochs == 3
    assert parse_config(Toy, ["--config", str(y), "--no_bf16"], default_yaml=tmp_path / "absent.yaml").bf16 is False
    assert parse_config(Toy, ["--limit", "5"]).limit == 5
    assert parse_config(Toy, ["--num-epochs", "4"]).num_epochs == 4  # the hyphen spelling is the same flag
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1  # type: ignore[misc]


def test_bare_booleans_null_and_empty_lists(tmp_path):
    assert parse_config(Toy, ["--bf16"]).bf16 is True
    assert parse_config(Toy, ["--bf16", "--no_bf16"]).bf16 is False
    assert parse_config(Toy, ["--no-bf16"]).bf16 is False
    y = tmp_path / "c.yaml"
    y.write_text("limit: 9\nlrs: [1.0]\n")
    cfg = parse_config(Toy, ["--config", str(y), "--limit", "None", "--lrs"])
    assert cfg.limit is None and cfg.lrs == ()
    assert parse_config(Toy, ["--config", str(y), "--limit", "null"]).limit is None  # YAML's spelling too
    assert parse_config(Toy, ["--name", "null"]).name == "null"  # not an optional field: a string like any other


def test_usage_errors_are_one_line_with_exit_2(tmp_path, capsys):
    line = _usage_error(capsys, Toy, ["--arch", "nope"])
    assert "--arch" in line and "relu" in line and "topk" in line
    line = _usage_error(capsys, Toy, ["--num_ep", "3"])  # no silent abbreviation
    assert "--num_ep" in line and "--num_epochs" in line
    line = _usage_error(capsys, Toy, ["--num_epochs", "many"])
    assert "--num_epochs" in line and "many" in line
    line = _usage_error(capsys, Toy, ["--bf16", "true"])  # booleans take no value
    assert "--no_name" in line
    line = _usage_error(capsys, Outer, ["--data", "d", "--depth", "-1"])  # the config's own check
    assert "depth must be >= 0" in line
    line = _usage_error(capsys, Outer, [])
    assert "missing required flag --data" in line
    line = _usage_error(capsys, Toy, ["--config", str(tmp_path / "missing.yaml")])
    assert "does not exist" in line
    y = tmp_path / "c.yaml"
    y.write_text("num_epoch: 3\n")
    assert "unknown field(s) ['num_epoch']" in _usage_error(capsys, Toy, ["--config", str(y)])
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['num_epoch'\]"):
        load_yaml_config(Toy, y)
    y.write_text("num_epochs: many\n")
    with pytest.raises(ConfigError, match="field 'num_epochs': expected an integer"):
        load_yaml_config(Toy, y)
    assert "field 'num_epochs': expected an integer" in _usage_error(capsys, Toy, ["--config", str(y)])


def test_nested_config_flags_yaml_and_fixed_fields(tmp_path, capsys):
    cfg = parse_config(Outer, ["--data", "d", "--depth", "5", "--tags"])
    assert cfg == Outer(data="d", inner=Inner(depth=5, tags=()))
    assert parse_config(Outer, ["--data", "d"]).inner.depth == 3  # the parent's default for the nested config
    y = tmp_path / "c.yaml"
    y.write_text("data: d\ninner:\n  tags: [x, y]\n")
    cfg = parse_config(Outer, ["--config", str(y)])
    assert cfg.inner == Inner(depth=3, tags=("x", "y")) and cfg.data == "d"  # required flag given by the YAML
    y.write_text("inner:\n  depht: 1\n")
    with pytest.raises(ConfigError, match=r"\['inner.depht'\]"):
        load_yaml_config(Outer, y)
    assert config_to_dict(cfg)["inner"] == {"depth": 3, "out": "inner", "tags": ["x", "y"]}
    # a field the parent fixes has no flag: --out is the parent's own
    assert parse_config(Outer, ["--data", "d", "--out", "o"]) == Outer(out="o", data="d")
    with pytest.raises(SystemExit):
        parse_config(Outer, ["--help"])
    out = capsys.readouterr().out
    assert out.count("--out") == 1 and "--depth" in out and "(required)" in out


def test_help_lists_every_field_with_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Toy, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(Toy):
        assert f"--{f.name}" in out
    for f in dataclasses.fields(Runtime):
        assert f"--{f.name}" in out
    assert "passes over the data (default: 200)" in out
    assert "--bf16, --no_bf16" in out


def test_threads_and_verbose(capsys):
    import logging

    import torch

    before = torch.get_num_threads()
    try:
        parse_config(Toy, ["--threads", "1"])
        assert torch.get_num_threads() == 1
        parse_config(Toy, [])  # 0: leaves the setting as it is
        assert torch.get_num_threads() == 1
        logging.getLogger("faiss.loader").info("Could not load library with AVX2 support")
        logging.getLogger("visae.toy").info("visae says")
        err = capsys.readouterr().err
        assert "visae says" in err and "Could not load library" not in err
        parse_config(Toy, ["--verbose"])
        logging.getLogger("faiss.loader").info("Could not load library with AVX2 support")
        assert "Could not load library" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
        parse_config(Toy, [])  # back to the quiet terminal for the tests that follow


def test_yaml_dump_round_trip(tmp_path):
    p = tmp_path / "t.yaml"
    dump_yaml_config(Toy(lrs=(1.0,)), p)
    assert load_yaml_config(Toy, p) == Toy(lrs=(1.0,))
    dump_yaml_config(Outer(data="d", inner=Inner(depth=7)), p)
    assert load_yaml_config(Outer, p) == Outer(data="d", inner=Inner(depth=7))


def _config_files():
    return sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: p.name)
def test_every_config_file_loads_into_its_class(path: Path):
    """configs/*.yaml start with '# config: module:Class'; without '# overrides' they equal the defaults."""
    lines = path.read_text().splitlines()
    assert lines and lines[0].startswith("# config: "), f"{path} must start with '# config: module:Class'"
    module, cls_name = lines[0].removeprefix("# config: ").strip().split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    cfg = load_yaml_config(cls, path)
    if not (len(lines) > 1 and lines[1].strip() == "# overrides"):
        assert config_to_dict(cfg) == config_to_dict(cls()), f"{path} differs from {cls_name}'s defaults: regenerate it"
        assert set(yaml.safe_load(path.read_text())) == {f.name for f in dataclasses.fields(cls)}
    # a dump lists every field, nested configs' too (a field added to a nested config shows up here)
    if not (len(lines) > 1 and lines[1].strip() == "# overrides"):
        assert _keys(yaml.safe_load(path.read_text())) == _keys(config_to_dict(cls())), f"{path}: regenerate it"


def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_yaml_file_not_utf8_is_a_config_error_naming_it(tmp_path):
    """Issue 11 (bad-input corpus): a Latin-1 byte in a --config file was a UnicodeDecodeError traceback."""
    p = tmp_path / "x.yaml"
    p.write_bytes(b"depth: 2 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"x\.yaml is not UTF-8 text \(byte 14\)"):
        load_yaml_config(Inner, p)


def test_bad_yaml_and_a_config_directory_are_named_in_one_line(tmp_path, capsys):
    from visae import cli

    p = tmp_path / "x.yaml"
    p.write_text("depth: [1,\nwidth: 2\n")
    with pytest.raises(ConfigError, match=r"x\.yaml is not valid YAML \(line 3, column 1: expected ',' or ']'"):
        load_yaml_config(Inner, p)
    p.write_text("depth: 2\nwidth: 3\ndepth: 4\n")  # the safe loader kept depth 4 without a word
    with pytest.raises(ConfigError, match=r"key 'depth' is given twice \(lines 1 and 3\)"):
        load_yaml_config(Inner, p)
    import yaml

    from visae.config import _UniqueKeyLoader

    # merge keys may be overridden (not a repeat), unhashable keys keep the safe loader's error
    assert yaml.load("b: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n", Loader=_UniqueKeyLoader)["d"] == {"x": 3, "y": 2}
    nested = "x:\n  <<: &m\n    <<: {a: 1}\n    a: 5\n  c: 1\nz: *m\n"  # merged inline, aliased later: no repeat
    assert yaml.load(nested, Loader=_UniqueKeyLoader) == yaml.safe_load(nested)
    with pytest.raises(yaml.YAMLError):
        yaml.load("? [a, b]\n: 1\n", Loader=_UniqueKeyLoader)
    assert cli.main(["train", "--config", str(tmp_path)]) == 2  # said "file does not exist" of a directory
    err = capsys.readouterr().err
    assert err.strip() == f"visae train: error: --config {tmp_path}: is a directory, not a YAML file"


@pytest.mark.parametrize("argv, field", [
    (["browse", "--sae", "s", "--port", "70000"], "BrowseConfig.port = 70000"),  # an OverflowError after the site
    (["browse", "--sae", "s", "--thumb_size", "0"], "BrowseConfig.thumb_size = 0"),  # ZeroDivisionError in PIL
    (["browse", "--sae", "s", "--workers", "-1"], "BrowseConfig.workers = -1"),  # ValueError in the thumbnail pool
    (["extract", "--images", "i", "--threads", "-1"], "ExtractConfig.threads = -1"),  # ignored: all cores
    (["extract", "--images", "i", "--batch_size", "0"], "ExtractConfig.batch_size = 0"),
    (["extract", "--images", "i", "--num_workers", "-2"], "ExtractConfig.num_workers = -2"),
    (["extract", "--images", "i", "--shard_size", "0"], "ExtractConfig.shard_size = 0"),
    (["extract", "--images", "i", "--limit", "-3"], "ExtractConfig.limit = -3"),
    (["cbm", "--sae", "s", "--tol", "-1e-5"], "CBMConfig.tol = -1e-05"),  # acted as 0
    (["cbm", "--sae", "s", "--probe_l2", "-1"], "CBMConfig.probe_l2 = -1.0"),
    (["train", "--shards", "s", "--adam_beta1", "1"], "TrainConfig.adam_beta1 = 1.0"),  # a frozen first moment
    (["train", "--shards", "s", "--adam_beta2", "1.5"], "TrainConfig.adam_beta2 = 1.5"),
    (["train", "--shards", "s", "--adam_eps", "-1e-8"], "TrainConfig.adam_eps = -1e-08"),
    (["train", "--shards", "s", "--dense_threshold", "1.5"], "TrainConfig.dense_threshold = 1.5"),
    (["train", "--shards", "s", "--resample_encoder_scale", "-0.2"], "TrainConfig.resample_encoder_scale = -0.2"),
    (["train", "--shards", "s", "--seed", "-1"], "TrainConfig.seed = -1"),  # a numpy traceback
    (["toyworld", "--seed", "-1"], "ToyWorldConfig.seed = -1"),  # numpy's error after world.json was written
    (["sweep", "--shards", "s", "--dense_threshold", "nan"], "TrainConfig.dense_threshold = nan"),
    (["select", "--batch_size", "0"], "SelectConfig.batch_size = 0"),  # range() step 0 inside scoring
    (["select", "--max_l0", "-1"], "SelectConfig.max_l0 = -1.0"),  # no trial met it, after scoring them all
    (["select", "--max_dead", "nan"], "SelectConfig.max_dead = nan"),
    (["select", "--max_dead", "2"], "SelectConfig.max_dead = 2.0: expected a fraction in [0, 1]"),  # a count: no constraint
    (["push", "--sae", "s", "--dry_run", "--member", "-1"], "PushConfig.member = -1"),  # an empty slice in export
    (["train-toy-clip", "--checkpoint_every", "0"], "ToyClipConfig.checkpoint_every = 0"),  # ZeroDivisionError
    (["train-toy-clip", "--threads", "-1"], "ToyClipConfig.threads = -1"),  # ignored: all cores
    (["train-toy-clip", "--eval_seed", "-2"], "ToyClipConfig.eval_seed = -2"),
    (["train-toy-clip", "--two_object_fraction", "1.5"], "ToyClipConfig.two_object_fraction = 1.5")])
def test_stage_commands_refuse_a_count_or_fraction_out_of_range_naming_the_field(tmp_path, monkeypatch, capsys, argv,
                                                                                field):
    """Each was taken silently (clamped, ignored) or failed deep inside with a traceback; now a usage error (exit 2)
    naming the field and its value when the flags are parsed, before anything is written."""
    from visae.cli import main

    monkeypatch.chdir(tmp_path)
    where = ["--sweep", "sw"] if argv[0] == "select" else ["--out", "out"]
    assert main([*argv, *where]) == 2
    err = capsys.readouterr().err
    assert field in err and "expected" in err and not list(tmp_path.iterdir()), err


def test_absolute_paths_resolves_the_named_path_fields_only(tmp_path, monkeypatch):
    """The record helper of every stage: named (dotted) fields made absolute from the current directory; empty, null
    and absent kept; an if_file field (a pretrained tag or a checkpoint) only when such a file exists."""
    from visae.config import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_text("x")
    rec = {"out": "o", "shards": "", "vocab": None, "n": 3, "pretrained": "w.pt",
           "naming": {"sae": "../s", "pretrained": "laion2b_s34b_b79k"}}
    got = absolute_paths(rec, ("out", "shards", "vocab", "naming.sae", "missing.x"),
                         if_file=("pretrained", "naming.pretrained"))
    assert got == {"out": str(tmp_path / "o"), "shards": "", "vocab": None, "n": 3, "pretrained": str(tmp_path / "w.pt"),
                   "naming": {"sae": str(tmp_path.parent / "s"), "pretrained": "laion2b_s34b_b79k"}}, got
    assert rec["out"] == "o"  # a copy
    # a URI is no local path: hf://org/repo was recorded as <cwd>/hf:/org/repo
    assert absolute_paths({"sae": "hf://org/repo/layer8"}, ("sae",)) == {"sae": "hf://org/repo/layer8"}


@pytest.mark.parametrize("flags, field", [
    (["--colour_jitter", "-1"], "ToyClipV2Config.colour_jitter = -1.0"),  # was: no jitter
    (["--max_objects", "5"], "ToyClipV2Config.max_objects = 5"), (["--occlusion", "nan"], "ToyClipV2Config.occlusion"),
    (["--eval_every", "-100"], "ToyClipV2Config.eval_every = -100"),  # acted as 100
    (["--negatives_per_step", "-1"], "ToyClipV2Config.negatives_per_step = -1")])
def test_toy_clip_v2_refuses_a_count_or_fraction_out_of_range_naming_the_field(tmp_path, monkeypatch, capsys, flags,
                                                                               field):
    from visae.toyclip import main_v2

    monkeypatch.chdir(tmp_path)
    assert main_v2(["--out", "out", *flags]) == 2
    err = capsys.readouterr().err
    assert field in err and "expected" in err and not list(tmp_path.iterdir()), err


def test_check_bounds_refuses_infinities_unless_they_mean_no_constraint():
    """A bound with no upper limit let ``inf`` through: ``--direction_weight inf`` trained NaN weights and exited 0."""
    import math

    from visae.config import check_bounds
    from visae.select import SelectConfig
    from visae.toyclip_text import TextTuneConfig

    @dataclass(frozen=True)
    class C:
        w: float = 1.0
        n: int = 1

    check_bounds(C(), {"w": (0.0, None), "n": (1, None)})
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ConfigError, match="C.w"):
            check_bounds(C(w=bad), {"w": (0.0, None)})
    with pytest.raises(ConfigError, match="a finite value >= 0.0"):
        check_bounds(C(w=math.inf), {"w": (0.0, None)})
    check_bounds(C(w=math.inf), {"w": (0.0, None)}, allow_inf=("w",))  # where inf means "no constraint"
    with pytest.raises(ConfigError, match="direction_weight"):
        TextTuneConfig(direction_weight=math.inf)
    with pytest.raises(ConfigError, match="lr"):
        TextTuneConfig(lr=math.inf)
    assert SelectConfig(sweep="s", max_l0=math.inf).max_l0 == math.inf  # documented: inf = no L0 constraint
    # the same kind in the checks written by hand: `visae train --lr inf` trained 50 steps to a NaN loss
    from visae.cbm import CBMConfig, CBMError
    from visae.sweep import SweepConfig
    from visae.train import TrainConfig

    with pytest.raises(ConfigError, match="TrainConfig.lr must be positive and finite"):
        TrainConfig(lr=math.inf)
    with pytest.raises(ConfigError, match="lrs must be positive and finite"):
        SweepConfig(lrs=(1e-3, math.inf))
    with pytest.raises(ConfigError, match="l1_coeffs must be >= 0 and finite"):
        SweepConfig(l1_coeffs=(math.inf,))
    with pytest.raises(CBMError, match="target_concepts_per_class must be positive and finite"):
        CBMConfig(target_concepts_per_class=math.inf)
