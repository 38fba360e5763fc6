"""The zoo writer's forked members (``klas.export.manifest._export_members``): three members exported in two forked
workers give the manifest entries, rejected variants and files of a sequential export on one thread, byte for
byte, with latency measured afterwards in the parent for every file; a member that fails in its worker stops the
export with its own exception (the worker and member named in a note), with no staged file left behind.

The family is fmnist-deit with random weights (a stitch ti -> s between its two small anchors), real Fashion-MNIST
samples, int8 and fp16 variants with a fixed int8 recipe (one quantize_static call per model), TorchScript export
(the fork, not the exporter, is under test).
"""
from __future__ import annotations

import json

import pytest
import torch

import klas
import klas.workers
from klas_runtime import session

N_TEST, N_VAL = 300, 200


@pytest.fixture(scope="module")
def setup():
    from klas.data import load_dataset
    from klas.stitch import StitchConfig
    from klas.stitched import StitchedModels

    torch.manual_seed(0)
    fam = klas.create_family("fmnist-deit")
    configs = [StitchConfig.anchor("fmnist-deit-ti"), StitchConfig("fmnist-deit-ti", 5, "fmnist-deit-s", 6),
               StitchConfig.anchor("fmnist-deit-s")]
    net = StitchedModels(fam, configs)
    members = [(c, net.net(k), dict(flops=net.net(k).flops)) for k, c in enumerate(configs)]
    test = load_dataset("fashion-mnist", "test").subset(N_TEST)
    val = load_dataset("fashion-mnist", "val").subset(N_VAL)
    return fam, members, test, val


def options(**kw):
    from klas.stages.s6_export import ExportConfig

    return ExportConfig(**dict(dict(exporter="torchscript", parity_images=N_TEST, provider="cpu", warmup=1, runs=3,
                                    precisions="fp16,int8", calibration_images=64, per_channel="off",
                                    int8_ops="weights", calibration_method="minmax"), **kw))


def export(setup, out, workers: int, monkeypatch, members=None):
    from klas.export import export_models

    fam, ms, test, val = setup
    calls = []
    real = klas.workers.run_forked

    def spy(fn, items, n, *a, **kw):
        calls.append(n)
        return real(fn, items, n, *a, **kw)

    monkeypatch.setattr(klas.workers, "worker_count",
                        lambda jobs, requested=None, job_bytes=0: 1 if klas.workers.in_worker() else workers)
    monkeypatch.setattr(klas.workers, "run_forked", spy)
    manifest = export_models(members or ms, out, fam, test, options(), progress=False, val=val)
    return manifest, calls


def test_forked_members_equal_a_sequential_export(setup, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(session, "DEFAULT_THREADS", 1)
    torch.set_num_threads(1)  # the reference: what each worker runs, one intra-op thread (torch and onnxruntime)
    try:
        alone, calls = export(setup, tmp_path / "seq", 1, monkeypatch)
    finally:
        torch.set_num_threads(before)
    assert calls == []
    monkeypatch.setattr(session, "DEFAULT_THREADS", None)
    forked, calls = export(setup, tmp_path / "fork", 2, monkeypatch)
    assert calls == [2]

    def strip(entries):
        return [{k: v for k, v in e.items() if k != "latency"} for e in entries]

    assert len(alone["models"]) >= 3 and {e["precision"] for e in alone["models"]} >= {"fp32", "int8"}
    assert json.dumps(strip(forked["models"])) == json.dumps(strip(alone["models"]))
    assert forked["rejected"] == alone["rejected"]
    for e in forked["models"]:
        raw = (tmp_path / "fork" / e["file"]).read_bytes()
        assert raw == (tmp_path / "seq" / e["file"]).read_bytes()
        (rec,) = e["latency"]  # measured in the parent, once per file
        assert rec["batch"] == 1 and 0 < rec["p50_ms"] <= rec["p90_ms"] <= rec["p99_ms"]
    assert not list((tmp_path / "fork").glob(".*.staged"))


def test_a_failing_member_names_itself_and_leaves_nothing_staged(setup, tmp_path, monkeypatch):
    fam, ms, test, val = setup

    def broken(config):
        raise ValueError("no such network")

    members = [ms[0], (ms[1][0], broken, ms[1][2]), ms[2]]
    with pytest.raises(ValueError, match="^no such network") as e:  # as in-process; where in its note and cause
        export(setup, tmp_path / "zoo", 2, monkeypatch, members)
    assert e.value.__notes__ == ["(in the worker process of zoo member fmnist-deit-ti[:6]->fmnist-deit-s[7:])"]
    assert "in broken" in str(e.value.__cause__)
    assert not list((tmp_path / "zoo").glob(".*")) and not (tmp_path / "zoo" / "manifest.json").exists()
