"""Typed, frozen configs: dataclass defaults < YAML file < command-line flags.

Every stage has one frozen dataclass. Its field defaults are the single source of
truth; the YAML files in ``configs/`` are dumps of those defaults (a test keeps them
in sync) that users copy and edit. ``parse_config`` builds an argparse parser from
the dataclass so ``--help`` lists every field with its default, and ``--num_epochs
200`` style flags override it.

Supported field types: ``int``, ``float``, ``str``, ``bool``, ``Optional[...]`` of
those, ``Literal[...]`` and ``tuple[T, ...]`` (given on the command line as
``--lrs 1e-4 5e-4``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

C = TypeVar("C")

__all__ = [
    "ConfigError",
    "config_from_dict",
    "config_to_dict",
    "load_yaml_config",
    "dump_yaml_config",
    "parse_config",
    "build_parser",
]


class ConfigError(ValueError):
    """A config file or flag does not fit the dataclass it is meant for."""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML / JSON value to the field's type, or raise a ConfigError naming ``where``."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null given but the field is not optional ({tp})")
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (tuple, list):
        args = typing.get_args(base)
        item_tp = args[0] if args else Any
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            value = [value]
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if base is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if base is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def config_from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Build ``cls`` from a mapping; unknown keys and ill-typed values raise ConfigError."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(types_)}")
    kwargs = {k: _coerce(v, types_[k], f"{source}: field '{k}'") for k, v in data.items()}
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON/YAML-able dict of a config (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def load_yaml_config(cls: type[C], path: str | Path, overrides: dict[str, Any] | None = None) -> C:
    """Load ``cls`` from a YAML file (fields missing from the file keep their defaults)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of field: value, got {type(data).__name__}")
    data.update(overrides or {})
    return config_from_dict(cls, data, source=str(path))


def dump_yaml_config(cfg: Any, path: str | Path | None = None, header: str = "") -> str:
    """YAML text of a config (written to ``path`` when given)."""
    text = header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def _arg_kwargs(tp: Any) -> dict[str, Any]:
    base, _ = _unwrap_optional(tp)
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(base)), "type": type(typing.get_args(base)[0])}
    if origin in (tuple, list):
        args = typing.get_args(base)
        item = args[0] if args else str
        return {"nargs": "+", "type": item if item in (int, float, str) else str}
    if base is bool:
        return {"type": str, "metavar": "{true,false}"}
    if base in (int, float, str):
        return {"type": base}
    return {"type": str}


def build_parser(cls: type, description: str = "", defaults: Any = None, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` plus one flag per field of ``cls``."""
    defaults = defaults if defaults is not None else cls()
    doc = (cls.__doc__ or "").strip()
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (doc.splitlines()[0] if doc else None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file with field: value lines; flags override it")
    field_help = _field_docs(cls)
    for name, tp in _field_types(cls).items():
        kw = _arg_kwargs(tp)
        default = getattr(defaults, name)
        parser.add_argument(
            f"--{name}",
            dest=name,
            default=argparse.SUPPRESS,
            help=(field_help.get(name, "") + f" (default: {json.dumps(list(default) if isinstance(default, tuple) else default)})").strip(),
            **kw,
        )
    return parser


def _field_docs(cls: type) -> dict[str, str]:
    """Per-field help from ``field(metadata={'help': ...})``."""
    docs = {}
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            docs[f.name] = f.metadata["help"]
    return docs


def parse_config(
    cls: type[C],
    argv: Sequence[str] | None = None,
    default_yaml: str | Path | None = None,
    description: str = "",
    prog: str | None = None,
) -> C:
    """Parse command-line flags into ``cls``: defaults < ``default_yaml`` / ``--config`` < flags."""
    # First pass: find --config so that --help shows the defaults actually in force.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    yaml_path = known.config or default_yaml
    base = load_yaml_config(cls, yaml_path) if yaml_path is not None and Path(yaml_path).exists() else cls()
    if known.config is not None and not Path(known.config).exists():
        raise ConfigError(f"--config {known.config}: file does not exist")
    parser = build_parser(cls, description=description, defaults=base, prog=prog)
    ns = vars(parser.parse_args(argv))
    ns.pop("config", None)
    types_ = _field_types(cls)
    overrides = {k: _coerce(v, types_[k], f"--{k}") for k, v in ns.items()}
    try:
        return dataclasses.replace(base, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
