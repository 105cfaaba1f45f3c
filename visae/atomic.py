"""Atomic writes: every file and directory visae writes appears whole or not at all.

(Named ``atomic``, not ``io``: a module named like one of the standard library's shadows it
whenever its directory is on ``sys.path``.)

A file is written under a temporary name beside its destination (``.<name>.<pid>.<token>.tmp``,
same directory, so the final rename never crosses a filesystem), flushed and fsync'd, then
``os.replace``'d onto the destination, which is atomic on POSIX: a reader sees the old file or
the new one, and a process killed mid-write leaves at most a stray temporary file, never a
truncated artifact. If the writer raises, the temporary file is removed and the error
propagates; the destination is untouched.

    atomic_write_text(out / "cfg.json", json.dumps(doc))      # text / bytes / JSON in hand
    with atomic_path(out / "curves.png") as tmp:               # a library that writes to a path
        fig.savefig(tmp, format="png")
    with atomic_dir(out / "best", if_exists="replace") as tmp: # a whole directory
        shutil.copytree(src, tmp, dirs_exist_ok=True)

Temporary names start with ``.`` and end with ``.tmp``; nothing in visae reads such a name
as an artifact. A process killed with ``kill -9`` cannot remove its temporary file; the next
run that writes the same output directory does: :func:`output_lock` (taken by every command
that writes an output directory: extract, train, sweep, select, name, browse) first removes
the temporary names in that directory tree whose writer process no longer runs
(:func:`remove_stale_temps`).

    with output_lock(out, "visae train"):          # one writer per output directory
        ...                                        # a second one gets OutputLockedError at once

The lock is ``<out>/.visae.lock`` held with ``filelock`` (an OS-level lock, released by the
kernel when the process dies, so a lock file left behind never blocks a later run). It is
re-entrant inside one process (``visae sweep`` selects under its own lock). Processes of one
distributed run (``RANK``) each take the lock of their rank: ``.visae.lock`` for rank 0,
``.visae.rank<r>.lock`` for the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from visae.errors import VisaeError

__all__ = ["append_lines", "save_figure", "atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_dir", "staged_dir", "temp_name",
           "remove_stale_temps", "output_lock", "OutputLockedError", "OutputPathError", "check_output_path", "set_aside",
           "LOCK_FILE"]

LOCK_FILE = ".visae.lock"
_TEMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def temp_name(path: str | Path) -> Path:
    """A fresh temporary path beside ``path``: ``.<name>.<pid>.<8 hex>.tmp`` (unique across processes and threads)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path for the caller to write ``path``'s new content to; on success rename it onto ``path``.

    Args:
        path: the destination file; its parent directory must exist.
        fsync: flush the file to disk before the rename (default). ``False`` for many small
            files that are cheap to regenerate (the toy world's images): still never partial
            after a killed process, but may be empty after a power loss.

    Raises:
        FileNotFoundError: the block wrote nothing to the temporary path.
        Whatever the block raises; the temporary file is removed first and ``path`` is unchanged.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic write of {path}: nothing was written to {tmp}")
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:  # disk full, read-only, permissions: name the destination, not the temporary
        _remove(tmp)
        if e.filename in (str(tmp), tmp):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` all-or-nothing (temp file + fsync + rename)."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` all-or-nothing."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 1, **dumps_kw: Any) -> None:
    """Write ``json.dumps(obj, indent=indent, **dumps_kw)`` to ``path`` all-or-nothing.

    The document is serialised before anything is written: an object that is not JSON-able
    raises ``TypeError`` and leaves no file behind.
    """
    atomic_write_text(path, json.dumps(obj, indent=indent, **dumps_kw))


def append_lines(path: str | Path, lines: Sequence[str], *, fsync: bool = True) -> None:
    """Append ``lines`` (each ending in a newline) to the log file ``path``, durably (fsync) by default.

    A log whose last line was cut off by a kill (no trailing newline) gets a newline first, so the new
    records stay whole and a reader that skips unparsable lines loses only the torn one."""
    if not lines:
        return
    path = Path(path)
    torn = False
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as g:
            g.seek(-1, os.SEEK_END)
            torn = g.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        if torn:
            f.write("\n")
        f.writelines(lines)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def save_figure(fig: Any, path: str | Path, *, dpi: int = 100) -> Path:
    """Save a matplotlib figure as a PNG at ``path`` atomically, then close it (also on error)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, if_exists: Literal["error", "keep", "replace"] = "error") -> Iterator[Path]:
    """Yield a fresh temporary directory for the caller to fill; on success rename it to ``path``.

    Args:
        path: the destination directory (its parent is created if missing).
        if_exists: what to do when ``path`` exists once the block is done:
            ``"error"`` raise ``FileExistsError``; ``"keep"`` keep the existing directory and drop
            the new one (several processes making the same content: the first one wins);
            ``"replace"`` swap the new one in (the old one is moved aside, then deleted; a reader
            sees the old or the new directory, except for the instant between the two renames).

    Raises:
        FileExistsError: ``path`` exists and ``if_exists="error"``.
        Whatever the block raises; the temporary directory is removed and ``path`` is unchanged.
    """
    if if_exists not in ("error", "keep", "replace"):
        raise ValueError(f"atomic_dir: if_exists must be 'error', 'keep' or 'replace', got {if_exists!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        exists = path.exists() or path.is_symlink()
        if exists and if_exists == "error":
            raise FileExistsError(f"{path} exists")
        if exists and if_exists == "replace":
            old = temp_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
            return
        try:
            os.rename(tmp, path)  # fails on an existing non-empty directory (another process made it first)
        except OSError:
            if not (path.exists() and if_exists == "keep"):
                raise
            _remove(tmp)
    except BaseException:
        _remove(tmp)
        raise


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


@contextlib.contextmanager
def staged_dir(path: str | Path, *, carry: Any = None) -> Iterator[Path]:
    """Replace directory ``path`` only once its new content is complete: build it beside, then swap.

    Yields a staging directory beside ``path`` (a :func:`temp_name`) that already holds the
    entries of the existing ``path`` that ``carry`` selects, as hard links (a copy where the
    filesystem has none), so files the caller does not rewrite (training logs, thumbnails)
    survive without copying their bytes. Rewrite a carried file only by replacing it
    (:func:`atomic_path` makes a new inode): writing into a hard-linked file in place would
    change the old directory too. The lock files of :func:`output_lock` are always carried,
    so a second writer still finds the lock held after the swap; stale temporary names never.
    When the block finishes, the staging directory is swapped in (:func:`atomic_dir`
    ``"replace"``); if it raises, or the process is killed, ``path`` is untouched (a killed
    process leaves its staging directory beside ``path``; the next ``staged_dir`` of the same
    path removes it, since its writer's pid no longer runs).

    Args:
        path: the directory to (re)write; a symlink is resolved first (its target is replaced).
        carry: ``None``: carry every entry (the block replaces what it rewrites); or a
            collection of top-level names to carry (names not present are skipped).

    Raises:
        NotADirectoryError: ``path`` exists and is not a directory.
        Whatever the block raises; the staging directory is removed and ``path`` is unchanged.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    if path.parent.is_dir():  # staging directories of this path left by a killed writer (its pid gone)
        for entry in os.scandir(path.parent):
            m = _TEMP_RE.match(entry.name)
            if m and entry.name.startswith(f".{path.name}.") and not _pid_alive(int(m.group(1))):
                _remove(Path(entry.path))
    with atomic_dir(path, if_exists="replace") as tmp:
        if path.is_dir():
            for entry in os.scandir(path):
                name = entry.name
                if _TEMP_RE.match(name):
                    continue
                is_lock = name == LOCK_FILE or (name.startswith(".visae.rank") and name.endswith(".lock"))
                if not is_lock and carry is not None and name not in carry:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.copytree(entry.path, tmp / name, symlinks=True, copy_function=_link_or_copy,
                                    ignore=lambda d, names: [n for n in names if _TEMP_RE.match(n)])
                elif entry.is_symlink():
                    os.symlink(os.readlink(entry.path), tmp / name)
                else:
                    _link_or_copy(entry.path, str(tmp / name))
        yield tmp


# ----------------------------------------------------------------------------- stale temporaries, locks


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def remove_stale_temps(root: str | Path) -> list[Path]:
    """Remove the temporary files / directories (``temp_name``'s pattern) under ``root`` whose writer is gone.

    A temporary name carries its writer's pid; one whose process no longer runs on this machine
    is a leftover of a killed writer (``kill -9``, power loss) and is deleted. Names of live
    processes (another rank of the same run, this process) are kept. Walks the whole tree
    below ``root`` without following symlinks. Returns the removed paths.
    """
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames) + filenames:
            m = _TEMP_RE.match(name)
            if m is None or _pid_alive(int(m.group(1))):
                continue
            p = Path(dirpath) / name
            _remove(p)
            removed.append(p)
            if name in dirnames:
                dirnames.remove(name)
    return removed


class OutputLockedError(VisaeError, RuntimeError):
    """Another process is writing the same output directory (exit status 1: the input is fine, wait or choose
    another ``--out``)."""

    exit_code = 1


def set_aside(path: str | Path, name: str) -> Path:
    """Move ``path`` (a file or directory) to the free sibling name ``name`` (or ``name-1``, ``name-2``, ...) in
    one rename, keeping it for inspection rather than deleting it; returns the new path. A rename within a
    directory is atomic: a kill leaves ``path`` either where it was or moved whole."""
    path = Path(path)
    k, dst = 0, path.parent / name
    while True:
        while os.path.lexists(dst):
            k += 1
            dst = path.parent / f"{name}-{k}"
        if path.is_dir():
            try:
                os.rename(path, dst)  # fails (not replaces) if another process made dst a non-empty directory meanwhile
                return dst
            except OSError:
                if not os.path.lexists(dst):
                    raise
                continue
        os.link(path, dst)  # a file: link fails if dst appeared meanwhile (rename would replace it), then unlink
        os.unlink(path)
        return dst


def check_output_path(out: str | Path, command: str = "visae", flag: str = "--out") -> None:
    """Raise :class:`OutputPathError` when output directory ``out`` (given as ``flag``) or one of its parents exists
    as a file."""
    out = Path(out)
    blocked = next((q for q in (out, *out.parents) if (q.exists() and not q.is_dir()) or (q.is_symlink() and not q.exists())),
                   None)  # a file, or a dangling link (mkdir would fail on it)
    if blocked is not None:
        what = "a dangling link" if blocked.is_symlink() and not blocked.exists() else "a file, not a directory"
        raise OutputPathError(f"{flag} {out}: {blocked} is {what}; give {command} another {flag}")


class OutputPathError(VisaeError, NotADirectoryError):
    """An output directory's path is taken by a file (``--out results.txt`` where a directory is wanted): a usage
    error (exit 2), raised before anything is written."""

    exit_code = 2


_held: dict[str, list] = {}  # lock path -> [FileLock, depth]; re-entrant within this process
_held_guard = threading.Lock()


def _lock_file(out: Path) -> Path:
    rank = os.environ.get("RANK", "0")
    return out / (LOCK_FILE if rank in ("", "0") else f".visae.rank{rank}.lock")


@contextlib.contextmanager
def output_lock(out: str | Path, command: str = "visae", *, clean_temps: bool = True,
                flag: str | None = "--out") -> Iterator[Path]:
    """Hold the writer's lock of output directory ``out`` (created if missing) for the block.

    Args:
        out: the output directory (``--out`` of the command).
        command: names the command in the error message ("visae train").
        clean_temps: once the lock is held, remove stale temporary files under ``out``
            (:func:`remove_stale_temps`).
        flag: the flag that named ``out``, for the messages (``--sweep`` for ``visae select``); None: a directory
            the command cannot be pointed elsewhere for, so the locked message only says to wait.

    When the block raises and this call created ``out`` (and its missing parents) and nothing but
    lock files was put in it, they are removed again: a command refused on bad input leaves
    nothing behind (``visae name --sae missing`` left ``concepts/.visae.lock``).

    Raises:
        OutputLockedError: another process holds the lock (a second ``visae sweep --out X``
            while one runs); raised at once, nothing is written.
        OutputPathError: ``out`` or one of its parents exists and is not a directory; nothing is written.
    """
    from filelock import FileLock, Timeout

    out = Path(out)
    check_output_path(out, command, flag or "--out")
    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first: made by this call
    out.mkdir(parents=True, exist_ok=True)
    path = _lock_file(out)
    key = str(path.resolve())
    with _held_guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is None:
        lock = FileLock(str(path), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            raise OutputLockedError(
                f"{out}: another process is writing this output directory (lock {path} is held); wait for it to "
                f"finish" + (f" or give {command} another {flag}" if flag else "")) from None
        entry = [lock, 1]
        with _held_guard:
            _held[key] = entry
        if clean_temps:
            remove_stale_temps(out)
    failed = True
    try:
        yield out
        failed = False
    finally:
        with _held_guard:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                _held.pop(key, None)
        if last and failed and created:
            _remove_created(created, path)  # still holding the lock
        if last:
            entry[0].release()


def _remove_created(created: list[Path], lock: Path) -> None:
    """Remove the directories ``created`` (deepest first) by a failed :func:`output_lock` block if they hold nothing
    but lock files: our own lock file is unlinked (others' are left, and then their directory stays)."""
    out = created[0]
    with contextlib.suppress(OSError):
        if out.is_dir() and all(f.is_file() and f.name.startswith(".visae") and f.name.endswith(".lock")
                                for f in out.iterdir()):
            lock.unlink(missing_ok=True)
        for d in created:
            if d.exists():  # (the command may have removed its directory itself)
                d.rmdir()  # only when empty; the first that is not stops the rest (OSError)
