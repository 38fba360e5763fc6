"""ONNX export of a stitched zoo: standalone pruning, checker, parity with a float64 reference, manifest, CLI.

Random-weight anchors of the embedded family and untrained stitch layers stand in for the supernetwork stage (the
export does not care how the weights were trained); the evaluation.json fed to it is computed here, not typed in.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import klas
from klas.data import load_dataset
from klas.errors import KlasError
from klas.stages.s6_export import ExportOptions, export_models, export_zoo, read_evaluation, standalone, zoo_configs
from klas.stages.s6_export import EXPORTER_DYNAMO, EXPORTER_TORCHSCRIPT, export_onnx
from klas.families import stitched_flops
from klas_runtime.manifest import METADATA_KEY, NOT_EMBEDDED, load_manifest
from klas.rundir import RunDir
from klas.stitch import StitchConfig, StitchedNet, StitchLayer

N_IMAGES = 300
FAST = dict(parity_images=N_IMAGES, accuracy_images=N_IMAGES, warmup=2, runs=10, progress=False)
STITCHES = [("fmnist-deit-ti", 3, "fmnist-deit-s", 5), ("fmnist-deit-s", 7, "fmnist-deit-b", 8),
            ("fmnist-deit-ti", 9, "fmnist-deit-b", 2)]


class Provider:
    """Stand-in for ``klas.stages.s4_finetune.load_stitched``: the same network every time a configuration is asked for."""

    def __init__(self, family):
        self.family, self.nets = family, {}

    def __call__(self, cfg: StitchConfig) -> StitchedNet:
        if cfg not in self.nets:
            if cfg.is_anchor:
                view = self.family[cfg.source]
                self.nets[cfg] = StitchedNet(view, -1, view, -1, None)
            else:
                src, tgt = self.family[cfg.source], self.family[cfg.target]
                layer = StitchLayer(src.feature_dim(cfg.i), tgt.feature_dim(cfg.j))
                self.nets[cfg] = StitchedNet(src, cfg.i, tgt, cfg.j, layer).eval()
        return self.nets[cfg]


def torch_accuracy(net, data) -> float:
    with torch.no_grad():
        return float((net(data.normalize(data.images)).argmax(1) == data.labels).double().mean() * 100)


def pareto_flags(rows: list[dict]) -> list[bool]:
    """Independent front: a row is dominated when another is at least as good on both axes and better on one."""
    return [not any(o["flops"] <= r["flops"] and o["test_acc"] >= r["test_acc"]
                    and (o["flops"], o["test_acc"]) != (r["flops"], r["test_acc"]) for o in rows) for r in rows]


def build_run(tmp: Path, family, provider, data) -> Path:
    """A run dir with an evaluation.json as the evaluation stage writes it. Anchors carry their measured accuracy
    (one has none, so export measures it through onnxruntime); the untrained stitches get accuracies placed so that
    two lie on the front (above every anchor) and one is dominated (below every anchor), making the choice visible."""
    run = RunDir(tmp / "run", "fmnist-deit", dataset="fashion-mnist")
    cfgs = [StitchConfig.anchor(v.name) for v in family] + [StitchConfig(*s) for s in STITCHES]
    rows = []
    for c in cfgs:
        net = provider(c)
        rows.append(dict(config=c.to_dict(), key=c.key, anchor=c.is_anchor, flops=net.flops,
                         params=sum(p.numel() for p in net.parameters()),
                         test_acc=torch_accuracy(net, data) if c.is_anchor else None, latency_ms=None))
    accs = [r["test_acc"] for r in rows if r["anchor"]]
    for r, acc in zip(rows[len(accs):], (max(accs) + 1, max(accs) + 2, min(accs) - 1)):
        r["test_acc"] = acc
    for row, flag in zip(rows, pareto_flags(rows)):
        row["pareto"] = flag
    rows[len(accs) - 1]["test_acc"] = None
    (run.stage("evaluation") / "evaluation.json").write_text(json.dumps({"configs": rows}))
    return run.path




@pytest.fixture(scope="module")
def family():
    torch.manual_seed(0)
    return klas.create_family("fmnist-deit")


@pytest.fixture(scope="module")
def data():
    return load_dataset("fashion-mnist", "test").subset(N_IMAGES)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, family, data):
    """One exported zoo shared by the tests of this file: (zoo dir, run dir, provider)."""
    tmp = tmp_path_factory.mktemp("export")
    provider = Provider(family)
    run_dir = build_run(tmp, family, provider, data)
    export_zoo(run_dir, tmp / "zoo", provider, ExportOptions(**FAST))
    return tmp / "zoo", run_dir, provider


def test_standalone_keeps_only_used_weights(family):
    src, tgt = family["fmnist-deit-ti"], family["fmnist-deit-s"]
    net = StitchedNet(src, 3, tgt, 5, StitchLayer(src.feature_dim(3), tgt.feature_dim(5))).eval()
    x = torch.randn(5, 1, 28, 28)
    pruned = standalone(net, x)
    names = set(dict(pruned.named_parameters()))
    stem = {f"src.model.{n}" for n in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")}
    src_blocks = {f"src.model.{n}" for n, _ in src.model.named_parameters() if n.split(".")[:2] in
                  [["blocks", str(k)] for k in range(4)]}
    tgt_tail = {f"tgt.model.{n}" for n, _ in tgt.model.named_parameters()
                if (n.startswith("blocks.") and int(n.split(".")[1]) > 5) or n.split(".")[0] in ("norm", "head")}
    assert names == stem | src_blocks | tgt_tail | {"layer.linear.weight", "layer.linear.bias"}
    expected = (sum(p.numel() for n, p in src.model.named_parameters() if f"src.model.{n}" in names)
                + sum(p.numel() for n, p in tgt.model.named_parameters() if f"tgt.model.{n}" in names)
                + sum(p.numel() for p in net.layer.parameters()))
    assert sum(p.numel() for p in pruned.parameters()) == expected < src.num_params + tgt.num_params
    with torch.no_grad():
        for batch in (1, 7):
            xb = torch.randn(batch, 1, 28, 28) * 3
            assert torch.equal(pruned(xb), net(xb))


@pytest.mark.parametrize("kind", ["anchor", "stitch"])
def test_dynamo_export_is_quiet_self_contained_and_matches_float64(family, kind, capfd):
    """The supported exporter (dynamo) on a random-weight anchor and a stitched net: full checker, weights inside,
    batch axis symbolic in and out, fresh random inputs at batch 1 and 7 agree with a float64 PyTorch copy, and
    nothing is printed."""
    src, tgt = family["fmnist-deit-ti"], family["fmnist-deit-s"]
    if kind == "anchor":
        net = StitchedNet(src, -1, src, -1, None).eval()
    else:
        net = StitchedNet(src, 3, tgt, 5, StitchLayer(src.feature_dim(3), tgt.feature_dim(5))).eval()
    example = torch.randn(2, 1, 28, 28)
    model, info = export_onnx(standalone(net, example), example, 18)
    assert info == {"exporter": EXPORTER_DYNAMO}
    assert capfd.readouterr() == ("", ""), "the exporter's progress lines / warnings must not reach the terminal"
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", 18)]
    assert model.graph.initializer and not any(onnx.external_data_helper.uses_external_data(t)
                                               for t in model.graph.initializer)
    assert not any(n.metadata_props for n in model.graph.node), "exporter debug info (stack traces) left in"
    used = {i for n in model.graph.node for i in n.input}
    assert all(t.name in used for t in model.graph.initializer)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 1, 28, 28]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 10]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref64 = copy.deepcopy(net).double().eval()
    gen = torch.Generator().manual_seed(11)
    for batch in (1, 7):
        x = torch.randn(batch, 1, 28, 28, generator=gen, dtype=torch.float64) * 2
        got = sess.run(None, {"input": x.float().numpy()})[0]
        with torch.no_grad():
            ref = ref64(x).numpy()
        assert got.shape == ref.shape == (batch, 10)
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
        top2 = np.sort(ref, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-3  # near-ties may flip in float32
        assert (got.argmax(1) == ref.argmax(1))[clear].all()


def test_exporter_falls_back_to_torchscript_and_says_why(family, capfd):
    """A model torch.export cannot export with a symbolic batch (control flow on the batch size) goes through the
    TorchScript exporter, and the reason comes back with the model."""

    class BranchOnBatch(StitchedNet):
        def forward(self, x):
            out = super().forward(x)
            return out if x.shape[0] == 2 else -out

    view = family["fmnist-deit-ti"]
    example = torch.randn(2, 1, 28, 28)
    model, info = export_onnx(standalone(BranchOnBatch(view, -1, view, -1, None).eval(), example), example, 18)
    assert info["exporter"] == EXPORTER_TORCHSCRIPT and "batch" in info["fallback_reason"]
    assert capfd.readouterr() == ("", "")
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_zoo_holds_anchors_and_pareto_configs_only(zoo):
    zoo_dir, run_dir, _ = zoo
    rows = read_evaluation(run_dir / "evaluation" / "evaluation.json")
    want = {r["key"] for r in rows if r["anchor"] or r["pareto"]}
    assert sum(not r["anchor"] and r["pareto"] for r in rows) == 2 and len(want) == 5
    manifest = load_manifest(zoo_dir)
    assert {m["name"] for m in manifest["models"]} == want
    assert sorted(p.name for p in zoo_dir.iterdir()) == sorted([m["file"] for m in manifest["models"]]
                                                              + ["manifest.json"])


def test_every_model_passes_checker_and_float64_parity(zoo, family, data):
    zoo_dir, _, provider = zoo
    gen = torch.Generator().manual_seed(1)
    for m in load_manifest(zoo_dir)["models"]:
        path = zoo_dir / m["file"]
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
        assert model.opset_import[0].version >= 17
        used = {i for n in model.graph.node for i in n.input}
        assert all(t.name in used for t in model.graph.initializer), "unused initializer in the file"
        c = m["config"]
        net = provider(StitchConfig(c["source"], c["i"], c["target"], c["j"]))
        ref64 = copy.deepcopy(net).double().eval()
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert isinstance(sess.get_inputs()[0].shape[0], str), "batch axis must be dynamic"
        real = data.normalize(data.images)
        got = np.concatenate([sess.run(None, {"input": real[s:s + 97].numpy()})[0] for s in range(0, len(real), 97)])
        with torch.no_grad():
            want = ref64(real.double()).numpy()
        agreement = (got.argmax(1) == want.argmax(1)).mean()
        assert agreement >= 0.999 and np.abs(got - want).max() < 1e-4
        assert m["parity"]["top1_agreement"] >= 0.999 and m["parity"]["images"] == N_IMAGES
        assert abs(m["parity"]["max_abs_diff"] - np.abs(got - want).max()) < 1e-5
        for batch, scale in ((1, 1.0), (7, 50.0), (13, 1e3)):  # fresh inputs, awkward batches, extreme values
            x = (torch.rand(batch, 1, 28, 28, generator=gen, dtype=torch.float64) * 2 - 1) * scale
            out = sess.run(None, {"input": x.float().numpy()})[0]
            with torch.no_grad():
                ref = ref64(x).numpy()
            assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_manifest_records_costs_accuracy_and_metadata(zoo, family, data):
    zoo_dir, run_dir, provider = zoo
    rows = {json.dumps(r["config"], sort_keys=True): r for r in read_evaluation(run_dir / "evaluation" /
                                                                                  "evaluation.json")}
    manifest = load_manifest(zoo_dir)
    assert manifest["family"] == "fmnist-deit" and manifest["dataset"] == "fashion-mnist"
    assert manifest["klas_version"] == klas.__version__
    for m in manifest["models"]:
        c = m["config"]
        src, tgt = family[c["source"]], family[c["target"]]
        if c["anchor"]:
            assert m["flops"] == src.flops and m["params"] == src.num_params
            assert c["source_blocks"] == [0, src.depth]
        else:
            assert m["flops"] == stitched_flops(src, c["i"], tgt, c["j"])
            assert c["source_blocks"] == [0, c["i"] + 1] and c["target_blocks"] == [c["j"] + 1, tgt.depth]
        row = rows.get(json.dumps({k: c[k] for k in ("source", "i", "target", "j")}, sort_keys=True))
        net = provider(StitchConfig(c["source"], c["i"], c["target"], c["j"]))
        if row["test_acc"] is not None:
            assert m["test_acc"] == row["test_acc"]
        else:  # measured through onnxruntime at export; at most one near-tie image may differ from PyTorch
            assert abs(m["test_acc"] - torch_accuracy(net, data)) <= 100 / N_IMAGES + 1e-9
        spec = m["input"]
        assert spec["shape"] == ["batch", 1, 28, 28] and spec["dtype"] == "float32"
        assert spec["mean"] == list(data.spec.mean) and spec["std"] == list(data.spec.std)
        lat = m["latency"][0]
        assert lat["threads"] == 1 and lat["batch"] == 1 and lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
        meta = {p.key: p.value for p in onnx.load(str(zoo_dir / m["file"])).metadata_props}
        own = json.loads(meta[METADATA_KEY])
        assert {k: own[k] for k in m if k not in NOT_EMBEDDED} == {k: v for k, v in m.items() if k not in NOT_EMBEDDED}
        assert own["family"] == "fmnist-deit" and not set(NOT_EMBEDDED) & set(own)


def test_parity_failure_stops_export_and_writes_nothing(tmp_path, family, data):
    class BranchOnBatch(StitchedNet):
        """Control flow on the batch size: tracing bakes in one branch, so onnxruntime disagrees on other sizes."""

        def forward(self, x):
            out = super().forward(x)
            return out if x.shape[0] == 2 else -out

    view = family["fmnist-deit-ti"]
    good = StitchedNet(view, -1, view, -1, None)
    bad = BranchOnBatch(view, -1, view, -1, None)
    cfgs = [(StitchConfig.anchor("fmnist-deit-ti"), good, None), (StitchConfig.anchor("fmnist-deit-s"), bad, None)]
    with pytest.raises(KlasError, match=r"parity failed.*top-1 agreement"):
        export_models(cfgs, tmp_path / "zoo", "fmnist-deit", data.subset(100), ExportOptions(**FAST, profile=False))
    assert list((tmp_path / "zoo").iterdir()) == []
    with pytest.raises(KlasError, match=r"max \|logit diff\|"):  # a tolerance below float32 rounding must trip
        export_models(cfgs[:1], tmp_path / "zoo", "fmnist-deit", data.subset(50),
                      ExportOptions(**{**FAST, "parity_images": 50}, atol=1e-12, profile=False))
    assert list((tmp_path / "zoo").iterdir()) == []


def test_evaluation_json_errors(tmp_path, family):
    run = RunDir(tmp_path / "run", "fmnist-deit")
    with pytest.raises(KlasError, match=r"evaluation\.json: missing"):
        export_zoo(run.path, tmp_path / "zoo", Provider(family))
    bad = run.stage("evaluation") / "evaluation.json"
    bad.write_text(json.dumps([{"config": {"source": "a", "i": 1}}]))
    with pytest.raises(KlasError, match=r"configuration 0 has no config"):
        read_evaluation(bad)
    bad.write_text(json.dumps([{"config": dict(source="a", i=0, target="b", j=1), "test_acc": 250}]))
    with pytest.raises(KlasError, match="not a percentage"):
        read_evaluation(bad)
    rows = [{"config": dict(source="x", i=2, target="y", j=3), "pareto": True},
            {"config": dict(source="x", i=1, target="y", j=3), "pareto": False},
            {"config": dict(source="x", i=-1, target="x", j=-1), "pareto": False, "test_acc": 50.0}]
    chosen = dict(zoo_configs(rows))
    assert list(chosen) == [StitchConfig.anchor("x"), StitchConfig("x", 2, "y", 3)]
    assert chosen[StitchConfig.anchor("x")]["test_acc"] == 50.0
    with pytest.raises(KlasError, match="nothing to export"):
        zoo_configs(rows[1:2])
    with pytest.raises(KlasError, match=r"configuration 0: expected \{source, i, target, j\}"):
        zoo_configs([{"config": dict(source="x", i="two", target="y", j=3), "pareto": True}])


def test_cli_export_uses_supernet_provider(tmp_path, family, data, monkeypatch, capsys):
    from klas import cli, export

    provider = Provider(family)
    run_dir = build_run(tmp_path, family, provider, data.subset(60))
    monkeypatch.setattr(export, "supernet_provider", lambda run: provider)
    rc = cli.main(["export", str(run_dir), "--out", str(tmp_path / "zoo"), "--parity-images", "60",
                   "--accuracy-images", "60", "--runs", "5", "--warmup", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    manifest = load_manifest(tmp_path / "zoo")
    assert all(m["file"] in out for m in manifest["models"]) and "manifest.json" in out


def test_export_of_a_finetuned_run_through_load_stitched(tmp_path):
    """Integration with the supernetwork and evaluation stages: their evaluation.json and load_stitched as is."""
    from klas.stages.s5_evaluation import evaluate_run
    from klas.stitch import FitCfg
    from klas.stages.s4_finetune import FinetuneCfg, finetune_supernet, load_stitched

    anchors = ["fmnist-deit-ti", "fmnist-deit-s"]
    fam = klas.create_family("fmnist-deit", anchors=anchors)  # trained in place: not the shared fixture
    run = RunDir(tmp_path / "run", "fmnist-deit", dataset="fashion-mnist")
    sel = dict(family="fmnist-deit", anchors=anchors, selected=[dict(source=anchors[0], i=5, target=anchors[1], j=5)])
    (run.stage("selection") / "selection.json").write_text(json.dumps(sel))
    finetune_supernet(run.path, family=fam, progress=False,
                      cfg=FinetuneCfg(epochs=1, steps_per_epoch=3, batch_size=16, train_samples=64, val_samples=50,
                                      init=FitCfg(samples=32)))
    ev = evaluate_run(run.path, test_samples=80, latency=False, progress=False)
    manifest = export_zoo(run.path, tmp_path / "zoo", options=ExportOptions(**{**FAST, "parity_images": 80}))
    want = {r["key"] for r in ev["configs"] if r["anchor"] or r["pareto"]}
    assert {m["name"] for m in manifest["models"]} == want
    data = load_dataset("fashion-mnist", "test").subset(80)
    for m in manifest["models"]:
        net = copy.deepcopy(load_stitched(run.path, m["name"])).double()
        sess = ort.InferenceSession(str(tmp_path / "zoo" / m["file"]), providers=["CPUExecutionProvider"])
        x = data.normalize(data.images)
        with torch.no_grad():
            ref = net(x.double()).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.999 and np.abs(got - ref).max() < 1e-4
        assert m["test_acc"] == next(r["test_acc"] for r in ev["configs"] if r["key"] == m["name"])
