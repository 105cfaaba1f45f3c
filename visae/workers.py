"""Worker processes for the synthetic worlds' generation: chunks done in parallel, results taken in order.

``generate_world`` (visae.toyworld) and ``generate_world2`` (visae.world2) render and write a chunk of images per
task (each image a pure function of the world's seed and its index) and return the chunk's ``world.jsonl`` lines;
the calling process records the chunks strictly in order, so the on-disk world is byte-identical whatever the
number of workers and ``world.jsonl`` only ever lists a complete prefix of chunks (a kill leaves nothing that
looks complete). The pool uses the ``spawn`` start method: a worker inherits no state of the caller (torch's
thread pools, open files), at the price of importing, once per worker, the world's module and the caller's main
module (about 0.3 s for ``visae toyworld`` or ``scripts/demo.py``; about 2 s under ``python -m visae.demo``, whose
imports pull in torch).
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from typing import Any, Callable, Iterator, Sequence

from visae.errors import VisaeError

__all__ = ["resolve_workers", "map_in_order", "record_chunks", "resume_prefix", "WorkerStartError", "RecordFileError"]


class WorkerStartError(VisaeError, RuntimeError):
    """The worker processes died before returning a result, typically because the calling script has no
    ``if __name__ == "__main__":`` guard (a spawned worker re-runs the script's top level). Exit status 1."""

    exit_code = 1


class RecordFileError(VisaeError, ValueError):
    """A generator's record file (``world.jsonl``) holds more records than the run it belongs to: another run's
    file, or a damaged one (exit status 2)."""


def resolve_workers(workers: int) -> int:
    """The number of worker processes ``workers`` asks for: itself if positive, 0 for one per CPU core this
    process may run on (``os.sched_getaffinity``, else ``os.cpu_count``).

    Raises:
        ValueError: ``workers`` negative.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: one per CPU core), got {workers}")
    if workers:
        return int(workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_IN_TASK = False  # in a worker process: whether a task is running (Ctrl-C interrupts it), else idle


def _worker_sigint(signum: int, frame: Any) -> None:
    """A worker's SIGINT handler: Ctrl-C reaches the whole process group. During a task it interrupts the task (the
    caller stops at once, the task's KeyboardInterrupt comes back as its result); an idle worker ignores it and
    exits when the caller shuts the pool down (interrupted while reading its next task from the pipe, it printed
    a traceback of a half-read message: "EOFError: Ran out of input")."""
    if _IN_TASK:
        raise KeyboardInterrupt


def _worker_init() -> None:
    import signal

    signal.signal(signal.SIGINT, _worker_sigint)


def _in_worker(fn: Callable[[Any], Any], task: Any) -> Any:
    global _IN_TASK
    _IN_TASK = True
    try:
        return fn(task)
    finally:
        _IN_TASK = False


def map_in_order(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int = 1) -> Iterator[Any]:
    """``fn(task)`` for each of ``tasks``, yielded in the order of ``tasks``.

    ``workers`` (>= 1; :func:`resolve_workers` for 0): at 1, or with a single task, everything runs in this
    process; above, in a pool of ``min(workers, len(tasks))`` spawned processes (``fn`` and the tasks must then
    be picklable: a module-level function; a script that calls this with ``workers > 1`` needs the
    ``if __name__ == "__main__":`` guard, as every spawned pool does). A task's exception is raised here when its
    turn comes; on any exit (exception, a consumer that stops early, Ctrl-C) no further task starts and the pool
    is shut down, waiting for the running ones (Ctrl-C interrupts those too).
    """
    workers = resolve_workers(workers)
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield fn(t)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n = min(workers, len(tasks))
    ex = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
    # At most one task per worker handed over at a time: a task handed over cannot be cancelled, so after Ctrl-C
    # (which interrupts the running ones too) or an error nothing more starts.
    todo = iter(tasks)
    running = deque(ex.submit(_in_worker, fn, t) for t in itertools.islice(todo, n))
    from concurrent.futures.process import BrokenProcessPool

    try:
        while running:
            try:
                result = running.popleft().result()
            except BrokenProcessPool as e:
                raise WorkerStartError(
                    f"the {n} worker processes died ({e}); a script that asks for workers > 1 (visae demo --threads, "
                    "--workers; run_demo / generate_world* from Python) must call it under 'if __name__ == \"__main__\":' "
                    "(spawned workers re-run the script's top level), or use 1 worker") from e
            for t in itertools.islice(todo, 1):
                running.append(ex.submit(_in_worker, fn, t))
            yield result
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def resume_prefix(jsonl: Any, n: int, chunk: int) -> list[str]:
    """The lines of a world's ``world.jsonl`` (``jsonl``, may be missing) that a rerun keeps: all ``n`` when the world
    is complete (a last chunk shorter than ``chunk`` is whole there), else the whole chunks (the first multiple of
    ``chunk``); the rerun renders from ``len(result)`` on.

    Raises:
        RecordFileError: more than ``n`` lines.
    """
    from pathlib import Path

    jsonl = Path(jsonl)
    lines = jsonl.read_text().splitlines() if jsonl.exists() else []
    if len(lines) > n:
        raise RecordFileError(f"{jsonl} has {len(lines)} lines but the world has n={n}: another run's file or a "
                              "damaged one; use another out_dir or delete it")
    return lines if len(lines) == n else lines[:len(lines) - len(lines) % chunk]


def record_chunks(jsonl: Any, lines: list[str], fn: Callable[[Any], list[str]], tasks: Sequence[Any], workers: int = 1,
                  progress: bool = False, desc: str = "") -> list[str]:
    """Run ``fn`` over ``tasks`` (:func:`map_in_order`; each returns a chunk's record lines) and append each chunk's
    lines to ``lines`` in task order, rewriting ``jsonl`` atomically after every chunk, so the file lists a prefix of
    whole chunks whichever worker finishes first and a kill never leaves a partial chunk recorded. ``progress``: a
    tqdm bar over the chunks. Returns ``lines``. On any error the chunks not started are cancelled and the workers
    stopped (:func:`map_in_order`'s exceptions, :class:`WorkerStartError`)."""
    from visae.atomic import atomic_write_text

    results = map_in_order(fn, tasks, workers)
    it: Iterator[list[str]] = results
    if progress and tasks:
        from tqdm import tqdm

        it = tqdm(results, total=len(tasks), desc=desc, unit="chunk")
    try:
        for chunk_lines in it:
            lines += chunk_lines
            atomic_write_text(jsonl, "\n".join(lines) + "\n")
    finally:
        results.close()  # on an error here: cancel the chunks not started, stop the workers now
    return lines
