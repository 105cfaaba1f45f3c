"""Discover-then-Name checkpoints -> visae, against a reference forward written from its code.

The reference below follows the vendored sparse_autoencoder library of
neuroexplicit-saar/Discover-then-Name at commit 03484baef77747596712cf971e402f77b9da5a9a
(autoencoder/model.py SparseAutoencoder.forward: TiedBias(pre) -> LinearEncoder -> UnitNormDecoder
-> TiedBias(post)); the old library itself pins an old torch and is not installed here.
"""

import pytest
import torch

from visae.interop import InteropError
from visae.interop.dncbm import import_dncbm
from visae.sae import SAEFormatError, load_sae

N, M = 512, 96  # n input features (ViT-B/16 image embedding width, the importer's default model), m learned features


def _dncbm_state(C=1, seed=0):
    """A state_dict with the library's key names and shapes (n_components=C, or None when C is None)."""
    g = torch.Generator().manual_seed(seed)
    c = 1 if C is None else C
    tied = torch.randn(c, N, generator=g) * 0.1
    We = torch.randn(c, M, N, generator=g) * 0.3
    be = torch.randn(c, M, generator=g) * 0.1
    Wd = torch.randn(c, N, M, generator=g)
    Wd = Wd / Wd.norm(dim=-2, keepdim=True)  # UnitNormDecoder: unit-norm columns (dim -2)
    state = {"tied_bias": tied, "pre_encoder_bias._bias_reference": tied, "post_decoder_bias._bias_reference": tied,
             "encoder._weight": We, "encoder._bias": be, "decoder._weight": Wd}
    if C is None:
        state = {k: v[0] for k, v in state.items()}
    return state


def _reference_forward(state, x, c=0):
    """sparse_autoencoder's SparseAutoencoder.forward for component c on x [B, n] -> (learned, decoded)."""
    tied = state["tied_bias"] if state["tied_bias"].ndim == 1 else state["tied_bias"][c]
    We = state["encoder._weight"] if state["encoder._weight"].ndim == 2 else state["encoder._weight"][c]
    be = state["encoder._bias"] if state["encoder._bias"].ndim == 1 else state["encoder._bias"][c]
    Wd = state["decoder._weight"] if state["decoder._weight"].ndim == 2 else state["decoder._weight"][c]
    h = x - tied                                              # TiedBias PRE_ENCODER: x - bias
    learned = torch.relu(torch.einsum("bi,li->bl", h, We) + be)  # LinearEncoder: ReLU(x W_e^T + b_e)
    decoded = torch.einsum("bl,il->bi", learned, Wd)          # UnitNormDecoder: f W_d^T
    return learned, decoded + tied                            # TiedBias POST_DECODER: + bias


def _embeddings(n=50, seed=1):
    # raw CLIP-like image embeddings: not unit norm (DnCBM feeds model.encode_image outputs as they are)
    return torch.randn(n, N, generator=torch.Generator().manual_seed(seed)) * 0.8


@pytest.mark.parametrize("C", [1, None, 2])
def test_dncbm_import_matches_reference_forward(tmp_path, C):
    state = _dncbm_state(C)
    ckdir = tmp_path / "dncbm_run" / "sae_checkpoints"
    ckdir.mkdir(parents=True)
    torch.save(state, ckdir / "sparse_autoencoder_final.pt")
    comp = 1 if C == 2 else 0
    import_dncbm(tmp_path / "dncbm_run", out=tmp_path / "visae", component=comp)
    sae = load_sae(tmp_path / "visae")
    x = _embeddings()
    with torch.no_grad():
        ref_f, ref_x = _reference_forward(state, x, comp)
        x_hat, f = sae(x)
    eps = torch.finfo(torch.float32).eps
    # float32 sums of n (encoder) and m (decoder) terms
    assert (f - ref_f).abs().max() <= 4 * eps * N * float(ref_f.abs().max() + 1)
    assert (x_hat - ref_x).abs().max() <= 4 * eps * (N + M) * float(ref_x.abs().max() + ref_f.abs().max())
    assert (ref_f > 0).any() and not (ref_f > 0).all()
    assert sae.cfg.input_normalization == "none" and sae.cfg.scale_factor == 1.0
    src = sae.extra["source"]
    assert src["model"] == "ViT-B-16" and src["pretrained"] == "openai" and src["read"] == "image_embedding"
    assert src["layer"] is None  # the final image embedding: nameable and zero-shot-selectable
    from visae.zeroshot import final_embedding_problem

    assert final_embedding_problem(src) is None


