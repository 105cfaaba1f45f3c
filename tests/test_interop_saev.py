"""saev shards (protocol 2.1) -> visae shard sets without a full load; saev SAE checkpoints -> visae.

The saev layouts are written here as saev writes them (OSU-NLP-Group/saev @3d73f1f7:
src/saev/data/shards.py ShardWriter / Metadata, src/saev/nn/modeling.py dump), and the SAE
reference forward follows saev's SparseAutoencoder.encode / decode.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from visae.interop import InteropError
from visae.interop.saev import convert_saev_shards, import_saev_sae
from visae.sae import SAEFormatError, load_sae
from visae.shards import ShardSet

REPO = Path(__file__).resolve().parents[1]
LAYERS, P, D = [3, 7], 16, 64
T = P + 1  # with a CLS token


def _value(e, li, t, d):
    """Deterministic activations, never a zero row: saev [example, layer, token, dim]."""
    return (((e * 7 + t * 3 + d) % 50) + 1) * 0.01 * (li + 1) - 0.2


def _write_saev(root: Path, shard_counts, per_shard, protocol="2.1"):
    """A saev shard folder: full-size acts files ([per_shard, L, T, D] float32), the last one partly filled."""
    root.mkdir(parents=True)
    L = len(LAYERS)
    meta = {"family": "clip", "ckpt": "ViT-B-16/openai", "layers": LAYERS, "content_tokens_per_example": P,
            "cls_token": True, "d_model": D, "n_examples": sum(shard_counts),
            "max_tokens_per_shard": per_shard * T * L, "data": "", "dataset": "/data/imgs",
            "pixel_agg": "majority", "dtype": "float32", "protocol": protocol}
    (root / "metadata.json").write_text(json.dumps(meta))
    shards, e_base = [], 0
    for i, n in enumerate(shard_counts):
        name = f"acts{i:06d}.bin"
        mm = np.memmap(root / name, dtype=np.float32, mode="w+", shape=(per_shard, L, T, D))
        for c0 in range(0, n, 1000):
            c1 = min(n, c0 + 1000)
            e = np.arange(e_base + c0, e_base + c1)[:, None, None, None]
            li = np.arange(L)[None, :, None, None]
            t = np.arange(T)[None, None, :, None]
            d = np.arange(D)[None, None, None, :]
            mm[c0:c1] = _value(e, li, t, d)
        mm.flush()
        del mm
        shards.append({"name": name, "n_examples": n})
        e_base += n
    (root / "shards.json").write_text(json.dumps(shards))
    return root


def test_saev_shards_convert_without_loading_whole(tmp_path):
    per_shard = 9000  # one shard file: 9000 * 2 * 17 * 64 * 4 B = 78 MB
    src = _write_saev(tmp_path / "saev" / "shards" / "abcd1234", [9000, 3000], per_shard)
    out = tmp_path / "visae_shards"
    script = textwrap.dedent(f"""
        import resource
        import numpy as np
        from visae.interop.saev import convert_saev_shards

        def vm_bytes():
            for line in open("/proc/self/status"):
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        limit = vm_bytes() + (48 << 20)   # 48 MB of address space left: less than one saev shard (78 MB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            np.fromfile({str(src / 'acts000000.bin')!r}, dtype=np.float32)
            print("WHOLE_SHARD_LOADED")
        except MemoryError:
            print("WHOLE_SHARD_REFUSED")
        convert_saev_shards({str(src)!r}, {str(out)!r}, layer=7, token="patch", shard_size=16384,
                            chunk_bytes=4 << 20)
        print("CONVERTED")
    """)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WHOLE_SHARD_REFUSED" in r.stdout  # the limit is real: one shard does not fit
    assert "CONVERTED" in r.stdout
    ss = ShardSet(out)
    assert len(ss) == 12000 * P and ss.d == D
    assert ss.source["layer"] == 7 and ss.source["token"] == "patch" and ss.source["saev"]["protocol"] == "2.1"
    rows = np.array([0, 1, 15, 16, 9000 * P - 1, 9000 * P, 9000 * P + 17, 12000 * P - 1])
    got = ss.read(rows, raw=True)
    e, k = rows // P, rows % P
    want = _value(e[:, None], 1, 1 + k[:, None], np.arange(D)[None, :])  # layer 7 = index 1; token 0 is CLS
    norm = np.linalg.norm(want, axis=1, keepdims=True)
    # float16 storage of unit-norm rows: |error| <= 2^-11 per element of the unit row, times the norm
    assert np.abs(got - want).max() <= float((2.0 ** -11 * norm).max()) * 1.01
    ids = np.concatenate([ss.shard_meta(i)["id"] for i in range(ss.num_shards)])
    assert ids[0] == "saev:0#p0" and ids[17] == "saev:1#p1" and ids[9000 * P] == "saev:9000#p0"


def test_saev_shard_errors(tmp_path):
    src = _write_saev(tmp_path / "s", [10], 10, protocol="1.1")
    with pytest.raises(InteropError, match="protocol.*'1.1'.*2.1"):
        convert_saev_shards(src, tmp_path / "o", layer=3)
    meta = json.loads((src / "metadata.json").read_text())
    meta["protocol"] = "2.1"
    (src / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(InteropError, match=r"layer 5 was not recorded \(layers \[3, 7\]\)"):
        convert_saev_shards(src, tmp_path / "o", layer=5)
    assert not (tmp_path / "o").exists()
    with pytest.raises(SAEFormatError, match="saev activation shard folder"):
        load_sae(src)
    ss = convert_saev_shards(src, tmp_path / "o", layer=3, token="cls", dtype="float32")
    assert len(ss) == 10 and str(ss.shard_meta(0)["id"][3]) == "saev:3"
    # saev's "ViT-B-16/openai" is open_clip's model and tag: recorded so that naming / splicing can load it
    assert (ss.source["model"], ss.source["pretrained"]) == ("ViT-B-16", "openai")
    # a zero activation vector: named by saev's example and token (the writer named visae's row)
    mm = np.memmap(src / "acts000000.bin", dtype=np.float32, mode="r+", shape=(10, len(LAYERS), T, D))
    mm[6, 0, 2, :] = 0.0
    mm.flush()
    del mm
    with pytest.raises(InteropError, match=r"acts000000\.bin: saev:6#p1 \(layer 3, token patch\) is a zero"):
        convert_saev_shards(src, tmp_path / "o2", layer=3)


# ----------------------------------------------------------------------------- SAE checkpoints

D_SAE = 48


def _saev_state(seed, threshold=None):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(D_SAE, D, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    state = {"W_dec": W_dec, "b_dec": torch.randn(D, generator=g) * 0.1,
             "W_enc": torch.randn(D, D_SAE, generator=g) * 0.2, "b_enc": torch.randn(D_SAE, generator=g) * 0.1 + 0.3}
    if threshold is not None:
        state["activation.threshold"] = torch.tensor(threshold)
    return state


def _dump(path: Path, header: dict, state: dict) -> Path:
    """saev.nn.modeling.dump: one JSON header line, then torch.save(state_dict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write((json.dumps(header) + "\n").encode())
        torch.save(state, fh)
    return path


def _reference(state, act, params, x):
    """saev SparseAutoencoder.forward in eval mode: h = x W_enc + b_enc; f = activation(h); x_hat = f W_dec + b_dec."""
    h = x @ state["W_enc"] + state["b_enc"]
    if act == "Relu":
        f = torch.relu(h)
    elif act == "TopK":
        _, idx = torch.topk(h, params["top_k"], dim=-1, sorted=False)
        f = torch.zeros_like(h).scatter(-1, idx, 1.0) * h
    else:  # BatchTopK, eval: threshold <= 0 -> ReLU, else h * (h > threshold)
        thr = state["activation.threshold"]
        f = torch.where(h > 0, h, 0.0) if thr <= 0 else torch.where(h > thr, h, 0.0)
    return f, f @ state["W_dec"] + state["b_dec"]


@pytest.mark.parametrize("act,params,schema,threshold", [
    ("Relu", {"key": "relu", "sparsity": {"cls": "L1Sparsity", "params": {"coeff": 4e-4}}}, 5, None),
    ("TopK", {"key": "top-k", "top_k": 5}, 5, None),
    ("BatchTopK", {"key": "batch-top-k", "top_k": 5, "momentum": 0.1}, 4, 0.35),
    ("Relu", None, None, None),  # pre-schema legacy header
])
def test_saev_sae_import_matches_reference(tmp_path, act, params, schema, threshold):
    state = _saev_state(1, threshold)
    if schema is None:
        header = {"d_vit": D, "exp_factor": D_SAE // D if D_SAE % D == 0 else 1, "d_sae": D_SAE, "l1_coeff": 4e-4}
    else:
        cfg = {"d_model": D, "d_sae": D_SAE, "activation": {"cls": act, "params": params},
               "reinit_blend": 0.8, "normalize_w_dec": True}
        header = {"schema": schema, "cfg": cfg, "commit": "unknown", "lib": "1.0"}
    f = _dump(tmp_path / "run" / "checkpoint" / "sae.pt", header, state)
    sae = import_saev_sae(tmp_path / "run", out=tmp_path / "visae", layer=7, token="patch", model="ViT-B-16:openai")
    sae = load_sae(tmp_path / "visae")
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        ref_f, ref_x = _reference(state, act, params or {}, x)
        x_hat, codes = sae(x)
    if act == "TopK":  # the documented condition under which saev's TopK and visae's ReLU(TopK) agree
        assert float(torch.topk(ref_f, 5, dim=-1).values[:, -1].min()) > 0
    eps = torch.finfo(torch.float32).eps
    assert (codes - ref_f).abs().max() <= 8 * eps * D * float(ref_f.abs().max() + x.abs().max())
    assert (x_hat - ref_x).abs().max() <= 8 * eps * (D + D_SAE) * float(ref_x.abs().max() + ref_f.abs().max())
    assert (ref_f > 0).any() and not (ref_f > 0).all()
    assert sae.extra["source"] == {"model": "ViT-B-16:openai", "layer": 7, "token": "patch"}
    assert sae.extra["imported_from"]["format"] == "saev" and f.exists()


def test_saev_sae_errors(tmp_path):
    # a file of another kind (binary, no JSON first line): a named error, not a UnicodeDecodeError traceback
    other = tmp_path / "other" / "weights.safetensors"
    other.parent.mkdir()
    other.write_bytes(b"\xb4\x00\x01binary\nmore")
    with pytest.raises(InteropError, match="not a saev checkpoint"):
        import_saev_sae(other)
    f = _dump(tmp_path / "sae.pt", {"schema": 9, "cfg": {}}, _saev_state(0))
    with pytest.raises(InteropError, match="schema 9 is unknown"):
        import_saev_sae(f)
    f = _dump(tmp_path / "b" / "sae.pt", {"schema": 5, "cfg": {"activation": {"cls": "Matryoshka2", "params": {}}}},
              _saev_state(0))
    with pytest.raises(InteropError, match="activation 'Matryoshka2' is not supported"):
        import_saev_sae(f)
    with pytest.raises(SAEFormatError, match="saev SAE checkpoint.*import_saev_sae"):
        load_sae(tmp_path / "b")
