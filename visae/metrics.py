"""Training logs: a JSONL file per SAE, optional wandb, and a PNG of the curves.

Every record is one JSON object per line in ``<sae dir>/metrics.jsonl`` with a ``type``:

- ``"train"``: example-weighted means over the interval ending at ``step`` (loss, mse, l1, l0,
  aux; explained_variance over all the interval's examples, null when undefined),
  dead_fraction, dead_since_resample_fraction, lr, l1_coeff, act_per_s; ``partial: true``
  when ``--max_steps`` cut the interval short (dropped on resume);
- ``"val"``: validation metrics at the end of an epoch (held-out split);
- ``"resample"``: dead latents resampled at the end of an epoch;
- ``"summary"``: written once at the end (throughput, final validation metrics).

wandb is optional: it is imported only when enabled (``WANDB_MODE=offline`` works without
an account); a stack of S SAEs logs to one wandb run with keys ``m<i>/<type>/<name>``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from visae.atomic import atomic_write_text, save_figure

__all__ = ["MetricsLogger", "read_metrics", "plot_curves", "import_wandb", "json_safe"]

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def import_wandb():
    """Import wandb or raise an error that says how to get it or turn it off."""
    try:
        import wandb  # noqa: PLC0415 - optional dependency, imported only when asked for
    except ImportError:
        raise RuntimeError(
            "--wandb needs the wandb package, which is not installed: `pip install wandb` "
            "(or `pip install visae[wandb]`), or run with --no_wandb (metrics still go to metrics.jsonl). "
            "With no account, set WANDB_MODE=offline."
        ) from None
    return wandb


def json_safe(v: Any) -> Any:
    """JSON-safe values, recursively through dicts, lists and tuples: non-finite floats become None (null: JSON has
    no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (a directory means ``<dir>/metrics.jsonl``); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class MetricsLogger:
    """Writes per-member records to ``<dir>/metrics.jsonl`` for each member dir, and to wandb when enabled.

    Args:
        dirs: one directory per stack member.
        wandb_cfg: None (no wandb) or a dict with ``project``, ``name``, ``config``, ``dir``
            and optionally ``id`` (to continue a run after ``--resume``).
        truncate_after_step: on resume, records with ``step`` beyond this, the summary and
            ``partial`` train records (an interval cut short by ``--max_steps``, continued after
            the resume) are dropped first so the log reads as if the run had never stopped.
    """

    def __init__(self, dirs: Sequence[str | Path], wandb_cfg: dict[str, Any] | None = None,
                 truncate_after_step: int | None = None):
        self.dirs = [Path(d) for d in dirs]
        self.files = []
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
            p = d / METRICS_FILE
            if truncate_after_step is None:
                atomic_write_text(p, "")
            else:  # atomic: a kill while the log is cut back must not lose the records before the checkpoint
                keep = [r for r in read_metrics(p) if r.get("type") != "summary" and not r.get("partial")
                        and r.get("step", 0) <= truncate_after_step]
                atomic_write_text(p, "".join(json.dumps(json_safe(r)) + "\n" for r in keep))
            self.files.append(open(p, "a"))
        self.wandb_run = None
        self.wandb_id: str | None = None
        if wandb_cfg is not None:
            wandb = import_wandb()
            kw = dict(project=wandb_cfg.get("project"), name=wandb_cfg.get("name") or None,
                      config=wandb_cfg.get("config"), dir=str(wandb_cfg.get("dir", ".")))
            if wandb_cfg.get("id"):
                kw.update(id=wandb_cfg["id"], resume="allow")
            os.makedirs(kw["dir"], exist_ok=True)
            self.wandb_run = wandb.init(**kw)
            self.wandb_id = self.wandb_run.id

    @property
    def n_members(self) -> int:
        return len(self.dirs)

    def log(self, records: Sequence[dict[str, Any]]) -> None:
        """One record per member (same ``type`` and ``step``)."""
        if len(records) != self.n_members:
            raise ValueError(f"MetricsLogger.log: {len(records)} records for {self.n_members} members")
        for f, r in zip(self.files, records):
            f.write(json.dumps(json_safe(r)) + "\n")
            f.flush()
        if self.wandb_run is not None:
            flat: dict[str, Any] = {}
            for i, r in enumerate(records):
                prefix = f"{r.get('type', 'train')}/" if self.n_members == 1 else f"m{i}/{r.get('type', 'train')}/"
                for k, v in r.items():
                    if k in ("type", "step") or not isinstance(v, (int, float)) or isinstance(v, bool):
                        continue
                    flat[prefix + k] = v
            self.wandb_run.log(flat, step=int(records[0].get("step", 0)))

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files = []
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


_PANELS = [
    ("loss", "loss"), ("mse", "MSE"), ("l1", "L1"), ("l0", "L0"),
    ("explained_variance", "explained variance"), ("dead_fraction", "dead fraction"),
    ("dense_fraction", "dense fraction"), ("lr", "learning rate"), ("l1_coeff", "lambda (L1 coeff)"),
]


def plot_curves(metrics: str | Path, out_png: str | Path | None = None) -> Path:
    """PNG of training (lines) and validation (dots) curves from a metrics.jsonl (or its directory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = Path(metrics)
    records = read_metrics(metrics)
    out_png = Path(out_png) if out_png else (metrics if metrics.is_dir() else metrics.parent) / CURVES_FILE
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val"]
    resamples = [r["step"] for r in records if r.get("type") == "resample" and r.get("n_resampled", 0) > 0]
    cols = 3
    rows = math.ceil(len(_PANELS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, _PANELS):
        for recs, style, label, color, z in ((val, "o", "val", "tab:orange", 2), (train, "-", "train", "tab:blue", 3)):
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=label, color=color, markersize=2.5, linewidth=1.2, zorder=z)
        if key == "explained_variance":
            lo = ax.get_ylim()[0]
            ax.set_ylim(max(lo, -0.2), 1.02)  # the first steps can be far below 0; keep the useful range
        for s in resamples:
            ax.axvline(s, color="grey", alpha=0.3, linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if key in ("mse", "loss", "l1") and any(r.get(key) for r in train):
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(_PANELS):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=90)
