"""Patch-level ground truth on world2 (issue 14 item 2 on issue 12's world): ``visae.patch_recovery``'s world2 adapter
reads every object's factors and box from the world's record (objects 3 and 4 are in no shard column), planted heat
on an object's patches / on the background / on its mask gives the shares it must, and the whole path runs on a
random-initialised visae-toyclip2-reg4's patch tokens (no targets asserted there: random weights carry no concepts)."""

import json

import numpy as np
import pytest
import torch

from visae import world2
from visae.shards import ShardWriter

SEED, N = 11, 48
EPS = float(np.finfo(np.float64).eps)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """48 scenes of world2 seed 11 on disk (images, label maps, world.jsonl), and the same scenes in memory."""
    out = world2.generate_world2(tmp_path_factory.mktemp("w2") / "world", N, SEED, progress=False)
    return out, world2.sample_world2(N, SEED)


def _source(world_dir, seed=SEED):
    """The shard source ``visae extract`` records for a world2 directory (``images._toyworld_source``)."""
    return {"model": "planted", "token": "patch", "dataset": str(world_dir), "dataset_kind": "toyworld",
            "dataset_info": {"world_format": world2.FORMAT_NAME, "world_seed": seed,
                             "main_factors": list(world2.MAIN_FACTORS)}}


def _write(path, world_dir, images, acts, factors, seed=SEED):
    """A patch-token shard set: for each image i of ``images``, rows ``<id>#p0..63`` with ``acts[i]`` [64, d] and a last
    coordinate 1 (shards refuse zero rows; the planted SAE below does not read it), and the image's factor columns
    (every world2 factor, as extraction writes them)."""
    acts = np.concatenate([acts, np.ones(acts.shape[:-1] + (1,))], -1)
    d = acts.shape[-1]
    cols = {f: "int64" for f in world2.FACTORS}
    with ShardWriter(path, d=d, dtype="float32", normalization="none", source=_source(world_dir, seed), columns=cols,
                     label_names={f: list(v) for f, v in world2.FACTORS.items()}) as w:
        for i in images:
            P = len(acts[i])
            w.add(np.asarray(acts[i], np.float32), ids=[f"{i:06d}#p{j}" for j in range(P)],
                  columns={f: np.full(P, factors[i, world2.FACTOR_INDEX[f]], np.int64) for f in world2.FACTORS})
    return path


def test_world2_adapter_reads_every_objects_box_and_factors_from_the_record(world, tmp_path):
    from visae.patch_recovery import world_objects

    wdir, w = world
    ss = _write(tmp_path / "s", wdir, range(N), np.zeros((N, 64, 1)), w.factors)
    W = world_objects(ss)
    assert W.world == "world2" and W.image_size == world2.IMAGE_SIZE and W.mask_coverage is not None
    assert W.image_ids == tuple(f"{i:06d}" for i in range(N))
    n_obj = np.array([len(sc.objects) for sc in w.scenes])
    assert n_obj.max() >= 3  # objects beyond the second exist only in the record: the test covers them
    fam = world2.colour_families()
    worst = 0.0
    for i, sc in enumerate(w.scenes):
        for k in range(W.boxes.shape[1]):
            if k >= len(sc.objects):
                assert (W.boxes[i, k] == -1).all() and all(W.values[f][i, k] == -1 for f in W.object_factors), (i, k)
                continue
            o = sc.objects[k]
            worst = max(worst, float(np.abs(W.boxes[i, k] - np.asarray(world2.object_box(o))).max()))
            got = {f: int(W.values[f][i, k]) for f in ("shape", "colour_family", "colour", "texture")}
            assert got == {"shape": o.shape, "colour_family": int(fam[o.colour]), "colour": o.colour,
                           "texture": o.texture}, (i, k, got)
    # world.jsonl rounds each box coordinate to 1e-3 px: at most half a unit of the third decimal, plus the float
    # rounding of coordinates <= 64
    assert worst <= 5e-4 + 64 * 4 * EPS, f"largest box difference {worst} px"
    # other factors are the images' own columns
    assert np.array_equal(W.values["background"][:, 0], w.factor("background"))


