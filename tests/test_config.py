import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from conftest import REPO
from visae.config import ConfigError, config_to_dict, dump_yaml_config, load_yaml_config, parse_config


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


def test_defaults_yaml_and_flags_in_order(tmp_path):
    assert parse_config(Toy, []) == Toy()
    y = tmp_path / "c.yaml"
    y.write_text("num_epochs: 3\nlr: 1.0e-3\n")
    cfg = parse_config(Toy, ["--config", str(y), "--num_epochs", "7", "--bf16", "true", "--lrs", "1", "2", "3"])
    assert cfg == Toy(num_epochs=7, lr=1e-3, bf16=True, lrs=(1.0, 2.0, 3.0))
    assert parse_config(Toy, [], default_yaml=y).num_epochs == 3
    assert parse_config(Toy, ["--limit", "5"]).limit == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1  # type: ignore[misc]


def test_bad_values_are_named(tmp_path):
    with pytest.raises(SystemExit):
        parse_config(Toy, ["--arch", "nope"])
    y = tmp_path / "c.yaml"
    y.write_text("num_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['num_epoch'\]"):
        load_yaml_config(Toy, y)
    y.write_text("num_epochs: many\n")
    with pytest.raises(ConfigError, match="field 'num_epochs': expected an integer"):
        load_yaml_config(Toy, y)
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(Toy, ["--config", str(tmp_path / "missing.yaml")])


def test_help_lists_every_field_with_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(Toy, ["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(Toy):
        assert f"--{f.name}" in out
    assert "passes over the data (default: 200)" in out


def test_yaml_dump_round_trip(tmp_path):
    p = tmp_path / "t.yaml"
    dump_yaml_config(Toy(lrs=(1.0,)), p)
    assert load_yaml_config(Toy, p) == Toy(lrs=(1.0,))


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
