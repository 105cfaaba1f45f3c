"""Typed, frozen configs: dataclass defaults < YAML file < command-line flags.

Every stage has one frozen dataclass. Its field defaults are the single source of
truth; the YAML files in ``configs/`` are dumps of those defaults (a test keeps them
in sync) that users copy and edit. A stage that runs another stage's settings nests that
stage's config (``SweepConfig.train: TrainConfig``) instead of copying its fields; a YAML file
gives a nested config as a nested mapping.

``parse_config`` is the command line of every stage, on tyro (the convention of saev and
much of this field; docs/cli.md says why): ``--num_epochs 200`` style flags (spelled like
the fields), bare boolean flags with ``--no_`` forms, ``None`` for null, a list flag with no
values for an empty list, no abbreviations, ``--help`` with every option and its default,
and usage errors as one line with exit status 2. The nested configs' flags are unprefixed
(``visae sweep --num_epochs 3`` sets ``SweepConfig.train.num_epochs``) unless the field asks
for a prefix. Every command also takes the :class:`Runtime` options ``--config``,
``--threads`` and ``--verbose``.

Supported field types: ``int``, ``float``, ``str``, ``bool``, ``Optional[...]`` of
those, ``Literal[...]``, ``tuple[T, ...]`` (given on the command line as ``--lrs 1e-4 5e-4``)
and nested config dataclasses; a union such as ``Union[int, str, None]`` is passed through as given
(null allowed) for the config's own ``__post_init__`` to check (``ExtractConfig.layer``: ``8`` or ``4,8,11``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import io
import logging
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Optional, Sequence, TypeVar

import yaml

from visae.errors import VisaeError

C = TypeVar("C")

__all__ = [
    "ConfigError",
    "check_bounds",
    "config_from_dict",
    "config_to_dict",
    "absolute_paths",
    "changed_settings",
    "load_yaml_config",
    "dump_yaml_config",
    "parse_config",
    "parse_args",
    "apply_runtime",
    "Runtime",
]


class ConfigError(VisaeError, ValueError):
    """A config file or flag does not fit the dataclass it is meant for (a usage error: exit status 2)."""

    exit_code = 2


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        if len(args) > 1 and len(args) < len(typing.get_args(tp)):  # Union[int, str, None]: optional, checked by the config
            return typing.Union[tuple(args)], True
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
    if isinstance(base, type) and dataclasses.is_dataclass(base):
        if isinstance(value, base):
            return value
        raise ConfigError(f"{where}: expected a mapping of {base.__name__} fields, got {value!r}")
    if base is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def check_bounds(cfg: Any, bounds: dict[str, tuple[float | None, float | None]], notes: dict[str, str] | None = None,
                 allow_inf: Collection[str] = ()) -> None:
    """Refuse the fields of the config ``cfg`` (a dataclass) outside their bounds, ``{field: (low, high)}``, both
    inclusive, None for no bound (a NaN is outside every bound; so is an infinity, unless the field is in
    ``allow_inf``, where it means "no constraint"): a count, a size or a fraction out of range is named at parse
    time instead of being taken silently (clamped, or acting as 0 or 1; an infinite weight or rate trains NaN weights).

    Raises:
        ConfigError: ``"<Class>.<field> = <value>: expected >= low | <= high | in [low, high]"`` (with "a finite
            value" for an infinity) and ``notes[field]``.
    """
    for name, (low, high) in bounds.items():
        v = getattr(cfg, name)
        finite = name in allow_inf or not (isinstance(v, float) and math.isinf(v))
        if finite and (low is None or v >= low) and (high is None or v <= high):
            continue
        want = f"in [{low}, {high}]" if low is not None and high is not None else (f">= {low}" if high is None else f"<= {high}")
        if not finite:
            want = f"a finite value {want}"
        note = (notes or {}).get(name, "")
        raise ConfigError(f"{type(cfg).__name__}.{name} = {v!r}: expected {want}{' ' + note if note else ''}")


def check_fraction_constraint(cfg: Any, name: str, null: str = "no constraint") -> None:
    """Refuse the constraint ``cfg.<name>`` unless it is None (unset), ``inf`` (no constraint) or a fraction in
    [0, 1]: a dead-latent share of 2 (a count typed for a fraction) constrains nothing and was taken silently.
    ``null``: what None means for this config, said in the message.

    Raises:
        ConfigError: ``"<Class>.<name> = <value>: expected a fraction in [0, 1] (inf: no constraint)"``.
    """
    v = getattr(cfg, name)
    if v is None or v == math.inf or 0.0 <= v <= 1.0:
        return
    raise ConfigError(f"{type(cfg).__name__}.{name} = {v!r}: expected a fraction in [0, 1] (inf: no constraint; "
                      f"null: {null})")


def config_from_dict(cls: type[C], data: dict[str, Any], source: str = "config", *, base: Any = None,
                     _prefix: str = "") -> C:
    """Build ``cls`` from a mapping (fields it leaves out keep ``base``'s values, or the defaults).

    A nested config (a field whose type is a config dataclass) is given as a nested mapping;
    the fields it leaves out keep the parent's default for that field. Unknown keys,
    ill-typed values and values the config's own checks reject raise ConfigError naming
    ``source`` and the (dotted) field.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {_prefix.rstrip('.') or 'the config'}: expected a mapping of field: value, "
                          f"got {type(data).__name__}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {[_prefix + u for u in unknown]} for {cls.__name__}; "
                          f"known: {sorted(types_)}")
    kwargs = {}
    for k, v in data.items():
        sub = _nested_dataclass(types_[k])
        if sub is not None and isinstance(v, dict):
            sub_base = getattr(base, k) if base is not None else _field_default(cls, k)
            kwargs[k] = config_from_dict(sub, v, source, base=sub_base, _prefix=f"{_prefix}{k}.")
        else:
            kwargs[k] = _coerce(v, types_[k], f"{source}: field '{_prefix}{k}'")
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {cls.__name__}: {e}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON/YAML-able dict of a config: tuples become lists, nested configs nested dicts."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out[f.name] = config_to_dict(v)
        else:
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def absolute_paths(record: dict[str, Any], fields: Sequence[str], *, if_file: Sequence[str] = ()) -> dict[str, Any]:
    """A copy of a config record (:func:`config_to_dict`) with its dotted ``fields`` that hold a file or directory
    made absolute paths (``~`` expanded, from the current directory; empty, null and absent kept): the record then
    says which was used, read from anywhere (recorded as typed, a relative path did not). ``if_file``: fields that
    hold a path or a name (a pretrained tag), made absolute only when such a file exists. URIs (``hf://org/repo``,
    ``https://...``) are kept as typed.
    """
    import json

    out = json.loads(json.dumps(record))
    for name in (*fields, *if_file):
        *parents, leaf = name.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node.get(p), dict) else {}
        v = node.get(leaf)
        if "://" in str(v):  # a URI (hf://org/repo, pipe: is not one) stays as typed: it is no local path
            continue
        if isinstance(v, str) and v and (name not in if_file or os.path.isfile(os.path.expanduser(v))):
            node[leaf] = os.path.abspath(os.path.expanduser(v))
    return out


