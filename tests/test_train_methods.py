"""The trainer computes what the cited methods say (issue 10): resampling draws, validation through the
inference path, bit-identical resume in the sparse regime, metrics on degenerate batches, runs that cannot
have learnt."""

import json
import warnings

import numpy as np
import pytest
import torch

from tolerances import assert_close_derived
from visae import train as T
from visae.metrics import read_metrics
from visae.sae import SAEConfig, build_sae, kernels, load_sae
from visae.shards import ShardSet, ShardWriter
from visae.synthetic import make_planted_dictionary, write_planted_shards

D_IN, N = 32, 8192
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted") / "shards"
    write_planted_shards(path, n=N, dictionary=make_planted_dictionary(d=D_IN, n_atoms=64, mean_active=3, seed=0),
                         shard_size=2048)
    return path


def _cfg(shards, out, **kw):
    base = dict(shards=str(shards), out=str(out), num_epochs=4, batch_size=256, expansion_factor=4, lr=3e-3,
                l1_coeff=1e-2, lr_warmup_steps=10, l1_warmup_steps=30, resample_every=2, log_every=10,
                progress=False, plot=False, resample_examples=2048, init_examples=2048)
    base.update(kw)
    return T.TrainConfig(**base)


def _train_records(d):
    return [{k: v for k, v in r.items() if k != "act_per_s"} for r in read_metrics(d) if r["type"] == "train"]


# ----------------------------------------------------------------------------- item 2: resampling


def test_resampling_draws_inputs_with_probability_loss_squared(tmp_path):
    """Half the inputs have squared error 2, half 1: p ~ loss^2 picks the first half 4x as often (not 2x)."""
    d, d_sae, n_each = 4, 1000, 20000
    rows = np.concatenate([np.tile(np.sqrt(2.0) * np.eye(d)[0], (n_each, 1)), np.tile(np.eye(d)[1], (n_each, 1))])
    with ShardWriter(tmp_path / "s", d, dtype="float32", shard_size=8192, normalization="none") as w:
        w.add(rows.astype(np.float32), ids=[str(i) for i in range(len(rows))])
    view = ShardSet(tmp_path / "s").all()
    sae = build_sae(SAEConfig(d_in=d, d_sae=d_sae, input_normalization="none"))
    with torch.no_grad():  # x_hat = 0: the per-input squared error is ||x||^2 = 2 or 1
        for p in sae.parameters():
            p.zero_()
    names = [n for n, _ in sae.named_parameters()]
    params = [p for _, p in sae.named_parameters()]
    opt = T.StackedAdam(params, lr=1e-3, latent_axes=[T._latent_axis(n, p, d_sae) for n, p in zip(names, params)])
    dead = torch.ones(1, d_sae, dtype=torch.bool)
    n = T.resample_dead_latents(sae, opt, dead, view, T.TrainConfig(resample_examples=2 * n_each, seed=1), tag=2,
                                batch_size=4096)
    assert n.tolist() == [d_sae]
    # What was drawn, read from what the resampler wrote: decoder row e0 (high error) or e1 (low error).
    W = sae.W_dec[0].detach()
    # which input a row is: its entries are 0 or 1 up to rounding, so 0.5 separates them (no precision check)
    high = int((W[:, 0] > 0.5).sum())
    low = int((W[:, 1] > 0.5).sum())
    assert high + low == d_sae
    # loss^2 / sum loss^2: P(high) = 4 / (4 + 1) = 0.8 (p ~ loss would give 2/3, 667 draws: 10 sigma away).
    # Drawing 1000 of 40000 without replacement shifts the mean by < 0.5%; bound: 4 binomial sigma.
    p_high = 0.8
    sigma = (d_sae * p_high * (1 - p_high)) ** 0.5
    assert abs(high - d_sae * p_high) <= 4 * sigma, (high, low, d_sae * p_high, sigma)


# ----------------------------------------------------------------------------- item 4: BatchTopK validation


