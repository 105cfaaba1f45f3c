"""visae.naming: vocabulary loading, exact matching of decoder directions to text embeddings, the CLI stage."""

from __future__ import annotations

import csv
import json
from pathlib import Path
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tolerances import assert_close_derived, assert_same_unit_vectors, backbone_in_float64, gamma, unit_roundoff
from visae.naming import (NEAR_DUPLICATE_COSINE, STOPWORDS, NameConfig, NamingError, check_embedding_space,
                          embed_vocabulary, load_vocabulary, match_names, name_concepts, near_duplicates,
                          main as name_main)
from visae.sae import SAEConfig, build_sae
from visae.shards import ShardWriter
from visae.text import encode_texts

PLANTED = ["cat", "ocean", "bicycle", "violin", "mountain", "pizza", "umbrella", "tiger"]


@pytest.fixture(scope="module")
def tiny():
    from visae.backbones import load_backbone, register_tiny_clip

    return load_backbone(register_tiny_clip(), random_init=True)


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary(None, 3000, stopwords=True, alpha_only=True, extra=PLANTED)


@pytest.fixture(scope="module")
def emb(tiny, vocab):
    return encode_texts(tiny, vocab)


def test_vocabulary_from_file(tmp_path):
    f = tmp_path / "words.txt"
    f.write_text("the\ncat\n\n  dog  \ncat\nit's\n1st\nt-shirt\nsea urchin\nzebra\n", encoding="utf-8")
    assert load_vocabulary(f, 0) == ["the", "cat", "dog", "it's", "1st", "t-shirt", "sea urchin", "zebra"]
    assert load_vocabulary(f, 3) == ["the", "cat", "dog"]
    from visae.config import ConfigError
    from visae.naming import NameConfig

    for bad, why in (("{} {}", "exactly one"), ("a {} {", "stray brace"), ("a photo", "exactly one"), ("{0}", "exactly one")):
        with pytest.raises(ConfigError, match=why):  # "{} {}" and "a {} {" were IndexError / ValueError tracebacks
            NameConfig(templates=(bad,))
    dropped = {}
    assert load_vocabulary(f, 0, stopwords=True, alpha_only=True, dropped=dropped) == ["cat", "dog", "t-shirt",
                                                                                      "sea urchin", "zebra"]
    assert dropped == {"stopwords": 2, "not_wordlike": 1, "duplicates": 1}  # the, it's; 1st; the second cat
    (tmp_path / "stop.txt").write_text("the\nand\n1st\n")
    with pytest.raises(NamingError, match=r"empty after filtering: of its 3 entries 2 are stopwords \(--no_stopwords "
                                          r"keeps them\) and 1 not word-like"):  # it did not say which filter
        load_vocabulary(tmp_path / "stop.txt", 0, stopwords=True, alpha_only=True)
    with pytest.raises(NamingError, match="does not exist"):
        load_vocabulary(tmp_path / "missing.txt")
    with pytest.raises(NamingError, match="is a directory, not a file"):  # it exists: "does not exist" misled
        load_vocabulary(tmp_path)
    bom = tmp_path / "bom.txt"  # a byte-order mark (Windows editors) dropped the first word as not a word
    bom.write_bytes(b"\xef\xbb\xbfred\ncircle\n")
    assert load_vocabulary(bom, 0) == ["red", "circle"]


def test_vocabulary_from_wordfreq_and_shared_list(shared_dir):
    words = load_vocabulary(None, 20000)
    assert len(words) == 20000 and words[:3] == ["the", "to", "and"]
    filtered = load_vocabulary(None, 20000, stopwords=True, alpha_only=True)
    assert "the" not in filtered and "it's" not in filtered and "1" not in filtered
    assert 19000 < len(filtered) < 20000 and not set(filtered) & STOPWORDS
    dnn = load_vocabulary(shared_dir / "vocab" / "20k.txt", 20000)
    assert len(dnn) == 20000 and dnn[0] == "the"