def test_dncbm_errors(tmp_path):
    state = _dncbm_state()
    del state["encoder._bias"]
    torch.save(state, tmp_path / "sparse_autoencoder_final.pt")
    with pytest.raises(InteropError, match=r"missing key\(s\) \['encoder._bias'\]"):
        import_dncbm(tmp_path / "sparse_autoencoder_final.pt")
    with pytest.raises(SAEFormatError, match="Discover-then-Name checkpoint.*import_dncbm"):
        load_sae(tmp_path)
    bad = _dncbm_state()
    bad["decoder._weight"] = bad["decoder._weight"][:, :, :5]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(InteropError, match=r"decoder._weight has shape \[1, 512, 5\], expected \[1, 512, 96\]"):
        import_dncbm(tmp_path / "bad.pt")


class _NotATensor:  # a pickled object: weights_only loading refuses it
    pass


def test_dncbm_non_finite_weights_are_refused_at_import(tmp_path):
    """An all-NaN encoder imported without complaint and failed only when named; now the import names the tensor."""
    state = _dncbm_state()
    state["encoder._weight"] = torch.full_like(state["encoder._weight"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(InteropError, match=r"tensor 'W_enc' holds \d+ non-finite value"):
        import_dncbm(tmp_path / "nan.pt", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dncbm_unreadable_files_name_the_cause_without_torchs_retry_advice(tmp_path):
    """A damaged file and a file holding pickled objects are refused naming the file and the cause; torch's advice to
    retry with weights_only=False (running the file's code) is not passed on."""
    (tmp_path / "garbage.pt").write_bytes(b"garbage bytes here")
    torch.save({"obj": _NotATensor()}, tmp_path / "objects.pt")
    for name, cause in (("garbage.pt", "not a torch checkpoint, or damaged"),
                        ("objects.pt", "it holds objects other than tensors (Unsupported global")):
        with pytest.raises(InteropError) as info:
            import_dncbm(tmp_path / name)
        msg = str(info.value)
        assert msg.startswith(f"{tmp_path / name}: not a readable torch state_dict") and cause in msg, msg
        assert "weights_only=True and runs no pickled code" in msg and "set to `False`" not in msg


def test_a_checkpoint_of_another_width_than_the_named_model_is_refused(tmp_path):
    """A 768-wide checkpoint (DnCBM's clip_ViT-L/14) imported with the default model recorded ViT-B-16's image
    embedding (512) as its source: naming and splicing would then load the wrong model."""
    state = {k: torch.randn(*((1, 96, 768) if k == "encoder._weight" else (1, 768, 96) if k == "decoder._weight"
                              else (1, 768) if k == "tied_bias" else (1, 96))) for k in
             ("tied_bias", "encoder._weight", "encoder._bias", "decoder._weight")}
    torch.save(state, tmp_path / "sparse_autoencoder_final.pt")
    with pytest.raises(InteropError, match=r"768-wide embeddings but model='ViT-B-16:openai' embeds images in 512"):
        import_dncbm(tmp_path / "sparse_autoencoder_final.pt")
    sae = import_dncbm(tmp_path / "sparse_autoencoder_final.pt", model="ViT-L-14:openai")
    assert sae.d_in == 768 and sae.extra["source"]["model"] == "ViT-L-14"
    assert import_dncbm(tmp_path / "sparse_autoencoder_final.pt", model=None).extra["source"]["model"] is None
