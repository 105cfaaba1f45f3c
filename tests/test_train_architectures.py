"""Architectures own their knowledge (issue 15 item 2): a new one, declared in this file alone, trains through
`visae train` with resampling; the trainer's source names no registered architecture."""

import io
import re
import tokenize

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO
from visae import cli
from visae import train as T
from visae.metrics import read_metrics
from visae.sae import ARCHITECTURES, SAE, SAEConfig, build_sae, load_sae, register_architecture
from visae.synthetic import make_planted_dictionary, write_planted_shards

D_IN, N = 16, 4096


class LogSparseSAE(SAE):
    """Unlike the built-in ones: codes f = ReLU(pre) * exp(g) with a learned per-latent gain g = ``log_gain``
    [S, 1, d_sae] (its latent axis is 2, not 1 as for b_enc), and the sparsity term lambda * mean_b sum_j
    log(1 + f_j), logged as ``log_l1``. Resampling resets a latent's gain to 0 (gain 1)."""

    architecture = "test_logsparse"
    sparsity_metric = "log_l1"
    latent_axes = {**SAE.latent_axes, "log_gain": 2}

    def _init_extra(self) -> None:
        self.log_gain = nn.Parameter(torch.zeros(self.n_models, 1, self.d_sae, device=self.W_enc.device))

    def _reset_extra(self) -> None:
        self.log_gain.zero_()

    @torch.no_grad()
    def reset_latents_(self, mask: torch.Tensor) -> None:
        self.log_gain.masked_fill_(mask[:, None, :].to(self.log_gain.device, torch.bool), 0.0)

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * self.log_gain.exp().to(pre.dtype)

    def _train_codes(self, pre: torch.Tensor, sparsity_coeff: torch.Tensor):
        f = self._activate(pre)
        return f, sparsity_coeff * self.sparsity_metric_value(f)

    def sparsity_metric_value(self, f: torch.Tensor) -> torch.Tensor:
        return torch.log1p(f).sum(-1).mean(-1)


@pytest.fixture
def registered():
    register_architecture(LogSparseSAE)
    yield LogSparseSAE
    ARCHITECTURES.pop(LogSparseSAE.architecture, None)


def test_a_new_architecture_trains_through_visae_train_with_resampling(registered, tmp_path):
    shards = tmp_path / "shards"
    write_planted_shards(shards, n=N, dictionary=make_planted_dictionary(d=D_IN, n_atoms=32, mean_active=3, seed=0),
                         shard_size=1024)
    n_dead, d_sae = 8, 4 * D_IN
    init = build_sae(SAEConfig(architecture="test_logsparse", d_in=D_IN, d_sae=d_sae),
                     generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # latents 0..7 can never fire, and their gain is far from its reset value
        init.W_enc[:, :, :n_dead] = 0
        init.log_gain[:, :, :n_dead] = -3.0
    init.save(tmp_path / "init")
    out = tmp_path / "run"
    l1 = 1e-3
    rc = cli.main(["train", "--shards", str(shards), "--out", str(out), "--architecture", "test_logsparse",
                   "--init_from", str(tmp_path / "init"), "--expansion_factor", "4", "--num_epochs", "4",
                   "--batch_size", "256", "--lr", "3e-3", "--l1_coeff", str(l1), "--lr_warmup_steps", "5",
                   "--l1_warmup_steps", "20", "--resample_every", "2", "--log_every", "5", "--resample_examples", "2048",
                   "--no_progress", "--no_plot"])
    assert rc == 0
    recs = read_metrics(out)
    res = [r for r in recs if r["type"] == "resample"]
    assert len(res) == 1 and res[0]["n_resampled"] >= n_dead, res
    # Its own metric is logged, and the logged loss is mse + lambda * that metric (past the lambda warm-up).
    val = [r for r in recs if r["type"] == "val"]
    assert all("log_l1" in r for r in val) and val[-1]["log_l1"] > 0
    assert val[-1]["loss"] == pytest.approx(val[-1]["mse"] + l1 * val[-1]["log_l1"], rel=1e-6)
    late = [r for r in recs if r["type"] == "train" and r["step"] > 20]
    assert late and all(r["loss"] == pytest.approx(r["mse"] + l1 * r["log_l1"], rel=1e-5) for r in late)
    # Resampling reset the extra parameter of the resampled latents (gain -3 -> 0, then ~60 Adam steps of
    # lr <= 3e-3 move it by well under 1) ...
    sae = load_sae(out)
    assert isinstance(sae, LogSparseSAE)
    gain = sae.log_gain[0, 0].detach()
    assert bool((gain[:n_dead] > -1.0).all()), gain[:n_dead]
    # ... and restarted its Adam state along the declared latent axis 2.
    tensors, state = T.load_checkpoint(out / T.CHECKPOINT_DIR)
    steps = tensors[f"opt.step.{state['param_names'].index('log_gain')}"]
    assert steps.shape == (1, 1, d_sae)
    total, at = state["step"], res[0]["step"]
    assert torch.all(steps[0, 0, :n_dead] == total - at), steps[0, 0, :n_dead]
    assert int((steps[0, 0, n_dead:] == total).sum()) > 0
    x = torch.from_numpy(np.asarray(T.ShardSet(shards).read(np.arange(N))))
    assert bool(((sae.encode(x) > 0).sum(0)[:n_dead] > 0).all())  # the forced-dead latents fire again


def test_an_undeclared_parameter_is_refused_before_training(registered):
    class Undeclared(LogSparseSAE):
        architecture = "test_undeclared"
        latent_axes = SAE.latent_axes  # forgets log_gain

    sae = Undeclared(SAEConfig(architecture="test_undeclared", d_in=4, d_sae=8))
    with pytest.raises(ValueError, match="'log_gain' has no entry in latent_axes"):
        sae.latent_axis("log_gain")


def _words(path):
    """Identifiers and the words of string literals (docstrings included) of a source file; comments excluded."""
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.NAME:
            yield tok.string, tok.start[0]
        elif tok.type == tokenize.STRING:
            for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", tok.string):
                yield w, tok.start[0]


def test_the_trainer_names_no_registered_architecture():
    """Every module of visae/train/ (code, strings and docstrings) knows architectures only through what the
    SAE classes declare; the flags' default and help text come from the SAE package."""
    names = set(ARCHITECTURES)
    assert {"relu", "topk", "batchtopk", "jumprelu"} <= names
    files = sorted((REPO / "visae" / "train").glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "config.py", "trainer.py", "steps.py", "state.py", "data.py"}
    hits = [f"{p.relative_to(REPO)}:{line}: {w}" for p in files for w, line in _words(p) if w in names]
    assert not hits, hits
