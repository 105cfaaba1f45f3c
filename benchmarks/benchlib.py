"""What every benchmark shares: this checkout on the path, alternating repeats, medians, the machine record, JSON out.

Benchmarks live in ``benchmarks/``, outside the package: ``python benchmarks/bench_<x>.py``.
Each one imports this module first (it puts this checkout's ``visae`` ahead of any installed
copy), measures its cases with :func:`alternate`, and ends with :func:`report`, which adds the
machine record and the exact command to the result, prints it as JSON and writes it to
``--json`` when given. BENCHMARKS.md gives each figure with its command and machine.

Why alternate: on a shared machine the load drifts during a run. Running every case once per
round, in an order reversed every other round, exposes every case to the same drift; medians
over rounds and medians of per-round ratios are then comparable (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's visae, even when another copy is installed
    sys.path.insert(0, str(REPO))

__all__ = ["REPO", "alternate", "median", "median_ratio", "summary", "machine_info", "describe_machine", "report",
           "toy_model_and_weights", "check_made_with", "MadeWithOtherWeights"]


def alternate(cases: Mapping[str, Callable[[], Any]], repeats: int, *, verbose: bool = True) -> dict[str, list[Any]]:
    """Run every case once per round for ``repeats`` rounds, the order reversed on odd rounds.

    A case is a callable with no arguments. If it returns None, its wall-clock seconds
    (``time.perf_counter``) are recorded; otherwise what it returns (its own measurement: a
    rate, a dict of figures) is. Returns ``{case: [one value per round]}`` in round order.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(cases)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            got = cases[name]()
            value = time.perf_counter() - t0 if got is None else got
            out[name].append(value)
            if verbose:
                print(f"  round {r + 1}/{repeats} {name}: {_short(value, got is None)}", file=sys.stderr, flush=True)
    return out


def _short(value: Any, seconds: bool) -> str:
    if seconds:
        return f"{value:.4g} s"
    if isinstance(value, (int, float)):
        return f"{value:.4g}"
    if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value):
        return ", ".join(f"{v:.4g}" for v in value)
    return "done"


def median(values: Sequence[float | None]) -> float:
    """Median of the values that are not None (nan when none is)."""
    xs = [float(v) for v in values if v is not None]
    return statistics.median(xs) if xs else float("nan")


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num[i] / den[i]: the ratio of two cases measured side by side."""
    if len(num) != len(den):
        raise ValueError(f"median_ratio: {len(num)} values against {len(den)}")
    return median([a / b for a, b in zip(num, den)])


def summary(results: Mapping[str, Sequence[float]], unit: str = "s") -> dict[str, dict[str, Any]]:
    """``{case: {"median_<unit>": median, "<unit>": [values]}}`` for results of plain numbers."""
    return {name: {f"median_{unit}": median(vals), unit: list(vals)} for name, vals in results.items()}


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its reaped children (DataLoader workers), in seconds."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _revision() -> str | None:
    """This checkout's commit, with "+modified" when visae/ has uncommitted changes (None outside git)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "visae"], capture_output=True, text=True, cwd=REPO,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+modified" if dirty else "")) or None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch version and threads, OMP_WAIT_POLICY, python, load average now, CUDA device, commit."""
    import torch

    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "visae_commit": _revision()}


def describe_machine(m: Mapping[str, Any] | None = None) -> str:
    """One line: ``<cpu>, <n> cores, torch <v> (<t> threads), python <v>[, <gpu>], load average <1-min>``."""
    m = machine_info() if m is None else m
    load = m.get("load_average_1_5_15min")
    return (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), python {m['python']}"
            + (f", {m['cuda']}" if m.get("cuda") else "") + (f", load average {load[0]}" if load else ""))


def report(name: str, result: dict[str, Any], json_path: str | None = None, argv: Sequence[str] | None = None,
           *, echo: bool = True) -> dict[str, Any]:
    """Add ``machine`` and ``command`` to ``result``, print it as JSON (``echo``), write it to ``json_path``; return it.

    ``name`` is the benchmark's file (``bench_sweep.py``); ``argv`` its arguments (default: sys.argv[1:]).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    result = {**result, "machine": machine_info(), "command": " ".join(["python", f"benchmarks/{name}", *args])}
    text = json.dumps(result, indent=1, default=str)
    if echo:
        print(text)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        from visae.atomic import atomic_write_text

        atomic_write_text(path, text + "\n")
    return result


# ----------------------------------------------------------------------------- toy CLIP weights of a benchmark


def toy_model_and_weights(model: str | None, weights: str | None, default_model: str,
                          allowed: Sequence[str] | None = None) -> tuple[str, str]:
    """The toy CLIP architecture and weights file a benchmark runs: ``weights`` given, its architecture is the
    ``model`` of its safetensors metadata (``visae.toyclip.export_fp16`` records it), which a given ``model`` must
    equal; no ``weights``, the shipped file of ``model`` (default ``default_model``, ``visae.toyclip.SHIPPED_WEIGHTS``).
    Checked before any work, so a benchmark is not run on one model's weights under the other's name.

    Raises:
        ValueError: a missing or unreadable weights file, a ``model`` other than the file's, a model outside
            ``allowed``, no shipped weights for ``model`` in this checkout (each message names the flag).
    """
    from visae import toyclip

    recorded = None
    if weights:
        if not Path(weights).is_file():
            raise ValueError(f"--weights {weights}: no such file")
        if not str(weights).endswith(".safetensors"):
            raise ValueError(f"--weights {weights}: not a .safetensors file (a toy CLIP's weights are the .safetensors "
                             "file visae.toyclip.export_fp16 writes, not its card or a training checkpoint)")
        try:
            recorded = toyclip.recorded_model(weights)
        except ValueError as e:
            raise ValueError(f"--weights {weights}: not a readable safetensors file ({e})") from None
        if model and recorded and model != recorded:
            raise ValueError(f"--weights {weights} holds {recorded!r} weights (its safetensors metadata), not --model {model!r}")
    model = model or recorded or default_model
    if allowed is not None and model not in allowed:
        raise ValueError(f"--model {model!r}: this benchmark runs {' or '.join(allowed)}")
    if not weights:
        shipped = toyclip.SHIPPED_WEIGHTS.get(model)
        if shipped is None or not Path(shipped).is_file():
            raise ValueError(f"no shipped weights for {model} in this checkout; pass --weights FILE")
        weights = str(shipped)
    return model, str(weights)


class MadeWithOtherWeights(ValueError):
    """A benchmark's reusable output (a demo, a shard set) was made with another model or weights file."""


def check_made_with(path: Path, record: Mapping[str, Any], model: str, weights: str) -> None:
    """Refuse to reuse an output whose record (a shard manifest's ``source``, a demo's config: ``model`` and
    ``pretrained``) names another model or weights file than ``model`` / ``weights``; a ``pretrained`` of None or
    ``"shipped"`` stands for the model's shipped file.

    Raises:
        MadeWithOtherWeights: naming ``path``, both models and both weights.
    """
    from visae import toyclip

    rec_model, rec_w = record.get("model"), record.get("pretrained")
    shipped = toyclip.SHIPPED_WEIGHTS.get(rec_model)
    rec_file = shipped if rec_w in (None, "shipped") else rec_w
    same = rec_model == model and rec_file is not None and Path(rec_file).resolve() == Path(weights).resolve()
    if not same:
        raise MadeWithOtherWeights(f"{path}: made with {rec_model} ({rec_w or 'shipped'}), not {model} ({weights}); "
                                   "use another --out")