def changed_settings(record_file: str | Path, new: dict[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """The settings in which the earlier result ``record_file`` (a JSON file with the config record of the run that
    wrote it under ``"config"``: concepts.json, cbm.json) differs from ``new`` (this run's record, as absolute as the
    earlier one's), as ``"field: old -> new"``; ``ignore``: fields of how a run ran, not of what it made (batch
    sizes, device). Empty when there is no readable earlier record. Stages that replace their output on a rerun log
    these, so a result made with other settings is not swapped without a word."""
    import json

    try:
        old = json.loads(Path(record_file).read_text()).get("config") or {}
    except (OSError, ValueError, AttributeError):
        return []
    return [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if k not in ignore and k in old and old[k] != v]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (the safe loader keeps the last one silently:
    ``lr: 1e-3`` ten lines above ``lr: 1e-4`` trained at 1e-4 without a word)."""

    def flatten_mapping(self, node: Any) -> None:
        # checked here, once per node, before PyYAML rewrites a node with merge keys in place (a node merged
        # inline and aliased later would otherwise be checked again in its flattened form: false repeats)
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            self._check_unique(node)
        super().flatten_mapping(node)

    def _check_unique(self, node: Any) -> None:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base': the keys it merges may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                again = key in seen
            except TypeError:  # an unhashable key: the safe loader's own error follows
                continue
            if again:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key].line + 1} and "
                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark


def load_yaml_config(cls: type[C], path: str | Path, overrides: dict[str, Any] | None = None) -> C:
    """Load ``cls`` from a YAML file (fields missing from the file keep their defaults)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML ({where}{getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of field: value, got {type(data).__name__}")
    data.update(overrides or {})
    return config_from_dict(cls, data, source=str(path))


def dump_yaml_config(cfg: Any, path: str | Path | None = None, header: str = "") -> str:
    """YAML text of a config (written to ``path`` when given)."""
    text = header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if path is not None:
        from visae.atomic import atomic_write_text

        atomic_write_text(path, text)
    return text


# ----------------------------------------------------------------------------- the command line (tyro)


@dataclass(frozen=True)
class Runtime:
    """Options of every command: where its settings come from and how it runs (not part of any result)."""

    config: Optional[str] = field(default=None, metadata={
        "help": "YAML file of field: value lines (nested sections for nested configs), laid under the flags"})
    threads: int = field(default=0, metadata={
        "help": "CPU threads for torch (0: all cores, torch's default of one per physical core)"})
    verbose: bool = field(default=False, metadata={
        "help": "also show the libraries' log lines (open_clip, faiss, ...), not only visae's"})


# Field metadata understood by the command line (all optional):
#   "help":     the help text of the flag
#   "required": True: the flag must be given (unless a YAML file sets the field); on a nested
#               config field: a tuple of the nested config's field names that are required there
#   "fixed":    on a nested config field: names of the nested config's fields that the parent
#               sets itself (dotted, "train.seed", for a field of a config nested in it); they
#               get no flag (the parent's __post_init__ checks they keep their defaults)
#   "prefix":   on a nested config field: True to spell its flags --<field>.<name> (default:
#               the nested fields' flags are unprefixed, as short as the stage's own)


def _nested_dataclass(tp: Any) -> type | None:
    base, _ = _unwrap_optional(tp)
    return base if isinstance(base, type) and dataclasses.is_dataclass(base) else None


def _walk_fixed(cls: type, fixed: dict[type, set[str]], seen: set[type]) -> None:
    """Collect {nested config class: names its parent fixes} over the config tree of ``cls``."""
    if cls in seen:
        return
    seen.add(cls)
    for name, tp in _field_types(cls).items():
        sub = _nested_dataclass(tp)
        if sub is None:
            continue
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        fixed.setdefault(sub, set())
        for dotted in f.metadata.get("fixed", ()):  # "seed", or "train.seed": a field of a config nested in sub
            *path, leaf = dotted.split(".")
            owner = sub
            for part in path:
                owner = _nested_dataclass(_field_types(owner)[part])  # type: ignore[assignment]
            fixed.setdefault(owner, set()).add(leaf)
        _walk_fixed(sub, fixed, seen)


def _under_prefix(cls: type, inherited: bool = False, seen: set[tuple[type, bool]] | None = None) -> set[type]:
    """The config classes of ``cls``'s tree that sit below a field with ``"prefix": True``."""
    seen = set() if seen is None else seen
    out: set[type] = set()
    for f in dataclasses.fields(cls):
        sub = _nested_dataclass(_field_types(cls)[f.name])
        below = inherited or bool(f.metadata.get("prefix", False))
        if sub is None or (sub, below) in seen:
            continue
        seen.add((sub, below))
        if below:
            out.add(sub)
        out |= _under_prefix(sub, below, seen)
    return out


def _registry(cls: type) -> Any:
    """A tyro constructor registry that spells ``cls``'s tree as this project wants (see the metadata above)."""
    import tyro
    from tyro.constructors import ConstructorRegistry, StructConstructorSpec, StructFieldSpec, StructTypeInfo

    fixed: dict[type, set[str]] = {}
    _walk_fixed(cls, fixed, set())
    prefixed = _under_prefix(cls)
    fixed.setdefault(cls, set())
    # a stage whose config has its own field of a Runtime option's name (extract's, the demo's and the
    # toy CLIP's ``threads``: their library functions set it) takes that flag from its config
    fixed.setdefault(Runtime, set()).update(f.name for f in dataclasses.fields(cls)
                                            if f.name in {r.name for r in dataclasses.fields(Runtime)})
    registry = ConstructorRegistry()

    @registry.struct_rule
    def _rule(info: StructTypeInfo) -> Any:
        if info.type not in fixed:
            return None
        hints = typing.get_type_hints(info.type, include_extras=True)
        specs = []
        for f in dataclasses.fields(info.type):
            if dataclasses.is_dataclass(info.default) and not isinstance(info.default, type):
                default = getattr(info.default, f.name)
            elif f.default is not dataclasses.MISSING:
                default = f.default
            else:
                default = f.default_factory()  # type: ignore[misc]
            tp = hints[f.name]
            if _nested_dataclass(tp) is not None and not f.metadata.get("prefix", False):
                # unprefixed: its own name is left out of its flags; below a prefixed field the ancestors'
                # prefix stays (--sweep.num_epochs), elsewhere every prefix goes (its help group is kept)
                mark = tyro.conf.arg(name="") if info.type in prefixed else tyro.conf.OmitArgPrefixes
                tp = typing.Annotated[tp, mark]
            if f.name in fixed[info.type]:
                tp = typing.Annotated[tp, tyro.conf.Suppress]
            specs.append(StructFieldSpec(name=f.name, type=tp, default=default, helptext=f.metadata.get("help")))
        return StructConstructorSpec(instantiate=info.type, fields=tuple(specs))

    return registry


def _mark_required(cfg: Any, required: Sequence[str] = ()) -> Any:
    """A copy of ``cfg`` whose required fields still at their declared default are tyro.MISSING (flag required)."""
    import tyro

    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            req = f.metadata.get("required", ())
            changes[f.name] = _mark_required(value, req if isinstance(req, (tuple, list)) else ())
        elif f.metadata.get("required") is True or f.name in required:
            declared = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if value == declared:
                changes[f.name] = tyro.MISSING
    if not changes:
        return cfg
    out = copy.copy(cfg)  # not dataclasses.replace: __post_init__ must not see MISSING
    for k, v in changes.items():
        object.__setattr__(out, k, v)
    return out


_ARGS_CLASSES: dict[type, type] = {}


def _args_class(cls: type) -> type:
    """The dataclass tyro parses: the stage's config (its flags unprefixed) and the Runtime options."""
    if cls not in _ARGS_CLASSES:
        import tyro

        _ARGS_CLASSES[cls] = dataclasses.make_dataclass(
            f"{cls.__name__}Args",
            # a tree with a prefixed nested config cannot have OmitArgPrefixes at the top (tyro passes it
            # down to every flag); its top-level flags are unprefixed all the same (the field is nameless)
            [("cfg", typing.Annotated[cls, tyro.conf.arg(name="")] if _under_prefix(cls) else
              typing.Annotated[cls, tyro.conf.OmitArgPrefixes, tyro.conf.arg(name="")]),
             ("runtime", typing.Annotated[Runtime, tyro.conf.OmitArgPrefixes])],
            frozen=True)
    return _ARGS_CLASSES[cls]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _one_line(text: str) -> str:
    """tyro's error message (a box with a title, the message, hints; or the same as plain text) as one line."""
    rows: list[str] = []
    for raw in _ANSI.sub("", text).splitlines():
        s = raw.strip()
        if s.startswith("╰"):
            break  # the end of the first box
        top = s.startswith("╭")
        s = s.strip("│╭╮╯ ")
        rows.append(s.strip("─ ") if top else s)
    rows = [r for r in rows if r]
    title, sections = (rows[0] if rows else ""), [[]]  # type: tuple[str, list[list[str]]]
    for r in rows[1:]:
        if set(r) <= {"─", "-"}:
            sections.append([])
        else:
            sections[-1].append(r)
    sections = [sec for sec in sections if sec]
    words = " ".join(sections[0]).split() if sections else []
    if title.lower().startswith("required"):
        flags = [w for w in words if w.startswith("-")]
        return f"missing required flag{'s' if len(flags) > 1 else ''} {', '.join(flags)}" if flags else " ".join(words)
    # a nested config's own check: its message names the field; drop tyro's internal prefix
    msg = re.sub(r"^Error parsing (cfg|runtime)(\.[\w.]+)?: ", "", " ".join(words))
    for sec in sections[1:]:
        if sec[0].lower().startswith("argument helptext") and len(sec) > 1 and len(sec[1].split()) > 1:
            msg += f" (expected {sec[1].split()[1]})"  # the flag's metavar: INT, FLOAT, {a,b}, ...
        if sec[0].lower().startswith("perhaps you meant"):
            flags = [w.split()[0] for w in sec[1:] if w.startswith("-")]
            if flags:
                msg += f" (did you mean {' or '.join(flags[:3])}?)"
    if title.lower().startswith("unrecognized") and any(w.strip(",").lower() in ("true", "false") for w in words):
        msg += " (a boolean flag takes no value: --name sets it, --no_name clears it)"
    return msg or title or "invalid command line"


def _usage_error(prog: str, message: str) -> typing.NoReturn:
    raise ConfigError(message)


def _config_flag(argv: Sequence[str]) -> str | None:
    """The value of --config in ``argv`` (exact spelling: no abbreviations), or None."""
    value = None
    for i, a in enumerate(argv):
        if a == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError("--config expects a YAML file path")
            value = argv[i + 1]
        elif a.startswith("--config="):
            value = a.split("=", 1)[1]
    return value


def _optional_flags(cls: type, fixed: Sequence[str] = ()) -> set[str]:
    """Flags (unprefixed nested ones included) of the optional fields of ``cls``'s tree."""
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        sub = _nested_dataclass(tp)
        if f.name in fixed:
            continue
        if sub is not None:
            inner = _optional_flags(sub, f.metadata.get("fixed", ()))
            out |= {f"{f.name}.{n}" for n in inner} if f.metadata.get("prefix") else inner
        elif _unwrap_optional(tp)[1]:
            out.add(f.name)
    return out


def _null_as_none(cls: type, argv: list[str]) -> list[str]:
    """``--field null`` as ``--field None`` for an optional field: null is how YAML, JSON and the help say it."""
    optional = _optional_flags(cls) | {"config"}
    out, flag = [], ""
    for a in argv:
        if a.startswith("--"):
            flag = a[2:].replace("-", "_")
        elif a == "null" and flag in optional:
            a = "None"
        out.append(a)
    return out


def parse_args(cls: type[C], argv: Sequence[str] | None = None, default_yaml: str | Path | None = None,
               description: str = "", prog: str | None = None) -> tuple[C, Runtime]:
    """Parse flags into ``cls`` and the :class:`Runtime` options: defaults < ``default_yaml`` / ``--config`` < flags.

    The parser is tyro's (``use_underscores``: flags are spelled like the fields, ``--num_epochs``;
    ``--num-epochs`` is read too). Booleans are bare flags with a ``--no_`` form, ``None`` (or
    ``null``) sets an optional field back to null, a list flag with no values empties the list, flags are never
    abbreviated, and ``--help`` lists every option with its default (required ones marked).

    Raises:
        SystemExit: 0 after ``--help`` (printed on stdout).
        ConfigError: a usage error, its message one line naming the flag and what it accepts: an
            unknown flag, a value of the wrong type or outside its choices, a missing required
            flag, a config file that is missing or does not fit ``cls``, or a value the config's
            own checks (``__post_init__``) reject. A stage's ``main`` prints it as
            ``<prog>: error: <message>`` and returns 2 (``visae.cli`` does the same for any
            ``VisaeError``).
    """
    import tyro

    argv = _null_as_none(cls, list(sys.argv[1:] if argv is None else argv))
    prog = prog or Path(sys.argv[0]).name
    try:
        given = _config_flag(argv)
        if given is not None and not Path(given).is_file():
            what = "is a directory, not a YAML file" if Path(given).is_dir() else "file does not exist"
            raise ConfigError(f"--config {given}: {what}")
        path = given if given is not None else default_yaml
        base = load_yaml_config(cls, path) if path is not None and Path(path).is_file() else cls()
    except ConfigError as e:
        _usage_error(prog, str(e))
    args_cls = _args_class(cls)
    default = args_cls(cfg=_mark_required(base), runtime=Runtime(config=str(path) if path is not None else None))
    desc = inspect.cleandoc(description or cls.__doc__ or "")
    kw = dict(prog=prog, description=desc, args=argv, default=default, use_underscores=True,
              registry=_registry(cls))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # some errors print even without console outputs
            args = tyro.cli(args_cls, console_outputs=False, **kw)
    except ConfigError as e:  # the config's own checks (__post_init__) on the top-level config
        _usage_error(prog, str(e))
    except SystemExit as e:
        if e.code in (0, None):  # --help: print it for real
            tyro.cli(args_cls, **kw)
            raise
        buf = io.StringIO()  # the same error again, rendered wide into a buffer, then as one line
        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "4000"
        try:
            with contextlib.redirect_stderr(buf):
                tyro.cli(args_cls, **kw)
        except SystemExit:
            pass
        finally:
            if old is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = old
        _usage_error(prog, _one_line(buf.getvalue()))
    out_field = next((f for f in dataclasses.fields(cls) if f.name == "out"), None)
    if (out_field is not None and isinstance(out_field.default, str) and out_field.default
            and not str(getattr(args.cfg, "out", "x")).strip()):  # "" became Path("."): every file in the cwd
        _usage_error(prog, "--out is empty: give an output directory (--out . for the current one)")
    return args.cfg, args.runtime


def parse_config(cls: type[C], argv: Sequence[str] | None = None, default_yaml: str | Path | None = None,
                 description: str = "", prog: str | None = None) -> C:
    """:func:`parse_args`, then :func:`apply_runtime`; returns the config (a stage's ``main`` starts with this)."""
    cfg, runtime = parse_args(cls, argv, default_yaml=default_yaml, description=description, prog=prog)
    apply_runtime(runtime)
    return cfg


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest and the demo swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _OnlyVisae(logging.Filter):
    """visae's records from INFO up; other libraries' (open_clip, faiss, ...) only from WARNING up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name == "visae" or record.name.startswith("visae.")


def apply_runtime(runtime: Runtime) -> None:
    """Set torch's CPU threads and the terminal's log lines as ``runtime`` says (idempotent).

    Log lines go to stderr as bare messages: visae's from INFO up, the libraries' only from
    WARNING up unless ``runtime.verbose`` (then everything from INFO up).
    """
    if runtime.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: all cores), got {runtime.threads}")
    if runtime.threads > 0:
        import torch

        torch.set_num_threads(runtime.threads)
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    for f in list(handler.filters):
        handler.removeFilter(f)
    if not runtime.verbose:
        handler.addFilter(_OnlyVisae())
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
