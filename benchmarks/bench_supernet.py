"""pytest-benchmark of the supernetwork stage's hot paths on fmnist-deit (random weights: speed only):

    pytest benchmarks/bench_supernet.py --benchmark-only

* ``ls_fit``: the least-squares stitch fit from streamed float64 moments (``klas.stitch.Moments``) against one
  ``torch.linalg.lstsq`` on all rows (the direct solve SN-Net uses), on the token rows of 1024 images (17 tokens,
  Ti width 16 -> B width 64).
* ``train_step``: one supernetwork training step (forward, backward, clip, AdamW) of an anchor or a stitched
  configuration at batch 128 -- what a step of ``klas finetune`` costs for each kind of configuration.

Threads, machine and torch version go to ``extra_info``.
"""
from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

import klas
from klas.stitch import Moments, StitchConfig
from klas.stages.s4_finetune import Supernet


def _info(benchmark, **kw) -> None:
    benchmark.extra_info.update(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                                threads=torch.get_num_threads(), **kw)


@pytest.fixture(scope="module")
def fam():
    return klas.create_family("fmnist-deit")


@pytest.mark.parametrize("provider", ["moments", "lstsq"])
def test_ls_fit(benchmark, provider):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024 * 17, 16, generator=g) * 2 + 1
    y = x @ torch.randn(16, 64, generator=g) + torch.randn(1024 * 17, 64, generator=g)

    def moments():
        m = Moments(16, 64)
        for k in range(0, x.shape[0], 128 * 17):
            m.update(x[k:k + 128 * 17], y[k:k + 128 * 17])
        return m.solve()

    def lstsq():
        x1 = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        return torch.linalg.lstsq(x1, y.double()).solution

    benchmark.group = "stitch least squares, 17408 rows, 16 -> 64"
    _info(benchmark, rows=x.shape[0])
    benchmark(moments if provider == "moments" else lstsq)


CONFIGS = {"anchor-ti": StitchConfig.anchor("fmnist-deit-ti"), "anchor-b": StitchConfig.anchor("fmnist-deit-b"),
           "ti[:6]->b[6:]": StitchConfig("fmnist-deit-ti", 5, "fmnist-deit-b", 5)}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_train_step(benchmark, fam, config):
    net = Supernet(fam, list(CONFIGS.values())).train()
    k = list(CONFIGS).index(config)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)

    def step():
        loss = F.cross_entropy(net(x, k), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], 1.0)
        opt.step()

    benchmark.group = "supernet train step, batch 128"
    _info(benchmark, flops_per_image=net.net(k).flops)
    benchmark(step)
