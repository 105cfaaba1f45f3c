"""Log records of other libraries that say nothing to a visae user.

open_clip warns "No pretrained weights loaded for model ... Model initialized randomly." on the root logger whenever
a model is built without weights; where visae asks for the random init on purpose (``random_init=True``, a trainer
that loads its own weights or checkpoint next) that line would only mislead.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

__all__ = ["quiet_random_init"]


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def quiet_random_init(active: bool) -> Iterator[None]:
    """While the block runs, drop open_clip's "initialized randomly" warning from the root logger when ``active``
    (other records pass)."""
    f = _DropRandomInitWarning()
    root = logging.getLogger()
    if active:
        root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)