def test_batchtopk_validation_metrics_equal_the_exported_sae(planted, tmp_path):
    out = T.train(_cfg(planted, tmp_path / "btk", architecture="batchtopk", k=4, l1_coeff=0.0, num_epochs=2,
                       resample_every=0))
    val_rec = [r for r in read_metrics(out) if r["type"] == "val"][-1]
    sae = load_sae(out).exported()
    _, val = ShardSet(planted).split(0.1, seed=0)
    x = torch.from_numpy(val.read(np.arange(len(val))))
    with torch.no_grad():
        x_hat, f = sae(x)
    l0 = float((f > 0).sum(-1).double().mean())
    xd = x.double()
    ev = float(1 - (xd - x_hat.double()).square().sum() / (xd - xd.mean(0)).square().sum())
    # Same path, other batching: L0 may differ by codes within rounding of the threshold (none expected);
    # EV by float32 rounding of the decode (d_sae summed terms of unit-scale values per element).
    tol_ev = 4 * sae.d_sae * EPS32
    assert abs(val_rec["l0"] - l0) <= 1.0 / len(val), (val_rec["l0"], l0)
    assert abs(val_rec["explained_variance"] - ev) <= tol_ev, (val_rec["explained_variance"], ev, tol_ev)
    # The training-time batch top-k would say exactly k: the logged value is the inference path's.
    train_l0 = [r["l0"] for r in read_metrics(out) if r["type"] == "train"][-1]
    # exactly k codes a row: an example-weighted mean of integer counts (a few float32 roundings of size 4)
    assert_close_derived(train_l0, 4.0, n_terms=4, scale=4.0, dtype=torch.float32, computations=1, msg="train L0")
    assert abs(val_rec["l0"] - 4.0) > 1e-3, (train_l0, val_rec["l0"])  # asserts a difference (not rounding)
    assert json.loads((out / "cfg.json").read_text())["extra"]["val"]["l0"] == val_rec["l0"]


# ----------------------------------------------------------------------------- items 5 + 8: resume


@pytest.mark.parametrize("how", ["max_steps", "exception"])
def test_resume_is_bit_identical_in_the_sparse_regime_and_logs_the_same_records(planted, tmp_path, monkeypatch, how):
    """ReLU codes get sparse (the auto impl switches to the sparse kernels); a run stopped mid-interval by
    --max_steps (or killed, resuming from the end-of-epoch checkpoint, also mid-interval) and resumed equals
    the uninterrupted run: weights, checkpoint tensors and every train record."""
    sparse_steps = []
    orig = kernels.sparse_training_loss

    def spy(*a, **kw):
        if torch.is_grad_enabled():
            sparse_steps.append(1)
        return orig(*a, **kw)

    monkeypatch.setattr(kernels, "sparse_training_loss", spy)
    kw = dict(expansion_factor=16, l1_coeff=5e-2)  # d_sae 512: sparse once L0 < 0.02 * 512
    ref = T.train(_cfg(planted, tmp_path / "ref", **kw))
    n_ref = len(sparse_steps)
    steps_per_epoch = -(-int(round(N * 0.9)) // 256)
    cut = steps_per_epoch * 2 + 7  # inside epoch 3, after the resampling, not on a log step
    assert cut % 10 != 0
    out = tmp_path / "resumed"
    if how == "max_steps":
        T.train(_cfg(planted, out, max_steps=cut, **kw))
        since = cut % 10  # steps since the last log (step 60)
    else:
        orig_step, calls = T.StackedAdam.step, {"n": 0}

        def flaky(self, lr=None):
            calls["n"] += 1
            if calls["n"] == cut:
                raise KeyboardInterrupt("simulated kill")
            return orig_step(self, lr)

        monkeypatch.setattr(T.StackedAdam, "step", flaky)
        with pytest.raises(KeyboardInterrupt):
            T.train(_cfg(planted, out, **kw))
        monkeypatch.setattr(T.StackedAdam, "step", orig_step)
        since = (2 * steps_per_epoch) % 10  # the checkpoint at the end of epoch 2 (step 58), 8 steps after step 50
    _, st = T.load_checkpoint(out / T.CHECKPOINT_DIR)
    assert st["kernel"]["last_active_frac"] < 0.02, st["kernel"]  # the next step takes the sparse path
    n_train = N - int(round(N * 0.1))
    short = n_train - (steps_per_epoch - 1) * 256  # the epoch's last batch
    n_since = since * 256 if how == "max_steps" else (since - 1) * 256 + short
    assert st["log"]["steps"] == since and st["log"]["n"] == n_since, st["log"]
    T.train(_cfg(planted, out, resume=True, **kw))
    assert n_ref > 20, n_ref
    if how == "max_steps":  # the two halves take the sparse kernels exactly where the uninterrupted run did
        assert len(sparse_steps) == 2 * n_ref, (n_ref, len(sparse_steps))
    a, b = load_sae(ref).state_dict(), load_sae(out).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, float((a[k] - b[k]).abs().max()))
    ta, _ = T.load_checkpoint(ref / T.CHECKPOINT_DIR)
    tb, _ = T.load_checkpoint(out / T.CHECKPOINT_DIR)
    for k in ta:
        if not k.startswith("rng."):
            assert torch.equal(ta[k], tb[k]), k
    ra, rb = _train_records(ref), _train_records(out)
    assert ra == rb, [(x, y) for x, y in zip(ra, rb) if x != y][:2]
    assert not any(r.get("partial") for r in rb)


