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


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests run tiny shapes: one intra-op thread avoids OpenMP barrier stalls on a 2-core machine
    (measured 10-100x slower steps with two threads when the cores are shared) and keeps runs
    bit-reproducible."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
