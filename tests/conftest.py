import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest runs alongside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    """A fresh, unseeded generator per test (seed printed on failure through the test id is not needed: the
    assertions compare against references computed on the same draw)."""
    g = torch.Generator()
    g.seed()
    return g