def test_planted_direction_is_named_with_its_word(emb, vocab):
    g = torch.Generator().manual_seed(0)
    rows = [vocab.index(w) for w in PLANTED]
    directions = torch.cat([emb[rows] * 3.0, torch.randn(12, emb.shape[1], generator=g)])  # scale must not matter
    res = match_names(directions, emb, vocab, top_k=5, unique=True, min_score=-1.0)
    assert res.names[: len(PLANTED)] == PLANTED
    # cosine of 3 e with e, exactly 1: two float32 normalisations (D + 3 roundings each, the word side is
    # normalised in float32) and a D-term dot product of unit vectors (|terms| sum to <= 1)
    D = emb.shape[1]
    n64 = 3 * D + 6
    assert_close_derived(res.score[: len(PLANTED)], np.ones(len(PLANTED)), n_terms=n64, dtype=torch.float32,
                         scale=1.0, computations=1, msg="planted scores")
    assert (res.margin[: len(PLANTED)] > 0).all() and (res.rank[: len(PLANTED)] == 0).all()
    # scores equal brute-force cosines, candidates are the exact top-k, z against the vocabulary's cosines
    cos = F.normalize(directions, dim=-1) @ emb.T
    z = (res.score - cos.double().mean(1).numpy()) / cos.double().std(1, unbiased=False).numpy()
    # cos here is float32 (<= gamma_{3D+6}(f32) from match_names' float64 cosines, |terms| summing to <= 1): the
    # mean and the std of a row move by at most that much, so z = (s - m) / sd moves by <= (1 + |z|) / sd times it
    sd = cos.double().std(1, unbiased=False).numpy()
    assert_close_derived(res.z, z, n_terms=n64, scale=(1 + np.abs(z)) / sd, dtype=torch.float32, computations=1,
                         msg="z against the vocabulary")
    assert (res.z[: len(PLANTED)] > 1).all()
    top = cos.topk(5, dim=1)
    # float64 cosines (match_names) vs float32 ones (here), unit vectors: |terms| sum to <= 1
    assert_close_derived(res.cand_score, top.values.numpy(), n_terms=n64, scale=1.0, dtype=torch.float32,
                         computations=1, msg="candidate scores")
    assert all(res.alternatives(j)[0]["name"] == vocab[int(top.indices[j, 0])] for j in range(len(PLANTED)))


def test_subtract_mean_names_planted_direction_in_centred_space(emb, vocab):
    T = F.normalize(emb - emb.mean(0, keepdim=True), dim=-1)
    rows = [vocab.index(w) for w in PLANTED]
    res = match_names(T[rows], emb, vocab, subtract_mean=True, min_score=-1.0)
    assert res.names == PLANTED
    # T is centred in float32 (the mean of V rows: <= gamma_V(f32) mean|emb| per element, then the subtraction
    # and the normalisation), match_names in float64: the directions are theta apart with theta <= that error /
    # |row|, and the cosine is 1 - theta^2 / 2 (second order), plus float64 rounding of the cosine
    E64 = emb.double()
    R = E64[rows] - E64.mean(0)
    err = (gamma(len(vocab), torch.float32) * E64.abs().mean(0) + unit_roundoff(torch.float32) * R.abs()).norm(dim=1)
    theta = err / R.norm(dim=1) + gamma(emb.shape[1] + 3, torch.float32)
    bound = 0.5 * theta ** 2 + gamma(3 * emb.shape[1] + 6, torch.float32)  # + the cosine's own rounding
    dev = 1.0 - torch.as_tensor(res.score)
    assert bool((dev.abs() <= bound).all()), f"|1 - score| {dev.abs().tolist()} > derived bound {bound.tolist()}"


def test_one_name_per_concept_and_duplicates(emb, vocab):
    g = torch.Generator().manual_seed(1)
    w = emb[vocab.index("tiger")]
    directions = w[None] + 0.05 * torch.randn(6, emb.shape[1], generator=g)  # six concepts all nearest "tiger"
    dup = match_names(directions, emb, vocab, unique=False, min_score=-1.0)
    assert dup.names == ["tiger"] * 6
    uni = match_names(directions, emb, vocab, unique=True, min_score=-1.0)
    assert len(set(uni.names)) == 6 and "tiger" in uni.names
    # the concept closest to "tiger" keeps it (greedy by score)
    cos = F.normalize(directions, dim=-1) @ w
    assert uni.names[int(cos.argmax())] == "tiger"
    # every chosen name is that concept's best word not chosen by a better-scoring concept
    cosall = F.normalize(directions, dim=-1) @ emb.T
    order = np.argsort(-uni.score)
    taken: set[int] = set()
    for j in order:
        free = [i for i in cosall[j].argsort(descending=True).tolist() if i not in taken]
        assert vocab[free[0]] == uni.names[j]
        taken.add(free[0])


