"""Ground truth of patch heatmaps on world2 (issue 14 item 2) with the shipped v2 toy CLIP (``visae-toyclip2``).

What is asserted and what is not (BENCHMARKS.md, "Patch heatmaps on world2 (issue 14)"): on single-object world2
scenes, a TopK SAE on the patch tokens after block 0 has a colour-family latent at image-level AUROC >= 0.85, and the
heat of the best detected colour family (the value whose best latent has the highest AUROC), as the site computes it,
lies on the object. The issue's full criterion (>= 5 values at AUROC >= 0.95 with >= 80 % of their heat in the box,
colour and shape among them) is not met by this model and is not asserted: shape latents reach 0.95 (ring 0.97-0.99,
after block 1) but fire on the background patches of images that hold the shape (heat in box <= 0.003).

Why 0.85 and not the issue's 0.95: the best colour latent after block 0 sits at AUROC 0.91-0.96 depending on the SAE's
seed and on the machine (2026-12-01, an AMD EPYC where torch 2.14.1 runs its AVX512 kernels, SAE seeds 0 / 1 / 2:
blue 0.906 / 0.940 / 0.954; an earlier machine gave white 0.939 / blue 0.951 / white 0.940, and this test, gated at
0.93, then failed on the new one at seed 0: float summation order moves an SAE's training). The gate only picks a colour detector; the heat is what is judged.
"""


import numpy as np
import pytest
from conftest import patch_sae_on_world

WORLD_SEED, N_IMAGES, LAYER, AUROC_AT = 5000, 2000, 0, 0.85


@pytest.fixture(scope="module")
def patch_sae(tmp_path_factory):
    """2,000 single-object scenes of world2 seed 5000 (``python -m visae.world2 --max_objects 1``), the shipped v2 toy
    CLIP's patch tokens after block 0, a TopK SAE (k 8, 384 latents, 10 epochs) on them, and its top images with
    heatmaps from the site's streaming pass (``compute_top_images``). White is rare (about 1.5 % of the scenes): on
    800 scenes its best latent reached only AUROC 0.889, hence the 2,000."""
    from visae import toyclip
    from visae.world2 import generate_world2

    weights = getattr(toyclip, "TOYCLIP2_WEIGHTS", None)
    if weights is None or not weights.is_file():
        pytest.skip(f"the v2 toy CLIP's weights are not shipped in this checkout ({weights})")
    tmp = tmp_path_factory.mktemp("heat2")
    world = generate_world2(tmp / "world", N_IMAGES, WORLD_SEED, max_objects=1, progress=False, workers=1)
    return patch_sae_on_world(tmp, world, "visae-toyclip2", str(weights), LAYER, num_epochs=10)


def test_a_colour_latents_heatmaps_lie_on_the_object(patch_sae):
    from visae.browse.site import heat_attrs
    from visae.patch_recovery import box_coverage, format_patch_recovery, patch_recovery, world_objects
    from visae.topimages import patch_layout

    sae, ss, ti = patch_sae["sae"], patch_sae["shards"], patch_sae["top"]
    res = patch_recovery(sae, ss, factors=("shape", "colour_family", "texture"), top_images=ti, auroc_at=AUROC_AT)
    table = format_patch_recovery(res)
    print(table)
    # the heat is measured for the latents at AUROC_AT; the value judged is the best detected colour family
    colours = [r for r in res["values"] if r["factor"] == "colour_family" and "in_box" in r]
    assert colours, f"no colour-family latent at AUROC >= {AUROC_AT}\n{table}"
    best = max(colours, key=lambda r: r["auroc"])
    # measured (the AVX512 machine) for SAE seeds 0 / 1 / 2, blue each time: peak on box 0.94 / 1.00 / 1.00, touching 0.94 /
    # 0.97 / 0.95, in box 0.75 / 0.73 / 0.79, in mask 0.52 / 0.56 / 0.59; on the earlier machine the best detected
    # colours were white 0.939 (0.81 / 0.83 / 0.70 / 0.51, the lowest of all: 0.06-0.11 above the thresholds), blue
    # 0.951 and blue 0.959
    assert best["peak_on_box"] >= 0.75, f'hottest patch off the {best["value"]} object in {1 - best["peak_on_box"]:.0%}\n{table}'
    assert best["touching"] >= 0.75, f'{best["touching"]:.3f} of the heat touches the box\n{table}'
    assert best["in_box"] >= 0.6, f'area-weighted heat in the box {best["in_box"]:.3f}\n{table}'
    assert best["in_mask"] >= 0.4, f'heat on the object mask {best["in_mask"]:.3f}\n{table}'
    # the heat the page draws (heat_attrs: 0-99 per patch, row-major) peaks on the object's box in its top images
    W = world_objects(ss)
    img, _ = patch_layout(ss.metadata()["id"])
    grid = tuple(int(g) for g in ti.patch_grid)
    j, v = best["latent"], W.factor_names["colour_family"].index(best["value"])
    ok = ti.top_index[j] >= 0
    heat = ti.top_heat[j][ok].astype(np.float64)
    im = img[ti.top_index[j][ok]]
    sel = W.values["colour_family"][im] == v
    cov = box_coverage(np.where(sel[:, :, None], W.boxes[im], -1.0), grid, W.image_size)
    scale = float(heat.max())
    on = []
    for t in range(len(heat)):
        q = np.array([int(x) for x in heat_attrs(heat[t], grid, scale).split('data-heat="')[1].split('"')[0].split(",")])
        # the page draws the stored heatmap: its peak patch holds the largest heat to within one 0-99 step
        assert heat[t][q.argmax()] >= heat[t].max() - scale / 99, (best["value"], j, t)
        on.append(cov[t, q.argmax()] > 0)
    assert np.mean(on) >= 0.75, f"{best['value']} latent {j}: the page's peak is off the box in top images {np.flatnonzero(~np.array(on))}"
