"""The ``--device`` of every command, checked the same way: its spelling when the flags are parsed, its
availability on this machine before the stage reads or writes anything.

A config's ``__post_init__`` calls :func:`check_device` (a name torch cannot parse, ``--device banana``, is a
usage error there; a recorded config naming ``cuda`` still loads on a machine without one, e.g. for ``visae
select`` on a sweep trained elsewhere). The stage calls :func:`resolve_device` first, which refuses a device
this machine does not have (``cuda`` without CUDA, ``cuda:3`` with two GPUs, ``mps`` off Apple silicon) with a
one-line :class:`visae.config.ConfigError` (exit 2) instead of torch's traceback mid-run.
"""

from __future__ import annotations

from typing import Any

from visae.config import ConfigError

__all__ = ["check_device", "resolve_device"]

_EXAMPLES = "cpu, cuda, cuda:1, mps or auto"


def check_device(name: str, field: str) -> None:
    """Raise ConfigError naming ``field`` when ``name`` is neither ``"auto"`` nor a device torch can parse."""
    if name == "auto":
        return
    import torch

    try:
        torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{field} {name!r}: not a torch device (expected {_EXAMPLES})") from None


def resolve_device(name: str, field: str = "--device", local_rank: int = 0) -> Any:
    """The ``torch.device`` that ``name`` means on this machine: ``"auto"`` is the GPU of this process's
    ``local_rank`` when CUDA is available, else the CPU.

    Raises:
        ConfigError: ``name`` is not a device (:func:`check_device`), or names one this machine lacks (CUDA not
            available, a GPU index past the last, MPS not available), naming ``field`` and what to use instead.
    """
    import torch

    check_device(name, field)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{field} {name}: CUDA is not available on this machine (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{field} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"{field} {name}: MPS is not available on this machine (use --device cpu or auto)")
    elif dev.type != "cpu":
        raise ConfigError(f"{field} {name}: visae runs on {_EXAMPLES}, not {dev.type!r}")
    return dev