def test_below_threshold_is_unnamed(emb, vocab):
    g = torch.Generator().manual_seed(2)
    directions = torch.cat([emb[[vocab.index("cat")]], torch.randn(3, emb.shape[1], generator=g)])
    cos_best = (F.normalize(directions, dim=-1) @ emb.T).max(1).values
    thr = float(cos_best[1:].max()) + 1e-3  # above every random direction's best word, below the planted one's 1.0
    res = match_names(directions, emb, vocab, min_score=thr)
    assert res.names[0] == "cat" and res.names[1:] == [None, None, None]
    assert res.reason[1:] == ["below min_score"] * 3 and np.isnan(res.score[1:]).all()
    dead = match_names(directions, emb, vocab, min_score=-1.0, active=np.array([False, True, True, True]))
    assert dead.names[0] is None and dead.reason[0] == "dead"


def test_refuses_non_embedding_space():
    check_embedding_space({"model": "ViT-B-32", "layer": None, "token": "cls"}, "x")
    check_embedding_space({"model": "ViT-B-32"}, "x")
    with pytest.raises(NamingError, match="layer 6"):
        check_embedding_space({"model": "ViT-B-32", "layer": 6, "token": "cls"}, "x")
    with pytest.raises(NamingError, match="no shard source"):
        check_embedding_space(None, "x")
    check_embedding_space(None, "x", assume=True)
    # a layer value that means "final" does not make patch or mean-of-patch rows the pooled embedding
    for layer in ("final", "output", "FINAL"):
        check_embedding_space({"model": "ViT-B-32", "layer": layer, "token": "cls"}, "x")
        for token in ("patch", "mean"):
            with pytest.raises(NamingError, match=f"token '{token}'"):
                check_embedding_space({"model": "ViT-B-32", "layer": layer, "token": token}, "x")


def _planted_sae(emb, vocab, tmp_path, source, n_random=8):
    rows = [vocab.index(w) for w in PLANTED]
    d = emb.shape[1]
    g = torch.Generator().manual_seed(0)
    sae = build_sae(SAEConfig(architecture="relu", d_in=d, d_sae=len(PLANTED) + n_random, k=4), generator=g)
    with torch.no_grad():
        sae.W_dec[0, : len(PLANTED)] = emb[rows]
        sae.W_enc[0] = sae.W_dec[0].T
        sae.b_enc.fill_(-0.2)
        sae.b_enc[0, -1] = -1e4  # a dead latent
        sae.b_dec.zero_()
    # images: the planted words' embeddings plus noise, so planted latents fire
    x = (emb[rows].repeat(10, 1) + 0.3 * torch.randn(10 * len(rows), d, generator=g)).numpy()
    shards = tmp_path / "shards"
    with ShardWriter(shards, d=d, shard_size=32, source=source) as w:
        w.add(x, ids=[f"img{i}.png" for i in range(len(x))])
    sae_dir = tmp_path / "sae"
    sae.save(sae_dir, extra={"shards": {"path": str(shards), "source": source}})
    return sae_dir, shards


