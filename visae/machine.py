"""What machine a benchmark ran on, recorded next to its figures (BENCHMARKS.md asks for it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["machine_info", "describe_machine"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch version and threads, python, load average now, CUDA device (or None)."""
    import torch

    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def describe_machine() -> str:
    """One line: ``<cpu>, <n> cores, torch <v> (<t> threads), python <v>[, <gpu>], load <1-min>``."""
    m = machine_info()
    load = m["load_average_1_5_15min"]
    return (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), python {m['python']}"
            + (f", {m['cuda']}" if m["cuda"] else "") + (f", load average {load[0]}" if load else ""))
