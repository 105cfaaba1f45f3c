"""The sweep directory: its layout, and reading and writing its files (format: docs/sweep_format.md).

``visae.sweep`` (training) and ``visae.select`` (scoring, selection) both work on a sweep
directory; neither imports the other for it. Every path and file name of the format is
defined here, every read checks what it reads and names the file and field when it is
wrong, and every write is atomic (``visae.atomic``)::

    <sweep>/sweep.json                    the plan: sweep config, trainer config, trials, groups
    <sweep>/init/exp<E>/                  the initial SAE shared by every trial of expansion E
    <sweep>/groups/<group>/checkpoint/    a group's trainer checkpoint (while it trains)
    <sweep>/groups/<group>/done.json      the group finished
    <sweep>/trials/<trial>/               one SAE dir per trial (docs/sae_format.md) + zeroshot.json
    <sweep>/leaderboard.csv|md, pareto.png, drop_vs_l0.png, selection.json, best/, .select.lock, .visae.lock

    sd = SweepDir("runs/sweep")
    plan = sd.read_plan()                                 # dict, checked
    [t["name"] for t in plan["trials"]], sd.group_done("exp8", names), sd.trial_dir("exp8_lr5e-4_lam1.5e-4")
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

from visae.atomic import atomic_dir, atomic_write_json
from visae.errors import VisaeError

__all__ = ["SweepDir", "SweepError", "FORMAT_NAME", "FORMAT_VERSION", "PLAN_FILE", "DONE_FILE", "SCORE_FILE",
           "SCORE_FORMAT", "SELECTION_FILE"]

FORMAT_NAME = "visae.sweep"
FORMAT_VERSION = 2  # 2: `config` nests the trainer (`config.train`) and selection (`config.selection`) settings
PLAN_FILE = "sweep.json"
DONE_FILE = "done.json"
SCORE_FILE = "zeroshot.json"
SCORE_FORMAT = "visae.trial-score.v1"
SELECTION_FILE = "selection.json"
WEIGHTS_FILE = "weights.safetensors"  # docs/sae_format.md
CFG_FILE = "cfg.json"
LOCK_FILE = ".select.lock"


class SweepError(VisaeError, ValueError):
    """A sweep config or sweep directory is unusable (the message names the file and field)."""


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SweepError(f"{path} is not valid JSON ({e}); {what}") from None


def _require(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise SweepError(f"{where}: field {key!r} is missing")
    val = doc[key]
    if not isinstance(val, kind) or isinstance(val, bool) and kind in (int, float, (int, float)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise SweepError(f"{where}: field {key!r} must be {names}, got {type(val).__name__} {val!r:.80}")
    return val


def check_plan(doc: Any, where: str = PLAN_FILE) -> dict[str, Any]:
    """Check a plan document (``sweep.json``) field by field; returns it. Raises SweepError naming the field."""
    if not isinstance(doc, dict):
        raise SweepError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    fmt = doc.get("format")
    if fmt != FORMAT_NAME:
        raise SweepError(f"{where}: field 'format' is {fmt!r}, expected {FORMAT_NAME!r}")
    version = _require(doc, "version", int, where)
    if version > FORMAT_VERSION:
        raise SweepError(f"{where}: field 'version' is {version}; this visae reads versions up to {FORMAT_VERSION} "
                         "(upgrade visae)")
    _require(doc, "config", dict, where)
    _require(doc, "train_config", dict, where)
    _require(doc, "world_size", int, where)
    names = set()
    for i, t in enumerate(_require(doc, "trials", list, where)):
        w = f"{where}: trials[{i}]"
        if not isinstance(t, dict):
            raise SweepError(f"{w}: expected an object, got {type(t).__name__}")
        names.add(_require(t, "name", str, w))
        _require(t, "expansion", int, w)
        _require(t, "lr", (int, float), w)
        _require(t, "l1_coeff", (int, float), w)
    for i, g in enumerate(_require(doc, "groups", list, where)):
        w = f"{where}: groups[{i}]"
        if not isinstance(g, dict):
            raise SweepError(f"{w}: expected an object, got {type(g).__name__}")
        _require(g, "name", str, w)
        _require(g, "expansion", int, w)
        members = _require(g, "trials", list, w)
        unknown = [m for m in members if m not in names]
        if unknown:
            raise SweepError(f"{w}: field 'trials' names {unknown[:3]}, which are not in 'trials'")
    return doc


def weights_problem(sae_dir: str | Path, full: bool = False) -> str | None:
    """Why ``sae_dir`` (a visae SAE directory: a sweep trial, ``best/``) cannot be the SAE its cfg.json describes, or
    None: the weights file or cfg.json is missing or unreadable, the weights' size is not the one cfg.json recorded
    under ``checksums`` (truncated, or replaced by another size), or that record is malformed. ``full``: also their
    SHA-256 (reads the whole file: a same-size replacement or a flipped byte); without it, such damage is found when
    the SAE is loaded. A cfg.json without the record (an older visae's) is only checked for the files."""
    from visae.integrity import sha256_file

    d = Path(sae_dir)
    w = d / WEIGHTS_FILE
    if not w.is_file():
        return f"{w} is missing"
    try:
        doc = json.loads((d / "cfg.json").read_text())
    except FileNotFoundError:
        return f"{d / 'cfg.json'} is missing"
    except (OSError, ValueError):
        return f"{d / 'cfg.json'} is unreadable"
    sums = doc.get("checksums") if isinstance(doc, dict) else None
    if sums is None:
        return None
    entry = sums.get(WEIGHTS_FILE) if isinstance(sums, dict) else None
    rec = entry.get("bytes") if isinstance(entry, dict) else "malformed"
    if rec is None:
        return None  # a record without the size (an older visae's): the SHA-256 is checked on loading
    if not isinstance(rec, int) or isinstance(rec, bool):
        return f"{d / 'cfg.json'}: its checksums record of {WEIGHTS_FILE} is malformed"
    if w.stat().st_size != rec:
        return f"{w} is {w.stat().st_size} bytes, its cfg.json recorded {rec} (truncated or replaced)"
    if full and isinstance(entry.get("sha256"), str) and sha256_file(w) != entry["sha256"]:
        return f"{w} has another SHA-256 than its cfg.json recorded (damaged or replaced)"
    return None


class SweepDir:
    """One sweep directory (need not exist yet): its paths and files. See docs/sweep_format.md."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"SweepDir({str(self.path)!r})"

    # ------------------------------------------------------------------ paths
    @property
    def plan_file(self) -> Path:
        return self.path / PLAN_FILE

    @property
    def trials_dir(self) -> Path:
        return self.path / "trials"

    @property
    def best_dir(self) -> Path:
        return self.path / "best"

    @property
    def selection_file(self) -> Path:
        return self.path / SELECTION_FILE

    @property
    def leaderboard_csv(self) -> Path:
        return self.path / "leaderboard.csv"

    @property
    def leaderboard_md(self) -> Path:
        return self.path / "leaderboard.md"

    @property
    def pareto_png(self) -> Path:
        return self.path / "pareto.png"

    @property
    def drop_png(self) -> Path:
        return self.path / "drop_vs_l0.png"

    def init_dir(self, expansion: int) -> Path:
        return self.path / "init" / f"exp{int(expansion)}"

    def group_dir(self, group: str) -> Path:
        return self.path / "groups" / group

    def checkpoint_dir(self, group: str) -> Path:
        return self.group_dir(group) / "checkpoint"

    def trial_dir(self, trial: str) -> Path:
        return self.trials_dir / trial

    # ------------------------------------------------------------------ the plan
    def has_plan(self) -> bool:
        return self.plan_file.is_file()

    def read_plan(self) -> dict[str, Any]:
        """``sweep.json``, checked (``check_plan``). Raises SweepError when missing or malformed."""
        f = self.plan_file
        if not f.is_file():
            raise SweepError(f"{f} is missing: {self.path} is not a sweep directory (made by `visae sweep`)")
        return check_plan(_read_json(f, "delete it to start the sweep again"), str(f))

    def write_plan(self, doc: dict[str, Any]) -> None:
        """Write ``sweep.json`` (checked first: nothing is written for a malformed plan). Only `visae sweep` writes it."""
        check_plan(doc, f"{self.plan_file} (to write)")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.plan_file, doc)

    # ------------------------------------------------------------------ groups
    def group_done(self, group: str, trials: Iterable[str]) -> bool:
        """The group's done.json lists exactly ``trials`` and every one of them has its weights."""
        f = self.group_dir(group) / DONE_FILE
        if not f.is_file():
            return False
        try:
            doc = json.loads(f.read_text())
        except json.JSONDecodeError:
            return False
        trials = list(trials)
        return (isinstance(doc, dict) and doc.get("trials") == trials
                and all(self.weights_problem(t) is None for t in trials))

    def write_done(self, group: str, trials: Iterable[str], **facts: Any) -> None:
        """Mark a group finished: ``done.json`` = {"trials": [...], **facts} (steps, seconds, rate, note)."""
        self.group_dir(group).mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.group_dir(group) / DONE_FILE, {"trials": list(trials), **facts})

    def all_groups_done(self, plan: dict[str, Any]) -> bool:
        """Every group of ``plan`` is done (:meth:`group_done`: its done.json, and its trials' weights present and of
        the recorded size): the sweep may select."""
        return all(self.group_done(g["name"], g["trials"]) for g in plan["groups"])

    def weights_problem(self, trial: str) -> str | None:
        """Why the trial's weights cannot be its finished SAE, or None (:func:`weights_problem` of its directory)."""
        return weights_problem(self.trial_dir(trial))

    def set_aside(self, trial: str) -> Path:
        """Rename the trial's directory to ``trials/.damaged-<trial>[-k]`` (hidden from the trial listings, kept for
        inspection) so that the trial can train again; returns the new path."""
        from visae.atomic import set_aside

        return set_aside(self.trial_dir(trial), f".damaged-{trial}")

    def damaged_trials(self, plan: dict[str, Any]) -> dict[str, str]:
        """``{trial: why}`` for the planned trials whose weights are missing or of another size than recorded
        (:meth:`weights_problem`; trials of a group not yet done are still training and not listed): a resumed sweep
        trains them again."""
        out = {}
        for g in plan["groups"]:
            if (self.group_dir(g["name"]) / DONE_FILE).is_file():
                for t in g["trials"]:
                    why = self.weights_problem(t)
                    if why is not None:
                        out[t] = why
        return out

    # ------------------------------------------------------------------ trials
    def trial_cfg(self, trial: str) -> dict[str, Any]:
        """The trial's cfg.json as a dict ({} when missing or unreadable: a trial still training)."""
        try:
            doc = json.loads((self.trial_dir(trial) / CFG_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def trial_finished(self, trial: str, lr: float, l1_coeff: float) -> bool:
        """The trial dir holds the finished SAE of this very trial (name, lr and lambda in cfg.json's extra.sweep)."""
        extra = self.trial_cfg(trial).get("extra") or {}
        sw = extra.get("sweep") or {}
        return (bool(extra.get("finished")) and sw.get("trial") == trial and sw.get("lr") == lr
                and sw.get("l1_coeff") == l1_coeff and self.weights_problem(trial) is None)

    def trial_record(self, trial: str) -> dict[str, Any]:
        """What the leaderboard shows of a trial, from its cfg.json: architecture, d_sae, expansion, lr, l1_coeff, finished."""
        cfg = self.trial_cfg(trial)
        extra = cfg.get("extra") or {}
        sw, tr = extra.get("sweep") or {}, extra.get("train") or {}
        return {"architecture": cfg.get("architecture"), "d_sae": cfg.get("d_sae"), "expansion": sw.get("expansion"),
                "lr": sw.get("lr", tr.get("lr")), "l1_coeff": sw.get("l1_coeff", tr.get("l1_coeff")),
                "finished": bool(extra.get("finished", False))}

    def trials_with_weights(self, names: Iterable[str] | None = None) -> list[str]:
        """``names`` (default: every dir of trials/, sorted) that hold a weights file."""
        if names is None:
            if not self.trials_dir.is_dir():
                return []
            names = sorted(p.name for p in self.trials_dir.iterdir() if not p.name.startswith("."))
        return [n for n in names if (self.trial_dir(n) / WEIGHTS_FILE).is_file()]

    # ------------------------------------------------------------------ cached scores
    def weights_stamp(self, trial: str) -> list[int]:
        """[size in bytes, mtime in ns] of the trial's weights file: a cached score is for these weights only."""
        st = (self.trial_dir(trial) / WEIGHTS_FILE).stat()
        return [int(st.st_size), int(st.st_mtime_ns)]

    def read_score(self, trial: str, key: dict[str, Any]) -> dict[str, Any] | None:
        """The trial's cached score (zeroshot.json) if it was made with ``key`` on the current weights, else None."""
        f = self.trial_dir(trial) / SCORE_FILE
        if not f.is_file():
            return None
        try:
            doc = json.loads(f.read_text())
        except json.JSONDecodeError:
            return None
        if not isinstance(doc, dict) or doc.get("key") != key or doc.get("weights") != self.weights_stamp(trial):
            return None
        if not isinstance(doc.get("result"), dict):
            return None
        return doc

    def write_score(self, trial: str, key: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        """Cache a trial's score: zeroshot.json = {"key", "weights": [size, mtime_ns], "result"}; returns it."""
        entry = {"key": key, "weights": self.weights_stamp(trial), "result": result}
        atomic_write_json(self.trial_dir(trial) / SCORE_FILE, entry)
        return entry

    # ------------------------------------------------------------------ selection
    def write_selection(self, info: dict[str, Any]) -> None:
        """``selection.json`` (what was chosen, under which constraints; docs/sweep_format.md)."""
        atomic_write_json(self.selection_file, info, default=str)

    def read_selection(self) -> dict[str, Any] | None:
        """The last committed selection, or None when there is none.

        ``best/selection.json`` is the commit point (``commit_selection`` swaps ``best/`` in
        first); the top-level ``selection.json`` is its copy, written after. When the two differ
        (a selection killed between them) the one in ``best/`` is returned.
        """
        best = self.best_dir / SELECTION_FILE
        if best.is_file():
            doc = _read_json(best, "rerun `visae select`")
        elif self.selection_file.is_file():
            doc = _read_json(self.selection_file, "rerun `visae select`")
        else:
            return None
        if not isinstance(doc, dict):
            raise SweepError(f"{self.selection_file}: expected a JSON object, got {type(doc).__name__}")
        return doc

    def commit_selection(self, trial: str, info: dict[str, Any]) -> Path:
        """Publish a selection as one step: ``best/`` (with ``best/selection.json``) is swapped in, then the copy
        ``selection.json`` is written. A process killed in between leaves ``best/`` consistent in itself, and
        ``read_selection`` trusts it over the stale top-level copy, which the next selection rewrites."""
        best = self.publish_best(trial, info)
        self.write_selection(info)
        return best

    def publish_best(self, trial: str, info: dict[str, Any]) -> Path:
        """``best/`` = a copy of trials/<trial> plus ``best/selection.json``, swapped in for the old one.

        Raises SweepError when the trial's weights are not the ones its cfg.json recorded (SHA-256, read whole: a
        selection from cached scores never reads them, and a same-size replacement kept its size and mtime)."""
        src = self.trial_dir(trial)
        why = weights_problem(src, full=True)
        if why is not None:
            raise SweepError(f"cannot publish {trial} to {self.best_dir}: {why}; delete {src} and rerun the same "
                             "`visae sweep` command to train it again (or restore the file)")
        with atomic_dir(self.best_dir, if_exists="replace") as tmp:
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*.tmp"), dirs_exist_ok=True)
            atomic_write_json(tmp / SELECTION_FILE, info, default=str)
        return self.best_dir

    def remove_best(self) -> None:
        """Remove a stale ``best/`` (no trial meets the constraints)."""
        best = self.best_dir
        if best.is_symlink() or best.is_file():
            best.unlink()
        elif best.is_dir():
            shutil.rmtree(best)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock on the sweep directory's selection outputs (``.select.lock``, flock) across processes."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

