import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not present")
    return SHARED


@pytest.fixture(scope="session")
def imagenet_sample(shared_dir) -> Path:
    return shared_dir / "imagenet-sample"


def _test_threads() -> int:
    """Intra-op threads for every test: 1, or ``VISAE_TEST_THREADS`` (to check that no test depends on it)."""
    raw = os.environ.get("VISAE_TEST_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise pytest.UsageError(f"VISAE_TEST_THREADS={raw!r}: expected a whole number of threads >= 1")
    return n


TEST_THREADS = _test_threads()


def pytest_report_header(config):
    return (f"visae: {TEST_THREADS} torch intra-op thread(s) per test (VISAE_TEST_THREADS), "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()} (ATEN_CPU_CAPABILITY)")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests run tiny shapes: one intra-op thread avoids OpenMP barrier stalls on a 2-core machine
    (measured 10-100x slower steps with two threads when the cores are shared). ``VISAE_TEST_THREADS=N``
    runs them with N threads instead: every float comparison in the suite must hold with any thread
    count (tolerances come from tests/tolerances.py, or the results are bit-identical by construction)."""
    n = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def toy_world_embeddings():
    """The demo's toy world (6,000 images, seed 5000, not the toy CLIP's training world) embedded by the
    shipped toy CLIP: ``{"backbone", "world", "x": [6000, 96] float32 tensor (unit-normed image embeddings),
    "source": shard-set source record}``. Shared by the naming and CBM ground-truth tests (rendering and
    embedding it costs ~25 s of CPU). Skips when the weights are not shipped."""
    from visae import toyclip
    from visae import toyworld as tw
    from visae.backbones import load_backbone

    if not toyclip.TOYCLIP_WEIGHTS.is_file():
        pytest.skip(f"{toyclip.TOYCLIP_WEIGHTS} is not shipped")
    bb = load_backbone("visae-toyclip")
    world = tw.sample_world(6000, 5000)  # the demo's world seed
    with torch.no_grad():
        x = toyclip.encode_world_images(bb.model, world.images)
    source = {"model": bb.name, "pretrained": bb.pretrained, "random_init": False, "layer": None, "token": None,
              "dataset": "toyworld seed 5000 (in memory)"}
    return {"backbone": bb, "world": world, "x": x, "source": source}


@pytest.fixture(scope="session")
def world2_demo_dir(tmp_path_factory) -> Path:
    """The demo as a user runs it (its default world is world2, with the shipped ``visae-toyclip2-reg4``) with the 20k naming
    list as distractors (``visae demo --distractors ../shared/vocab/20k.txt``, 2 threads): its output
    directory (world/, select_world/, shards/, select_shards/, sweep/, concepts/, site/, recovery.json). Built once per
    session (~170 s of CPU, ~105 s on 2 idle cores)
    and shared by the world2 ground-truth tests. Skips when the naming list is not beside the checkout."""
    from visae import demo

    vocab = SHARED / "vocab" / "20k.txt"
    if not vocab.is_file():
        pytest.skip(f"{vocab} (the naming list) is not beside the checkout")
    out = tmp_path_factory.mktemp("w2demo") / "demo"
    # 2 threads (torch and the world's worker processes): the suite runs one test at a time, so this fixture has both
    # cores of a 2-core machine (147 s at 1 thread, idle); the demo's results are the same with 1 or 2 (measured:
    # every trial's score and recovery identical)
    argv = ["--out", str(out), "--distractors", str(vocab), "--threads", "2", "--no_progress"]
    assert demo.main(argv) == 0
    return out


def patch_sae_on_world(tmp: Path, world: Path, model: str, pretrained: str | None, layer: int,
                       num_epochs: int, seed: int = 0) -> dict:
    """The heatmap ground-truth pipeline of issue 14 item 2 on a generated world directory: ``model``'s patch tokens
    after block ``layer`` (``visae extract --token patch``), a TopK SAE on them (k 8, 384 latents, lr 2e-3, no
    resampling, ``seed``) and its top images with heatmaps from the site's streaming pass (``compute_top_images``,
    16 a latent). Returns ``{"sae", "shards", "top"}``."""
    from visae.extract import ExtractConfig, extract
    from visae.sae import load_sae
    from visae.topimages import compute_top_images
    from visae.train import TrainConfig, train

    shards = extract(ExtractConfig(images=str(world), out=str(tmp / "shards"), model=model, pretrained=pretrained,
                                   layer=layer, token="patch", batch_size=200, num_workers=0, threads=1, progress=False))
    sae_dir = train(TrainConfig(shards=str(shards.path), out=str(tmp / "sae"), architecture="topk", k=8,
                                expansion_factor=4, num_epochs=num_epochs, batch_size=1024, lr=2e-3, resample_every=0,
                                l1_warmup_steps=0, seed=seed, progress=False, plot=False))
    sae = load_sae(sae_dir)
    return {"sae": sae, "shards": shards, "top": compute_top_images(sae, shards, n_top=16, n_random=0, progress=False)}
