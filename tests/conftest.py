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


@pytest.fixture(scope="session")
def exported_zoo(tmp_path_factory):
    """A real exported zoo, made once per session by the export stage: the embedded family's three pretrained anchors
    and one untrained stitch, parity-checked on 100 Fashion-MNIST test images and profiled (CPU, 1 thread, batch 1).
    Read-only for tests: copy it before changing anything."""
    import klas
    from klas.data import load_dataset
    from klas.export import export_models
    from klas.stages.s6_export import ExportConfig
    from klas.stitch import StitchConfig, StitchedNet, StitchLayer

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(2)
    fam = klas.create_family("fmnist-deit", pretrained=True)
    nets = [(StitchConfig.anchor(v.name), StitchedNet(v, -1, v, -1, None), None) for v in fam]
    src, tgt = fam[0], fam[1]
    nets.append((StitchConfig(src.name, 5, tgt.name, 6),
                 StitchedNet(src, 5, tgt, 6, StitchLayer(src.feature_dim(5), tgt.feature_dim(6))), None))
    out = tmp_path_factory.mktemp("exported") / "zoo"
    data = load_dataset("fashion-mnist", "test").subset(100)
    export_models(nets, out, "fmnist-deit", data,
                  ExportConfig(parity_images=100, accuracy_images=100, provider="cpu", warmup=2, runs=10,
                               exporter="torchscript"),
                  progress=False)
    torch.set_num_threads(before)
    return out


@pytest.fixture(scope="session")
def runtime_env(tmp_path_factory):
    """A fresh virtual environment holding klas-runtime alone (``pip install runtime/``: numpy, onnxruntime, Pillow,
    tokenizers from the package index) -- (venv folder, environment variables); made once per session."""
    from test_runtime_install import _fresh_runtime_env

    return _fresh_runtime_env(tmp_path_factory.mktemp("runtime-env"))