@pytest.mark.parametrize("killed_at", ["concepts.json", "concepts.csv"])
def test_a_killed_rerun_never_leaves_one_runs_table_beside_anothers_record(killed_at, tiny, emb, vocab, tmp_path,
                                                                          monkeypatch):
    """A rerun into the same --out (another vocabulary) killed while writing: the new run's concepts.csv stood beside
    the old concepts.json (a newcomer's find). Now the old table goes first and the new one follows the record."""
    import hashlib

    import visae.naming as naming

    vfile = tmp_path / "vocab.txt"
    vfile.write_text("\n".join(vocab))
    source = {"model": "visae-tiny-test", "pretrained": None, "random_init": True, "layer": None, "token": "cls"}
    sae_dir, _ = _planted_sae(emb, vocab, tmp_path, source)
    out = tmp_path / "concepts"
    argv = ["--sae", str(sae_dir), "--vocab_size", "0", "--out", str(out), "--text_cache", str(tmp_path / "cache"),
            "--no_stopwords", "--no_alpha_only", "--min_score", "-1", "--batch_size", "16"]
    assert name_main([*argv, "--vocab", str(vfile)]) == 0
    doc = json.loads((out / "concepts.json").read_text())
    assert doc["csv_file"]["sha256"] == hashlib.sha256((out / "concepts.csv").read_bytes()).hexdigest()
    (tmp_path / "other.txt").write_text("\n".join(reversed(vocab)))
    real = naming.atomic_write_text

    def killed(path, text, *a, **k):
        if Path(path).name == killed_at:
            raise KeyboardInterrupt
        return real(path, text, *a, **k)

    monkeypatch.setattr(naming, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        name_main([*argv, "--vocab", str(tmp_path / "other.txt")])
    now = json.loads((out / "concepts.json").read_text())
    assert (now == doc) == (killed_at == "concepts.json")  # the record is the old one until the new one is committed
    assert not (out / "concepts.csv").exists()  # no table of either run beside it, until the rerun


def test_name_concepts_cli_end_to_end(tiny, emb, vocab, tmp_path):
    vfile = tmp_path / "vocab.txt"
    vfile.write_text("\n".join(vocab))
    source = {"model": "visae-tiny-test", "pretrained": None, "random_init": True, "layer": None, "token": "cls"}
    sae_dir, _ = _planted_sae(emb, vocab, tmp_path, source)
    out = tmp_path / "concepts"
    rc = name_main(["--sae", str(sae_dir), "--vocab", str(vfile), "--vocab_size", "0", "--out", str(out),
                    "--text_cache", str(tmp_path / "cache"), "--no_stopwords", "--no_alpha_only",
                    "--min_score", "-1", "--batch_size", "16"])
    assert rc == 0
    doc = json.loads((out / "concepts.json").read_text())
    assert doc["num_concepts"] == len(PLANTED) + 8 and doc["vocabulary"]["size"] == len(vocab)
    cs = doc["concepts"]
    assert [c["name"] for c in cs[: len(PLANTED)]] == PLANTED
    assert all(len(c["alternatives"]) == 5 for c in cs[: len(PLANTED)])
    # decoder rows are the words' own embeddings: cosine 1 up to two float32 normalisations and a D-term dot product
    assert_close_derived([c["score"] for c in cs[: len(PLANTED)]], np.ones(len(PLANTED)), n_terms=3 * emb.shape[1] + 6,
                         scale=1.0, dtype=torch.float32, computations=1, msg="planted concept scores")
    assert all(c["frequency"] > 0 and c["mean_activation"] > 0 for c in cs[: len(PLANTED)])
    assert cs[-1]["name"] is None and cs[-1]["unnamed_reason"] == "dead" and cs[-1]["frequency"] == 0
    named = [c["name"] for c in cs if c["name"]]
    assert len(named) == len(set(named))
    rows = list(csv.DictReader((out / "concepts.csv").open()))
    assert [r["name"] for r in rows[: len(PLANTED)]] == PLANTED and rows[0]["alternatives"].startswith(PLANTED[0] + ":")
    assert (out / "top_images.npz").is_file() and list((tmp_path / "cache").glob("*.safetensors"))


def test_concepts_json_records_its_paths_absolute(tiny, emb, vocab, tmp_path, monkeypatch):
    """concepts.json recorded --sae / --vocab / --shards / --out as typed (relative): it did not say which from
    another directory."""
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    source = {"model": "visae-tiny-test", "pretrained": None, "random_init": True, "layer": None, "token": "cls"}
    _planted_sae(emb, vocab, tmp_path, source)
    monkeypatch.chdir(tmp_path)
    assert name_main(["--sae", "sae", "--vocab", "vocab.txt", "--vocab_size", "0", "--shards", "shards", "--out", "c",
                      "--text_cache", "cache", "--no_stopwords", "--no_alpha_only", "--no_progress"]) == 0
    doc = json.loads((tmp_path / "c" / "concepts.json").read_text())
    want = {k: str(tmp_path / v) for k, v in (("sae", "sae"), ("vocab", "vocab.txt"), ("shards", "shards"),
                                               ("text_cache", "cache"), ("out", "c"))}
    assert {k: doc["config"][k] for k in want} == want, doc["config"]
    assert doc["sae"] == want["sae"] and doc["vocabulary"]["source"] == want["vocab"], doc


def test_a_rerun_with_other_settings_says_it_replaces_the_naming(tiny, emb, vocab, tmp_path, monkeypatch, caplog):
    """The newcomer's report: `visae name` into a directory holding a naming made with another vocabulary replaced it
    without a word. The same request again is silent (a rerun, how it ran aside: batch sizes, device); another one
    logs which settings changed, then replaces the result."""
    import logging

    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    (tmp_path / "vocab2.txt").write_text("\n".join(vocab[::-1]))
    source = {"model": "visae-tiny-test", "pretrained": None, "random_init": True, "layer": None, "token": "cls"}
    _planted_sae(emb, vocab, tmp_path, source)
    monkeypatch.chdir(tmp_path)
    argv = ["--sae", "sae", "--vocab_size", "0", "--shards", "shards", "--out", "c", "--text_cache", "cache",
            "--no_stopwords", "--no_alpha_only", "--no_progress"]
    assert name_main(argv + ["--vocab", "vocab.txt"]) == 0
    with caplog.at_level(logging.WARNING, logger="visae.naming"):
        assert name_main(argv + ["--vocab", "vocab.txt", "--batch_size", "7"]) == 0
        assert not [r for r in caplog.records if "replacing it" in r.getMessage()]
        assert name_main(argv + ["--vocab", "vocab2.txt"]) == 0
    msgs = [r.getMessage() for r in caplog.records if "replacing it" in r.getMessage()]
    assert len(msgs) == 1 and "vocab: " in msgs[0] and "vocab2.txt" in msgs[0], msgs
    doc = json.loads((tmp_path / "c" / "concepts.json").read_text())
    assert doc["config"]["vocab"] == str(tmp_path / "vocab2.txt")


def test_name_concepts_progress_flag(tiny, emb, vocab, tmp_path, capsys):
    """Progress bars (text embeddings, top images) go to stderr by default; --no_progress leaves stderr free of them."""
    vfile = tmp_path / "vocab.txt"
    vfile.write_text("\n".join(vocab))
    source = {"model": "visae-tiny-test", "pretrained": None, "random_init": True, "layer": None, "token": "cls"}
    sae_dir, _ = _planted_sae(emb, vocab, tmp_path, source)
    seen = {}
    for flag in ([], ["--no_progress"]):
        tag = "quiet" if flag else "bars"
        capsys.readouterr()
        rc = name_main(["--sae", str(sae_dir), "--vocab", str(vfile), "--vocab_size", "0", "--out", str(tmp_path / tag),
                        "--text_cache", str(tmp_path / f"cache_{tag}"), "--no_stopwords", "--no_alpha_only",
                        "--batch_size", "16", *flag])
        assert rc == 0
        seen[tag] = capsys.readouterr().err
    assert "text embeddings" in seen["bars"] and "prompt/s" in seen["bars"], seen["bars"][-500:]
    assert "text embeddings" not in seen["quiet"] and "it/s" not in seen["quiet"] and "/s]" not in seen["quiet"], seen["quiet"]


def test_name_concepts_refuses_layer_shards_and_other_model(tiny, emb, vocab, tmp_path):
    src = {"model": "visae-tiny-test", "random_init": True, "layer": 1, "token": "cls"}
    sae_dir, _ = _planted_sae(emb, vocab, tmp_path, src)
    with pytest.raises(NamingError, match="layer 1"):
        name_concepts(NameConfig(sae=str(sae_dir), out=str(tmp_path / "o"), text_cache=None))
    src = {"model": "visae-tiny-test", "random_init": True}
    sae_dir, _ = _planted_sae(emb, vocab, tmp_path / "b", src)
    with pytest.raises(NamingError, match="ViT-B-32"):
        name_concepts(NameConfig(sae=str(sae_dir), model="ViT-B-32", out=str(tmp_path / "o"), text_cache=None))


def test_toy_world_recovered_factor_values_are_named_right(tmp_path, toy_world_embeddings):
    """Issue 6's ground truth with the shipped toy CLIP: an SAE trained by ``visae.train`` with the demo's
    recipe on the toy world's image embeddings has, for >= 80% of the 22 factor values, a latent with
    AUROC >= 0.95 that naming calls by the value's word. Vocabulary: the demo's, the world's words and their
    synonyms plus 600 distractor words."""
    from visae import toyworld as tw
    from visae.demo import DemoConfig, toy_vocabulary
    from visae.config import load_yaml_config
    from visae.resources import config_yaml
    from visae.recovery import concept_recovery
    from visae.train import TrainConfig, train

    # conftest: 6,000 images of world seed 5000 (the demo's, not the toy CLIP's training world, seed 0)
    bb, world, x, source = (toy_world_embeddings[k] for k in ("backbone", "world", "x", "source"))
    n = len(x)
    names = list(tw.FACTORS)
    shards = tmp_path / "shards"
    with ShardWriter(shards, d=x.shape[1], source=source, label_names={k: list(v) for k, v in tw.FACTORS.items()},
                     columns={k: "int64" for k in names}) as w:
        w.add(x.numpy(), ids=[f"{i:06d}" for i in range(n)], columns={k: world.factors[:, i] for i, k in enumerate(names)})
    # One point of the demo's sweep grid (the largest dictionary and learning rate, the smallest lambda).
    demo = load_yaml_config(DemoConfig, config_yaml("demo_toy.yaml"))  # the first toy world's demo
    sae_dir = train(TrainConfig(shards=str(shards), out=str(tmp_path / "sae"), architecture=demo.sweep.train.architecture,
                                expansion_factor=max(demo.sweep.expansion_factors), lr=max(demo.sweep.lrs),
                                l1_coeff=min(demo.sweep.l1_coeffs), num_epochs=demo.sweep.train.num_epochs,
                                batch_size=demo.sweep.train.batch_size,
                                seed=demo.seed, progress=False, plot=False))

    vocabulary = toy_vocabulary(demo.n_distractors)  # the demo's: the world's words, synonyms, distractors
    world_words = toy_vocabulary(0)
    assert len(vocabulary) - len(world_words) >= 500 and vocabulary[: len(world_words)] == world_words
    vfile = tmp_path / "vocab.txt"
    vfile.write_text("\n".join(vocabulary))
    out_dir = name_concepts(NameConfig(sae=str(sae_dir), vocab=str(vfile), vocab_size=0, stopwords=False,
                                       subtract_mean=demo.naming.subtract_mean, out=str(tmp_path / "concepts"),
                                       text_cache=None), backbone=bb)
    res = concept_recovery(str(sae_dir), shards, concepts=out_dir)
    vals = res["values"]
    assert len(vals) == sum(len(tw.FACTORS[f]) for f in tw.MAIN_FACTORS)
    recovered = [v["value"] for v in vals if v["auroc"] >= 0.95]
    named_right = [v["value"] for v in vals if v["named_auroc"] is not None and v["named_auroc"] >= 0.95]
    msg = f"recovered at AUROC >= 0.95: {recovered}; a latent at AUROC >= 0.95 named with the word: {named_right}"
    print(msg)
    assert len(named_right) >= 0.8 * len(vals), msg


# ----------------------------------------------------------------------------- issue 10: offset, long text, duplicates


def _clip_like_vocabulary(V=400, D=24, seed=0):
    """Unit 'word embeddings' sharing a large common component (as CLIP text embeddings do) and directions:
    half near a word, half random. float64, so that adding an offset to them is exact to 1e-16."""
    g = torch.Generator().manual_seed(seed)
    common = 2.0 * F.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    E = F.normalize(common + torch.randn(V, D, generator=g, dtype=torch.float64), dim=-1)
    near = E[torch.randperm(V, generator=g)[:40]] + 0.3 * torch.randn(40, D, generator=g, dtype=torch.float64)
    directions = torch.cat([near, torch.randn(40, D, generator=g, dtype=torch.float64)])
    return E, directions, [f"w{i}" for i in range(V)], common


# Rounding: the ranking vectors are centred in float64 (the offset cancels to ~1e-16 |c|) and searched in
# float32; a word score then moves by at most D * 2^-24 * |R_w| (float32 dot of D terms) if a float32
# rounding of R flips, so only latents with a top-2 margin or a |z - min_z| gap below that can change.
_FLOAT32_SCORE_BOUND = 24 * 2.0 ** -24 * 4


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2 ** 31 - 1), scale=st.floats(-50.0, 50.0), along_mean=st.floats(-3.0, 3.0),
       unique=st.booleans(), subtract_mean=st.booleans(), min_z=st.sampled_from([0.0, 2.0, 3.0]))
