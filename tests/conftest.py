import os

import pytest
import torch

# One thread: on a shared 2-core box OpenMP oversubscription makes these tiny models 10x slower.
torch.set_num_threads(1)


@pytest.fixture
def rng():
    """A fresh, unseeded generator per test (seed printed on failure through the test id is not needed: the
    assertions compare against references computed on the same draw)."""
    g = torch.Generator()
    g.seed()
    return g


@pytest.fixture(scope="module")
def one_thread():
    """For fixtures that must run single-threaded whatever a test changed: pins, then restores, torch's threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