# ----------------------------------------------------------------------------- item 8: degenerate batches


def _write(path, rows, **kw):
    with ShardWriter(path, rows.shape[1], dtype="float32", shard_size=4096, **kw) as w:
        w.add(rows.astype(np.float32), ids=[str(i) for i in range(len(rows))])
    return ShardSet(path)


def test_one_row_batches_and_splits_give_finite_or_null_explained_variance(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(3 * 64 + 1 + 1, 16))  # train: 3 full batches + 1 row; val: 1 row
    ss = _write(tmp_path / "s", rows)
    train_view = T.ShardView(ss, np.arange(3 * 64 + 1))
    val_view = T.ShardView(ss, np.array([3 * 64 + 1]))
    cfg = _cfg(tmp_path / "s", tmp_path / "o", batch_size=64, num_epochs=2, log_every=4, resample_every=0,
               expansion_factor=2, init_examples=64)
    with pytest.warns(RuntimeWarning, match="explained variance is undefined over 1 example"):
        T.train_stack((train_view, val_view), T.sae_config_for(cfg, ss), [3e-3], [1e-2], cfg)
    recs = read_metrics(tmp_path / "o")
    train = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in train] == [4, 8]  # the 1-row batch is one example of its interval
    # Interval EV over the interval's examples: finite and meaningful (was -1e13 with a 1-row batch).
    assert all(np.isfinite(r["explained_variance"]) and -1.5 < r["explained_variance"] <= 1.0 for r in train), train
    val = [r for r in recs if r["type"] == "val"]
    assert all(r["explained_variance"] is None for r in val)  # 1 row: undefined, null (with the warning)
    doc = json.loads((tmp_path / "o" / "cfg.json").read_text())
    assert doc["extra"]["val"]["explained_variance"] is None
    assert "held-out EV undefined" in T.format_summary(tmp_path / "o")
    # log_every 1: the interval of the 1-row batch alone is undefined -> null with a warning.
    cfg1 = _cfg(tmp_path / "s", tmp_path / "o1", batch_size=64, num_epochs=1, log_every=1, resample_every=0,
                expansion_factor=2, init_examples=64)
    with pytest.warns(RuntimeWarning, match="training interval ending at step 4"):
        T.train_stack((train_view, val_view), T.sae_config_for(cfg1, ss), [3e-3], [1e-2], cfg1)
    evs = [r["explained_variance"] for r in read_metrics(tmp_path / "o1") if r["type"] == "train"]
    assert evs[3] is None and all(np.isfinite(v) for v in evs[:3]), evs


def test_interval_metrics_are_example_weighted():
    """Two steps of 3 and 1 rows: the interval mean weights rows, and EV is over the 4 rows with their mean."""
    log = T._IntervalLog(1, 2, torch.device("cpu"))
    x1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x2 = torch.tensor([[2.0, 2.0]])

    class Out:
        def __init__(self, x, mse):
            self.mse, self.l1, self.l0, self.aux = (torch.tensor([mse]),) * 4
            self.sq_err = torch.full((1, x.shape[0]), mse * x.shape[1])

    log.add(Out(x1, 1.0), x1, torch.tensor([0.0]), torch.tensor([0.0]))
    log.add(Out(x2, 5.0), x2, torch.tensor([0.0]), torch.tensor([0.0]))
    means, ev = log.means(scale=1.0)
    # not (1 + 5) / 2; a weighted sum of 2 terms and a division, float32 at worst
    assert_close_derived(means[0, 0], (3 * 1.0 + 1 * 5.0) / 4, n_terms=4, scale=2.0, dtype=torch.float32,
                         computations=1, msg="example-weighted mean")
    x = torch.cat([x1, x2]).double()
    sst = float((x - x.mean(0)).square().sum())
    # sse (4 terms) and sst (from sums of x and x^2 over 4 rows: cancellation, so relative to sum x^2) in float32
    # at worst: |d ev| <= gamma (sse / sst) (1 + sum x^2 / sst)
    want_ev = 1 - (3 * 2 + 10) / sst
    assert_close_derived(ev[0], want_ev, n_terms=12, scale=16 / sst * (1 + float(x.square().sum()) / sst),
                         dtype=torch.float32, computations=1, msg="interval EV")


