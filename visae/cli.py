"""The ``visae`` console entry point: one subcommand per pipeline stage.

Each stage module exposes ``main(argv: list[str] | None = None) -> int``; this file only
dispatches, importing the stage lazily so ``visae --help`` stays fast. A project error
(``visae.errors.VisaeError``) that reaches it is printed as one line,
``visae <command>: error: <message>``, and the command exits with the error's ``exit_code``
(2 when the command's input must change, 1 when its surroundings stopped it: the rule is
``visae.errors``). ``VISAE_TRACEBACK=1`` shows the traceback
instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

from visae.errors import VisaeError, one_line, report

# subcommand -> (module, or "module:function" for an entry point other than the module's main; one-line description)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("visae.demo", "end to end on the synthetic world: generate, extract, sweep, select, name, browse"),
    "extract": ("visae.extract", "run a vision model over images and write a shard set of activations"),
    "train": ("visae.train", "train an SAE on a shard set"),
    "sweep": ("visae.sweep", "train a grid of SAEs (lr x lambda x expansion) and select the best"),
    "select": ("visae.select", "re-select the best SAE of a sweep under constraints, without retraining"),
    "zeroshot": ("visae.zeroshot", "zero-shot accuracy of a labelled shard set and of SAE reconstructions"),
    "name": ("visae.naming", "name each SAE latent by matching its decoder direction to text embeddings"),
    "browse": ("visae.browse", "write (and optionally serve) a static site of named concepts with top images"),
    "toyworld": ("visae.toyworld", "generate images of the synthetic world with their factor labels"),
    "train-toy-clip": ("visae.toyclip", "train the project's small CLIP on the synthetic world"),
    "train-toy-clip2": ("visae.toyclip:main_v2", "train the v2 toy CLIP on world2 (world2's shipped model: --config "
                        "configs/toy_clip_v2_reg4.yaml)"),
    "tune-toy-clip-text": ("visae.toyclip_text", "stage 2 of visae-toyclip2: tune its text tower alone against sub-word inheritance"),
    "cbm": ("visae.cbm", "concept bottleneck classifier over named SAE concepts: accuracy, explanations, interventions"),
    "recovery": ("visae.recovery", "score how well an SAE recovers the synthetic world's known concepts (AUROC, naming)"),
    "patch-recovery": ("visae.patch_recovery", "patch-token SAE on a synthetic world: does a concept's heat lie on the object's box / mask"),
    "push": ("visae.interop.hub", "upload an SAE directory to the Hugging Face hub in SAELens's layout (load_sae('hf://...'))"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: visae <command> [--help] [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from visae import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"visae: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_main(f"visae {name}", lambda args: entry_point(name)(args), rest)


def entry_point(name: str) -> Callable[[list[str]], int | None]:
    """The function ``visae <name>`` runs: the ``main`` of the module of :data:`SUBCOMMANDS`, or the function its
    ``"module:function"`` names (imported only now, so ``visae --help`` stays fast)."""
    module, _, function = SUBCOMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), function or "main")


def run_main(prog: str, fn: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """``fn(argv)`` (a stage's ``main``) with the command line's error handling, messages prefixed by ``prog`` (``"visae
    sweep"``, ``"python -m visae.world2"``): a ``VisaeError`` is one line on stderr
    and its exit code (2 by default, ``visae.errors``), Ctrl-C one line saying what was kept and how to continue (exit 130), an
    ``OSError`` of the machine (disk full, permissions) one line (exit 1); ``VISAE_TRACEBACK=1`` shows the traceback
    instead. ``visae <command>`` runs every stage through it, and so does each module's ``python -m visae.<module>``.
    ``argv`` defaults to ``sys.argv[1:]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def one_line_warning(message, category, filename, lineno, line=None):  # noqa: ANN001 (warnings' signature)
        # visae's own warnings are messages for the user ("visae train: warning: ..."), not a source line to debug;
        # other packages' (torch's, also under a checkout named visae) keep Python's format
        if issubclass(category, (UserWarning, RuntimeWarning)) and os.path.abspath(str(filename)).startswith(package):
            return f"{prog}: warning: {one_line(message)}\n"
        return default_format(message, category, filename, lineno, line)

    default_format = warnings.formatwarning
    warnings.formatwarning = one_line_warning
    try:
        return int(fn(argv) or 0)
    except VisaeError as e:
        return report(prog, e)
    except KeyboardInterrupt as e:  # Ctrl-C: what was saved and how to continue (visae.errors.Interrupted), no traceback
        if os.environ.get("VISAE_TRACEBACK"):
            raise
        note = one_line(e) if str(e) else "nothing more was written; rerun the same command to continue"
        print(f"{prog}: interrupted: {note}", file=sys.stderr)
        return 130
    except OSError as e:  # the machine refused: disk full, read-only, permissions (visae.atomic removed its temp file)
        if os.environ.get("VISAE_TRACEBACK"):
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        if isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
            hint = "check the path (a missing file, or a file where a directory is wanted) and rerun"
        else:
            hint = "free space or fix the path's permissions and rerun the same command (it continues from what was committed)"
        print(f"{prog}: error: {e.strerror or e}{where}; {hint}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = default_format


if __name__ == "__main__":
    sys.exit(main())