def test_offset_common_to_every_word_leaves_names_and_named_set_unchanged(seed, scale, along_mean, unique,
                                                                          subtract_mean, min_z):
    E, directions, words, common = _clip_like_vocabulary()
    g = torch.Generator().manual_seed(seed)
    c = scale * F.normalize(torch.randn(E.shape[1], generator=g, dtype=torch.float64), dim=0) + along_mean * common
    kw = dict(unique=unique, subtract_mean=subtract_mean, min_z=min_z, top_k=3)
    a = match_names(directions, E, words, **kw)
    b = match_names(directions, E + c, words, **kw)
    sure_name = a.margin > _FLOAT32_SCORE_BOUND
    sure_decision = ~np.isfinite(a.z) | (np.abs(a.z - min_z) * 1e-3 > _FLOAT32_SCORE_BOUND)
    if unique:  # a near tie anywhere can pass a word from one concept to another
        sure_name = sure_name & (np.abs(a.margin) > _FLOAT32_SCORE_BOUND).all()
    named_a = np.array([x is not None for x in a.names])
    named_b = np.array([x is not None for x in b.names])
    assert (named_a == named_b)[sure_decision].all(), f"named set changed: {np.flatnonzero(named_a != named_b)}"
    diff = [j for j in np.flatnonzero(sure_name & named_a & named_b) if a.names[j] != b.names[j]]
    assert not diff, f"names changed for latents {diff}: margins {a.margin[diff]}"
    np.testing.assert_allclose(a.margin, b.margin, atol=_FLOAT32_SCORE_BOUND)
    ok = np.isfinite(a.z) & np.isfinite(b.z)
    np.testing.assert_allclose(a.z[ok], b.z[ok], rtol=1e-3)
    assert named_a.sum() > 0 and (min_z == 0.0 and not unique) <= named_a.all()


