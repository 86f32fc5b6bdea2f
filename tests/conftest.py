import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch

from edgec.search.space import fbnet_space


def needs_target(*names: str):
    """A skip marker for a test that runs on these targets, naming the first one missing and why."""
    from edgec.targets import get_target

    for name in names:
        ok, why = get_target(name).availability()
        if not ok:
            return pytest.mark.skipif(True, reason=f"{name}: {why}")
    return pytest.mark.skipif(False, reason="")


def pytest_configure(config):
    """Trained supernets go to a per-session temporary cache, never the user's (set before any fixture)."""
    import tempfile

    os.environ["EDGEC_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgec-test-cache-")


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(os.environ.get("EDGEC_CACHE_DIR", ""), ignore_errors=True)


@pytest.fixture
def spec8():
    return fbnet_space(1, 8, 10)


@pytest.fixture
def randomized_supernet(spec8):
    """A supernet with random weights *and* random BN statistics, so slicing bugs show."""
    from edgec.search.supernet import Supernet

    torch.manual_seed(0)
    net = Supernet(spec8)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture
def images8():
    return np.random.default_rng(0).random((300, 1, 8, 8), dtype=np.float32)