def test_refusals_name_the_problem_before_the_sae_pass(world, tmp_path):
    from visae.patch_recovery import patch_recovery, world_objects

    wdir, w = world
    acts = np.zeros((N, 64, 1))
    # a shard set of neither world: no world2 format / columns and not the first world's factor columns
    with ShardWriter(tmp_path / "other", d=1, dtype="float32", normalization="none", columns={"shape": "int64"},
                     source={"model": "planted"}) as wr:
        wr.add(np.ones((4, 1), np.float32), ids=[f"0#p{j}" for j in range(4)], columns={"shape": np.zeros(4, np.int64)})
    with pytest.raises(ValueError, match=r"factor columns \[.*'colour'.*\] missing .*visae.toyworld or visae.world2"):
        patch_recovery(object(), tmp_path / "other")  # refused before the SAE is touched
    # a world2 set whose world directory is gone, or is another world's
    ss = _write(tmp_path / "s", tmp_path / "nowhere", range(4), acts, w.factors)
    with pytest.raises(ValueError, match="nowhere: the world2 directory .* pass world_dir"):
        world_objects(ss)
    other = world2.generate_world2(tmp_path / "w_other", 4, SEED + 1, progress=False)
    with pytest.raises(ValueError, match="world seed 12, but .* world seed 11"):
        world_objects(ss, world_dir=other)
    ss2 = _write(tmp_path / "s2", other, range(4), acts, w.factors, seed=SEED + 1)  # seed 12's dir, seed 11's columns
    with pytest.raises(ValueError, match="the shards are not of this world"):
        world_objects(ss2)
    with pytest.raises(ValueError, match="records per object only"):
        patch_recovery(object(), _write(tmp_path / "s3", wdir, range(4), acts, w.factors), factors=["size"],
                       object_factors=["size"])
    # an object factor that is not scored was ignored silently (and listed in the summary's object_factors)
    with pytest.raises(ValueError, match=r"object factor\(s\) \['texture'\] are not among the factors scored \['shape'\]"):
        patch_recovery(object(), tmp_path / "s3", factors=["shape"], object_factors=["texture"])


def _patches(boxes, whole, P=8, size=64):
    """bool [K, P*P] (row-major patches), from the box edges alone: patches lying wholly inside each box (``whole``)
    or overlapping it with positive area."""
    e = np.arange(P + 1) * (size // P)
    lo, hi = e[:-1], e[1:]
    out = []
    for bx0, by0, bx1, by1 in boxes:
        if whole:
            cols, rows = (lo >= bx0) & (hi <= bx1), (lo >= by0) & (hi <= by1)
        else:
            cols, rows = (lo < bx1) & (hi > bx0), (lo < by1) & (hi > by0)
        out.append((rows[:, None] & cols[None, :]).reshape(-1))
    return np.array(out)


def test_planted_heat_on_the_object_the_background_and_the_mask(world, tmp_path):
    """Three planted latents over the images of world2 seed 11, heat 1 on: (0) patches wholly inside the box of an
    object of colour family v, (1) patches touching no object's box, in images with a v object, (2) patches whose
    pixels all belong to v objects in the label map. A ReLU SAE with the identity as encoder reads them. Every image with a v object
    (any of its objects) is a positive; the three latents have AUROC 1, and their heat shares are exactly 1 / 0 / 1."""
    from visae.patch_recovery import format_patch_recovery, patch_recovery
    from visae.sae import SAEConfig, build_sae

    wdir, w = world
    fam = world2.colour_families()
    labels = w.labels.reshape(N, 8, 8, 8, 8).transpose(0, 1, 3, 2, 4).reshape(N, 64, 64)  # [image, patch, pixel]
    feats, has = {}, {}
    for v in range(len(world2.FAMILIES)):  # the family with most usable images
        fv = np.zeros((N, 64, 3))
        ok = np.ones(N, bool)
        for i, sc in enumerate(w.scenes):
            boxes = [world2.object_box(o) for o in sc.objects]
            mine = [k for k, o in enumerate(sc.objects) if fam[o.colour] == v]
            if not mine:
                continue
            full = _patches([boxes[k] for k in mine], whole=True)
            fv[i, :, 0] = full.any(0)
            fv[i, :, 1] = ~_patches(boxes, whole=False).any(0)
            fv[i, :, 2] = np.isin(labels[i], [k + 1 for k in mine]).all(1)
            # usable: each v object has a whole patch inside its box and one inside its mask, and there is background
            ok[i] = all(full[t].any() and np.isin(labels[i], [k + 1]).all(1).any() for t, k in enumerate(mine)) \
                and fv[i, :, 1].any()
        has[v] = np.array([any(fam[o.colour] == v for o in sc.objects) for sc in w.scenes]) & ok
        feats[v] = (fv, ok)
    v = max(has, key=lambda u: has[u].sum())
    fv, ok = feats[v]
    keep = np.flatnonzero(ok)
    assert has[v].sum() >= 3 and (~has[v][keep]).sum() >= 3, "too few positives / negatives in the sample"
    ss = _write(tmp_path / "s", wdir, keep, fv, w.factors)
    sae = build_sae(SAEConfig(architecture="relu", d_in=4, d_sae=3, input_normalization="none"))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, :3] = torch.eye(3)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    res = patch_recovery(sae, ss, factors=["colour_family"])
    print(format_patch_recovery(res))
    rec = next(r for r in res["values"] if r["value"] == world2.FAMILIES[v])
    # positives: images where ANY object has the family (objects 3 and 4 are in no column: read from the record)
    assert rec["n_pos"] == int(has[v][keep].sum()), rec
    later = [i for i in keep if has[v][i] and all(fam[o.colour] != v for o in w.scenes[i].objects[:2])]
    assert later, "no image whose v object is its third or fourth: the sample does not test the record's objects"
    at = {r["latent"]: r for r in rec["latents_at"]}
    assert sorted(at) == [0, 1, 2] and all(r["auroc"] == 1.0 for r in at.values()), at
    # coverage of a whole patch sums <= (2K + 2)^2 cell areas (K <= 4 boxes cut it), then the pooled ratio sums at
    # most 16 x 64 terms: relative float64 error (100 + 1024) eps
    tol = (100 + 16 * 64) * EPS
    assert abs(at[0]["in_box"] - 1) <= tol and at[0]["touching"] == 1 and at[0]["peak_on_box"] == 1, at[0]
    assert at[1]["in_box"] == 0 and at[1]["touching"] == 0 and at[1]["peak_on_box"] == 0 and at[1]["in_mask"] == 0, at[1]
    assert abs(at[2]["in_mask"] - 1) <= tol, at[2]  # mask coverage is a mean of 64 booleans: exact, tolerance to spare
    assert rec["latent"] in (0, 2) and abs(rec["in_box"] - 1) <= tol and rec["passes"], rec
    assert res["summary"]["world"] == "world2" and res["summary"]["masks"] is True
    assert f"colour_family={world2.FAMILIES[v]}" in res["summary"]["passing"]