def test_cosine_threshold_depends_on_the_offset_the_default_does_not():
    """Why min_score is no longer the default: with min_score 0 the named set follows d . mean(t)."""
    E, directions, words, common = _clip_like_vocabulary()
    for kw in ({"min_score": 0.0}, {}):
        a = match_names(directions, E, words, unique=False, **kw)
        b = match_names(directions, E - 1.5 * common, words, unique=False, **kw)
        same = [x is None for x in a.names] == [x is None for x in b.names]
        assert same == ("min_score" not in kw), (kw, sum(x is None for x in a.names), sum(x is None for x in b.names))
        assert a.names == b.names or "min_score" in kw


def test_min_z_leaves_concepts_whose_best_word_does_not_stand_out_unnamed(emb, vocab):
    g = torch.Generator().manual_seed(3)
    directions = torch.cat([emb[[vocab.index(w) for w in PLANTED]], torch.randn(30, emb.shape[1], generator=g)])
    every = match_names(directions, emb, vocab, unique=False)
    assert all(n is not None for n in every.names)  # default min_z 0: every live latent is named
    thr = float(np.median(every.z))
    res = match_names(directions, emb, vocab, unique=False, min_z=thr)
    keep = every.z >= thr
    assert 0 < keep.sum() < len(keep) and [n is not None for n in res.names] == keep.tolist()
    assert [res.names[j] for j in np.flatnonzero(keep)] == [every.names[j] for j in np.flatnonzero(keep)]
    assert {res.reason[j] for j in np.flatnonzero(~keep)} == {"below min_z"}
    np.testing.assert_allclose(res.z[keep], every.z[keep], rtol=0, atol=0)