# ----------------------------------------------------------------------------- item 9: cannot have learnt


def test_a_run_shorter_than_its_warmups_and_random_weights_are_flagged(tmp_path):
    rng = np.random.default_rng(1)
    ss = _write(tmp_path / "s", rng.normal(size=(100, 8)),
                source={"model": "ViT-B-32", "random_init": True, "layer": None})
    cfg = T.TrainConfig(shards=str(ss.path), out=str(tmp_path / "o"), num_epochs=5, expansion_factor=2,
                        progress=False, plot=False, init_examples=64, val_fraction=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        T.train(cfg)
    text = " | ".join(str(w.message) for w in caught)
    assert "shorter than its lr warm-up (200 steps" in text and "lambda warm-up (1000 steps" in text, text
    assert "random weights" in text, text
    summary = json.loads((tmp_path / "o" / T.SUMMARY_FILE).read_text())
    assert summary["steps"] == 5 and summary["backbone_random_init"] is True
    assert any("before its lr and lambda warm-up completed" in w for w in summary["warnings"]), summary
    rec = [r for r in read_metrics(tmp_path / "o") if r["type"] == "summary"][0]
    assert rec["warmup_incomplete"] == ["lr", "lambda"] and rec["backbone_random_init"] is True
    extra = json.loads((tmp_path / "o" / "cfg.json").read_text())["extra"]
    assert extra["backbone_random_init"] is True and extra["warmup_incomplete"] == ["lr", "lambda"]
    printed = T.format_summary(tmp_path / "o")  # what `visae train` prints at the end
    assert "warning: the activations come from a backbone with random weights" in printed, printed
    assert "before its lr and lambda warm-up completed" in printed, printed
    # plot=False (--no_plot) drew no curves: the summary does not point at a curves.png that is not there
    assert "curves:" not in printed and not (tmp_path / "o" / "curves.png").exists(), printed
    # A run long enough, on a trained backbone's activations: no flag.
    ss2 = _write(tmp_path / "s2", rng.normal(size=(100, 8)), source={"model": "ViT-B-32", "random_init": False})
    cfg2 = T.TrainConfig(shards=str(ss2.path), out=str(tmp_path / "o2"), num_epochs=4, batch_size=30,
                         lr_warmup_steps=3, l1_warmup_steps=6, expansion_factor=2, progress=False, plot=False,
                         init_examples=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        T.train(cfg2)
    assert not [w for w in caught if "warm-up" in str(w.message) or "random weights" in str(w.message)]
    summary2 = json.loads((tmp_path / "o2" / T.SUMMARY_FILE).read_text())
    assert summary2["warnings"] == [] and summary2["backbone_random_init"] is False
    assert "warning" not in T.format_summary(tmp_path / "o2")


def test_a_topk_run_is_not_flagged_for_a_lambda_it_does_not_have(tmp_path):
    """TopK fixes L0 by k and has no sparsity term: a short run warns about the lr warm-up only."""
    rng = np.random.default_rng(2)
    ss = _write(tmp_path / "s", rng.normal(size=(100, 8)), source={"model": "ViT-B-32", "random_init": False})
    cfg = T.TrainConfig(shards=str(ss.path), out=str(tmp_path / "o"), num_epochs=5, expansion_factor=2,
                        architecture="topk", k=2, progress=False, plot=False, init_examples=64, val_fraction=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        T.train(cfg)
    text = " | ".join(str(w.message) for w in caught)
    assert "shorter than its lr warm-up (200 steps" in text and "lambda" not in text, text
    rec = [r for r in read_metrics(tmp_path / "o") if r["type"] == "summary"][0]
    assert rec["warmup_incomplete"] == ["lr"], rec