def test_end_to_end_on_a_random_toyclip2(world, tmp_path, capsys, monkeypatch):
    """world2 -> ``visae extract --layer 1 --token patch`` with a random-initialised world2 model (visae-toyclip2-reg4:
    class and 4 register tokens before the 64 patches, so the 8 x 8 grid is read past 5 prefix tokens) -> a random TopK SAE
    -> ``patch_recovery`` with every latent's heat measured (``auroc_at=0``): the documented fields, shares in [0, 1];
    ``visae patch-recovery`` gives the same result as JSON, and a bad world directory as one line."""
    from visae.extract import ExtractConfig, extract
    from visae.patch_recovery import format_patch_recovery, patch_recovery
    from visae.sae import SAEConfig, build_sae

    wdir, _ = world
    shards = extract(ExtractConfig(images=str(wdir), out=str(tmp_path / "shards"), model="visae-toyclip2-reg4",
                                   random_init=True, layer=1, token="patch", batch_size=48, num_workers=0, threads=1,
                                   progress=False))
    sae = build_sae(SAEConfig(architecture="topk", d_in=shards.d, d_sae=16, k=4),
                    generator=torch.Generator().manual_seed(0))
    res = patch_recovery(sae, str(shards.path), auroc_at=0.0, n_top=4)
    s = res["summary"]
    assert s["world"] == "world2" and s["masks"] is True and s["n_images"] == N and s["n_top"] == 4
    assert s["object_factors"] == ["shape", "colour_family", "texture"]
    assert {r["factor"] for r in res["values"]} == set(world2.MAIN_FACTORS)
    # coverage sums <= (2K + 2)^2 cell areas (K <= 4 boxes), the pooled shares <= 4 x 64 terms: float64 rounding only
    tol = (100 + 4 * 64) * EPS
    heat = [r for r in res["values"] if "in_box" in r]
    assert heat and {r["factor"] for r in heat} == {"shape", "colour_family", "texture"}
    for r in heat:
        assert {"latent", "latent_auroc", "in_box", "touching", "peak_on_box", "images", "in_mask", "passes",
                "latents_at"} <= set(r), r
        for key in ("in_box", "touching", "peak_on_box", "in_mask"):
            assert np.isnan(r[key]) or 0 <= r[key] <= 1 + tol, (key, r)
        assert np.isnan(r["in_box"]) or r["in_box"] <= r["touching"] + tol, r
    table = format_patch_recovery(res)
    assert "in mask" in table.splitlines()[0] and table.splitlines()[-1].startswith("passing (")
    # the command line: the same result, its JSON with NaN shares as null
    from visae import cli

    sae.save(tmp_path / "sae")
    monkeypatch.chdir(tmp_path)  # relative --sae / --out: recorded absolute (they were recorded as typed)
    argv = ["patch-recovery", "--sae", "sae", "--shards", str(shards.path), "--auroc_at", "0",
            "--n_top", "4", "--out", "pr.json", "--threads", "1"]
    assert cli.main(argv) == 0
    got = json.loads((tmp_path / "pr.json").read_text())
    assert got["summary"] == s and len(got["values"]) == len(res["values"])
    assert (got["config"]["sae"], got["config"]["out"]) == (str(tmp_path / "sae"), str(tmp_path / "pr.json"))
    assert [r.get("in_box") for r in got["values"]] == [None if r.get("in_box") != r.get("in_box") else r.get("in_box")
                                                        for r in res["values"]]
    # bad input: one line naming the problem, a usage error (exit 2), nothing written
    assert cli.main(argv[:5] + ["--world_dir", str(tmp_path / "gone"), "--out", str(tmp_path / "no.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("visae patch-recovery: error: ") and "gone" in err[0], err
    assert not (tmp_path / "no.json").exists()
    assert cli.main(["patch-recovery", "--sae", str(tmp_path / "no_sae"), "--shards", str(shards.path)]) == 2
    assert "visae patch-recovery: error: " in capsys.readouterr().err


def test_box_coverage_of_continuous_overlapping_boxes():
    """world2's boxes are continuous: two overlapping boxes [0, 6] and [4, 12.5] x [0, 8] cover patch (0, 0) of an
    8 x 8 grid of a 64-pixel image wholly (their overlap counted once) and 4.5 / 8 of patch (0, 1); a box
    [60.25, 61, 70, 64] is clipped to the frame: 3.75 x 3 of patch (7, 7)'s 64 px^2. All values are sums of a few
    products of binary fractions: exact in float64."""
    from visae.patch_recovery import box_coverage

    cov = box_coverage(np.array([[[0, 0, 6, 8], [4, 0, 12.5, 8], [60.25, 61, 70, 64]]]), (8, 8), 64)
    want = np.zeros((1, 64))
    want[0, 0], want[0, 1], want[0, 63] = 1.0, 4.5 / 8, 3.75 * 3 / 64
    assert np.array_equal(cov, want), (np.flatnonzero(cov), cov[cov > 0])


def test_a_factor_left_out_of_object_factors_is_scored_on_the_main_object_only(world, tmp_path):
    """``object_factors`` says which factors count any object's value as a positive; a factor scored but left out
    of it (``object_factors=[]``) takes only the image's own column, the main object's (``objects[0]``), as it did
    before world2's adapter (which made every object factor any-object whatever ``object_factors`` said)."""
    from visae.patch_recovery import patch_recovery
    from visae.sae import SAEConfig, build_sae

    wdir, w = world
    acts = np.random.default_rng(0).random((N, 64, 1)) + 0.1  # every image scored: no value dropped as all-NaN
    ss = _write(tmp_path / "s", wdir, range(N), acts, w.factors)
    sae = build_sae(SAEConfig(architecture="relu", d_in=2, d_sae=1, input_normalization="none"))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, 0] = 1.0
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    fam = world2.colour_families()
    main = np.bincount([fam[sc.objects[0].colour] for sc in w.scenes], minlength=len(world2.FAMILIES))
    anyo = np.array([sum(any(fam[o.colour] == v for o in sc.objects) for sc in w.scenes)
                     for v in range(len(world2.FAMILIES))])
    assert (anyo != main).any(), "no image with a family only on a later object: the sample does not test this"
    for object_factors, want in (([], main), (["colour_family"], anyo)):
        res = patch_recovery(sae, ss, factors=["colour_family"], object_factors=object_factors, n_top=2,
                             auroc_at=0.0)  # every latent's heat measured, for the object factors only
        got = {r["value"]: r["n_pos"] for r in res["values"]}
        assert got == {world2.FAMILIES[v]: int(want[v]) for v in range(len(want)) if want[v]}, (object_factors, got)
        assert all(("in_box" in r) == bool(object_factors) for r in res["values"]), res["values"]
