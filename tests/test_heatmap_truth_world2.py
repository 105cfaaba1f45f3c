"""Ground truth of patch heatmaps on world2 (issue 14 item 2) with world2's shipped toy CLIP (``visae-toyclip2-reg4``).

What is asserted and what is not (BENCHMARKS.md, "Patch heatmaps on world2 (issue 14)"): on single-object world2
scenes, a TopK SAE on the patch tokens after block 0 has a colour-family latent at the issue's AUROC >= 0.95, and the
heat of the best detected colour family (the value whose best latent has the highest AUROC), as the site computes it,
lies on the object; at least one value meets the issue's whole per-value criterion (a latent at AUROC >= 0.95 with
>= 80 % of its heat, area-weighted, in the object's box). The issue's full criterion (>= 5 such values, colour and
shape among them) is a strict xfail: measured with this test's settings (2026-12-01, an AMD EPYC where torch
2.14.1 runs its AVX512 kernels), SAE seeds 0 / 1 / 2 pass 2 / 5 / 6 values after block 0 (colour families and the
gradient texture) and 2 / 5 / 3 after block 1, never a shape (shape latents at 0.85-0.95 do sit on the object, after
block 1: stars, ring, crescent).

With ``visae-toyclip2`` (world2's model before the register tokens) the best colour latent after block 0 sat at AUROC
0.91-0.96 with the seed and the machine, so the gate was 0.85 then; with the register model it is 0.996 / 0.982 /
0.994 (blue, blue, green) for SAE seeds 0 / 1 / 2.
"""


import numpy as np
import pytest
from conftest import patch_sae_on_world

WORLD_SEED, N_IMAGES, LAYER, AUROC_AT, HEAT_AT = 5000, 2000, 0, 0.95, 0.8


@pytest.fixture(scope="module")
def patch_sae(tmp_path_factory):
    """2,000 single-object scenes of world2 seed 5000 (``python -m visae.world2 --max_objects 1``), the shipped v2 toy
    CLIP's patch tokens after block 0, a TopK SAE (k 8, 384 latents, 10 epochs) on them, and its top images with
    heatmaps from the site's streaming pass (``compute_top_images``). White is rare (about 1.5 % of the scenes): on
    800 scenes its best latent reached only AUROC 0.889, hence the 2,000."""
    from visae import toyclip
    from visae.world2 import generate_world2

    weights = toyclip.SHIPPED_WEIGHTS[toyclip.WORLD2_MODEL]
    if not weights.is_file():
        pytest.skip(f"world2's toy CLIP's weights are not shipped in this checkout ({weights})")
    tmp = tmp_path_factory.mktemp("heat2")
    world = generate_world2(tmp / "world", N_IMAGES, WORLD_SEED, max_objects=1, progress=False, workers=1)
    return patch_sae_on_world(tmp, world, toyclip.WORLD2_MODEL, str(weights), LAYER, num_epochs=10)


@pytest.fixture(scope="module")
def recovery(patch_sae):
    """``patch_recovery`` at the issue's thresholds and its printed table."""
    from visae.patch_recovery import format_patch_recovery, patch_recovery

    res = patch_recovery(patch_sae["sae"], patch_sae["shards"], factors=("shape", "colour_family", "texture"),
                         top_images=patch_sae["top"], auroc_at=AUROC_AT, heat_at=HEAT_AT)
    table = format_patch_recovery(res)
    print(table)
    return res, table


def test_a_colour_latents_heatmaps_lie_on_the_object(patch_sae, recovery):
    from visae.browse.site import heat_attrs
    from visae.patch_recovery import box_coverage, world_objects
    from visae.topimages import patch_layout

    ss, ti = patch_sae["shards"], patch_sae["top"]
    res, table = recovery
    # the heat is measured for the latents at AUROC_AT; the value judged is the best detected colour family
    colours = [r for r in res["values"] if r["factor"] == "colour_family" and "in_box" in r]
    assert colours, f"no colour-family latent at AUROC >= {AUROC_AT}\n{table}"
    best = max(colours, key=lambda r: r["auroc"])
    # measured (the AVX512 machine) for SAE seeds 0 / 1 / 2 (blue, blue, green): peak on box 1.00 each, touching 0.998 /
    # 1.00 / 1.00, in box 0.857 / 0.869 / 0.890, in mask 0.636 / 0.632 / 0.693 (visae-toyclip2 at its gate 0.85: in box
    # 0.70-0.79, in mask 0.51-0.59)
    assert best["peak_on_box"] >= 0.9, f'hottest patch off the {best["value"]} object in {1 - best["peak_on_box"]:.0%}\n{table}'
    assert best["touching"] >= 0.9, f'{best["touching"]:.3f} of the heat touches the box\n{table}'
    assert best["in_box"] >= 0.75, f'area-weighted heat in the box {best["in_box"]:.3f}\n{table}'
    assert best["in_mask"] >= 0.5, f'heat on the object mask {best["in_mask"]:.3f}\n{table}'
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


def test_values_meet_the_issues_per_value_criterion(recovery):
    """A latent at AUROC >= 0.95 with >= 80 % of its heat in the object's box: measured for 2 / 5 / 6 values with SAE
    seeds 0 / 1 / 2 (seed 0: green and blue), so at least one is asserted."""
    res, table = recovery
    assert len(res["summary"]["passing"]) >= 1, table


@pytest.mark.xfail(strict=True, reason="issue 14 item 2 not met: >= 5 values with colour and shape among them; "
                   "measured 2 / 5 / 6 values for SAE seeds 0 / 1 / 2 after block 0, never a shape (module docstring)")
def test_the_issues_full_heatmap_criterion(recovery):
    res, table = recovery
    passing = res["summary"]["passing"]
    assert len(passing) >= 5 and {"colour_family", "shape"} <= set(res["summary"]["passing_factors"]), table