def test_near_duplicates_threshold_is_exact():
    D = 8
    rows = torch.zeros(6, D, dtype=torch.float64)
    rows[0, 0] = 1.0
    for i, gap in ((1, 5e-7), (2, 2e-6), (3, 0.0)):  # 1 - cosine with row 0
        cos = 1.0 - gap
        rows[i, 0], rows[i, 1] = cos, math.sqrt(1.0 - cos * cos)
    rows[4, 2] = 1.0
    rows[5, 2], rows[5, 3] = 1.0, 1e-4  # cosine 1 - 5e-9 with row 4
    groups = near_duplicates(rows.float())
    assert groups == {0: [1, 3], 4: [5]}, groups
    assert near_duplicates(torch.eye(4)) == {}


def test_vocabulary_entries_the_tower_cannot_represent(tiny, caplog):
    """visae-tiny-test has a text context of 16 tokens: entries that need more are dropped with a warning
    listing them (cut, two of them would embed identically); entries with one embedding are merged."""
    from visae.text import context_length

    assert context_length(tiny.tokenizer) == 16
    head = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"  # 14 + 2 tokens
    long_a, long_b = head + " cats", head + " dogs"
    cut = encode_texts(tiny, [long_a, long_b, head])
    assert torch.equal(cut[0], cut[1]) and torch.equal(cut[0], cut[2])  # what the cut does to them
    words = ["cat", long_a, "dog", "Cat", long_b, head, "DOG", "tiger"]
    with caplog.at_level("WARNING", logger="visae.naming"):
        v = embed_vocabulary(tiny, words)
    assert v.too_long == [long_a, long_b]
    assert v.merged == {"cat": ["Cat"], "dog": ["DOG"]}  # the tokenizer lowercases: identical tokens
    assert v.words == ["cat", "dog", head, "tiger"] and v.emb.shape == (4, tiny.embed_dim)
    # the kept rows are the entries' embeddings (compared in float64: the vocabulary and the 4 words are embedded
    # in batches of other shapes, which round differently in float32 with 2 threads; tests/tolerances.py)
    tiny64 = backbone_in_float64(tiny)
    v64 = embed_vocabulary(tiny64, words)
    assert v64.words == v.words
    assert_same_unit_vectors(v64.emb, encode_texts(tiny64, v64.words), "kept vocabulary rows")
    log = caplog.text
    assert long_a in log and long_b in log and "Cat" in log and "DOG" in log
    # with a template the 14-word entry needs 4 more positions and no longer fits
    v2 = embed_vocabulary(tiny, ["cat", head], ["a photo of a {}."])
    assert v2.too_long == [head] and v2.words == ["cat"]
    with pytest.raises(NamingError, match="no vocabulary entry fits"):
        embed_vocabulary(tiny, [long_a])
    # no two names share an embedding: every pair of kept words is below the merge threshold
    cos = v.emb.double() @ v.emb.double().T
    assert (cos - 2 * torch.eye(len(v.words), dtype=torch.float64)).max() <= NEAR_DUPLICATE_COSINE


