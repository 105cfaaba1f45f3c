"""The project's error base class.

Every error visae raises on purpose (bad input, a missing or malformed artifact, a config a
stage cannot run) derives from :class:`VisaeError`, so a caller can catch them all at once and
tell them apart from bugs: ``visae.cli`` catches ``VisaeError`` once, prints one line
(``visae <command>: error: <message>``) and exits with the error's ``exit_code``.

The stage errors keep their own modules and also derive from the builtin that fits them
(``ValueError`` for bad values, ``FileNotFoundError`` for missing weights), so code that
caught those builtins before still catches them:

    ConfigError (visae.config)      ShardError (visae.shards)       SAEFormatError (visae.sae.base)
    TrainError (visae.train)        SweepError (visae.sweep)        SelectError (visae.select)
    ZeroShotError (visae.zeroshot)  NamingError (visae.naming)      BackboneError (visae.backbones)
    SourceError (visae.images)      WeightsNotAvailableError (visae.backbones)

``tests/test_imports.py`` checks that every public exception class of the package derives
from ``VisaeError``.
"""

from __future__ import annotations

__all__ = ["VisaeError", "Interrupted"]


class VisaeError(Exception):
    """Base of every error visae raises on purpose; its message names the file / field and what was expected.

    ``exit_code`` is the command line's exit status for it: 1 (the command could not do its
    work) unless a subclass says otherwise (``ConfigError``, a usage error: 2).
    """

    exit_code: int = 1


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a long job, with what was saved and how to continue as its message.

    A ``KeyboardInterrupt`` (so code that catches that still does); ``visae.cli`` prints its
    message on one line and exits with status 130 (128 + SIGINT), as a shell does.
    """
