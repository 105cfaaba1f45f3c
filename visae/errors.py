"""The project's error base class.

Every error visae raises on purpose (bad input, a missing or malformed artifact, a config a
stage cannot run) derives from :class:`VisaeError`, so a caller can catch them all at once and
tell them apart from bugs: ``visae.cli`` (and each stage's ``main``, through :func:`report`) prints it as
one line (``visae <command>: error: <message>``) and exits with the error's ``exit_code``, the same
in every command for the same kind of fault:

- **2**: what the command was given is wrong -- a flag, a config file, or an artifact a flag names
  (missing, malformed, made for something else). Fix the input and rerun.
- **1**: the command is right but its surroundings stopped it, and the same command can be rerun
  once they are fixed: another process holds the output (``OutputLockedError``), worker processes
  died (``WorkerStartError``), the network or the hub failed or is switched off
  (``HubUnreachableError``), pretrained weights are not on this machine and cannot be downloaded
  (``WeightsNotAvailableError``; a checkpoint file that a flag names and that does not exist is
  ``MissingCheckpointError``, 2); ``visae.cli`` also gives 1 for an ``OSError`` of the machine (disk
  full, permissions).
- **130**: Ctrl-C (:class:`Interrupted`).

A plain ``ValueError`` / ``TypeError`` that is not a ``VisaeError`` is a bug (or a library function
called with wrong arguments) and keeps its traceback.

The stage errors keep their own modules and also derive from the builtin that fits them
(``ValueError`` for bad values, ``FileNotFoundError`` for missing weights), so code that
caught those builtins before still catches them:

    ConfigError (visae.config)      ShardError (visae.shards)       SAEFormatError (visae.sae.base)
    TrainError (visae.train)        SweepError (visae.sweepdir)     SelectError (visae.select)
    ZeroShotError (visae.zeroshot)  NamingError (visae.naming)      BackboneError (visae.backbones)
    SourceError (visae.images)      WeightsNotAvailableError, MissingCheckpointError (visae.backbones)
    CBMError (visae.cbm)            BrowseError (visae.browse)      RecoveryError (visae.recovery)
    TopImagesError (visae.topimages)  WorldError (visae.toyworld)   DivergedError (visae.toyclip)
    SpliceError (visae.splice)      InteropError, HubError, HubUnreachableError (visae.interop)
    PatchRecoveryError (visae.patch_recovery)  OutputLockedError, OutputPathError (visae.atomic)
    WorkerStartError, RecordFileError (visae.workers)

``tests/test_imports.py`` checks that every public exception class of the package derives
from ``VisaeError``.
"""

from __future__ import annotations

import os
import sys

__all__ = ["VisaeError", "Interrupted", "one_line", "report"]


class VisaeError(Exception):
    """Base of every error visae raises on purpose; its message names the file / field and what was expected.

    ``exit_code`` is the command line's exit status for it: 2 (what the command was given is wrong)
    unless a subclass says the command could not finish with good input (1; the module docstring).
    """

    exit_code: int = 2


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a long job, with what was saved and how to continue as its message.

    A ``KeyboardInterrupt`` (so code that catches that still does); ``visae.cli`` prints its
    message on one line and exits with status 130 (128 + SIGINT), as a shell does.
    """


def one_line(e: BaseException) -> str:
    """The error's message on one line (its own line breaks become '; ')."""
    return "; ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__


def report(prog: str, e: VisaeError) -> int:
    """Print ``<prog>: error: <message on one line>`` on stderr and return ``e.exit_code`` (a stage's ``main``
    ends with ``except VisaeError as e: return report(prog, e)``). With ``VISAE_TRACEBACK=1`` in the environment
    it raises ``e`` instead, traceback and all."""
    if os.environ.get("VISAE_TRACEBACK"):
        raise e
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
    return int(getattr(e, "exit_code", 2))
