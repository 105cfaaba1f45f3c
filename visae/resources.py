"""Where the shipped data lives: the default configs (``configs/*.yaml``) and assets (``assets/toyclip/``).

In the repository they are the top-level ``configs/`` and ``assets/`` directories; a wheel
ships them inside the package as ``visae/configs`` and ``visae/assets`` (pyproject's
``package-dir`` mapping). :func:`shipped_dir` returns the packaged copy when there is one
(``pip install .``) and the repository's otherwise (editable install, source checkout).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["shipped_dir", "config_yaml", "REPO"]

REPO = Path(__file__).resolve().parents[1]  # the repository root when running from a checkout
_NAMES = ("configs", "assets")


def shipped_dir(name: str) -> Path:
    """The directory ``name`` ("configs" or "assets"): inside the installed package, else in the repository."""
    if name not in _NAMES:
        raise ValueError(f"shipped_dir: unknown directory {name!r}, expected one of {_NAMES}")
    packaged = resources.files("visae").joinpath(name)
    if packaged.is_dir():
        return Path(str(packaged))  # a plain directory on disk (visae is not installed zipped)
    return REPO / name


def config_yaml(name: str) -> Path:
    """The default YAML config ``name`` (e.g. ``"train_sae.yaml"``) of a stage."""
    return shipped_dir("configs") / name