def test_a_record_of_the_same_path_with_other_weights_says_the_sae_changed(tmp_path):
    """concepts recorded for <dir> whose weights changed since (a re-selected best/, an SAE retrained in place): the
    message says so, instead of "another SAE (<dir>), not of <dir>" naming one path twice."""
    from visae.naming import recorded_sae_mismatch, sae_weights_sha256
    from visae.sae import SAEConfig, build_sae

    sae_dir = tmp_path / "best"
    build_sae(SAEConfig(architecture="relu", d_in=4, d_sae=8), generator=torch.Generator().manual_seed(0)).save(sae_dir)
    now = sae_weights_sha256(sae_dir)
    why = recorded_sae_mismatch({"sae": str(sae_dir), "sae_weights_sha256": "0" * 64}, sae_dir, "concepts.json")
    assert why == f"of an earlier SAE at {sae_dir} (its weights changed since: sha256 000000000000... then, {now[:12]}... now)"
    why = recorded_sae_mismatch({"sae": str(tmp_path / "other"), "sae_weights_sha256": "0" * 64}, sae_dir, "c.json")
    assert why.startswith(f"of another SAE ({tmp_path / 'other'}, weights sha256 000000000000...), not of {sae_dir}")
    assert recorded_sae_mismatch({"sae": str(sae_dir), "sae_weights_sha256": now}, sae_dir, "c.json") is None
