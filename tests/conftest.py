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
