"""ONNX export of a stitched zoo: standalone pruning, checker, parity with a float64 reference, manifest, the stage.

Random-weight anchors of the embedded family and untrained stitch layers stand in for the finetune stage (the export
does not care how the weights were trained); the evaluation artifact fed to it is computed here, not typed in. The
stage is driven as the pipeline drives it: ``s6_export.run(cfg, ctx)`` on a ``StageContext``.
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
from klas.config import DataConfig, RunConfig
from klas.contract import StageContext
from klas.data import load_dataset
from klas.errors import KlasError
from klas.export import (EXPORTER_DYNAMO, EXPORTER_TORCHSCRIPT, check_rows, export_models, export_onnx, graph_score,
                         standalone, task_header, zoo_items)
from klas.families import stitched_flops
from klas.rundir import RunDir
from klas.stages import s6_export
from klas.stages.s5_evaluation import EvaluationArtifact
from klas.stages.s6_export import ExportArtifact, ExportConfig
from klas.stitch import StitchConfig, StitchedNet, StitchLayer
from klas.tasks import get_task
from klas.tasks.image_classification import ImageClassification
from klas_runtime.manifest import METADATA_KEY, NOT_EMBEDDED, load_manifest

N_IMAGES = 300
FAST = dict(parity_images=N_IMAGES, accuracy_images=N_IMAGES, warmup=2, runs=10,
            precisions="none")  # the float32 zoo; variants: tests/test_variants.py
TS = dict(FAST, exporter="torchscript")  # tests not about the dynamo exporter (the `zoo` fixture's): far faster
STITCHES = [("fmnist-deit-ti", 3, "fmnist-deit-s", 5), ("fmnist-deit-s", 7, "fmnist-deit-b", 8),
            ("fmnist-deit-ti", 9, "fmnist-deit-b", 2)]


class Provider:
    """Stand-in for ``klas.stitched.load_stitched``: the same network every time a configuration is asked for."""

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


def build_run(tmp: Path, family, provider, data, keep: int = 5) -> Path:
    """A run dir with an evaluation artifact as the evaluation stage writes it: its zoo holds the three anchors (one
    without an accuracy, so export measures it through onnxruntime) and two of the three stitches (the third was not
    admitted). Random-weight anchors: all are served by the provider as configurations."""
    run = RunDir(tmp / "run", "fmnist-deit", dataset="fashion-mnist")
    cfgs = [StitchConfig.anchor(v.name) for v in family] + [StitchConfig(*s) for s in STITCHES]
    rows = []
    for c in cfgs:
        net = provider(c)
        acc = torch_accuracy(net, data)
        rows.append(dict(config=c.to_dict(), key=c.key, anchor=c.is_anchor, flops=net.flops, flops_norm=0.0,
                         params=sum(p.numel() for p in net.parameters()), val_acc=acc, test_acc=acc, latency_ms=None,
                         pareto=True))
    zoo = [dict(kind="configuration", key=r["key"], name=r["key"], config=r["config"], flops=r["flops"],
                val_acc=r["val_acc"], test_acc=r["test_acc"]) for r in rows[:keep]]
    zoo[min(2, keep - 1)]["test_acc"] = None
    EvaluationArtifact(family="fmnist-deit", task="image-classification", dataset="fashion-mnist", split="test",
                       n_test=len(data), state="final", flops_range={}, auc=0.0, auc_definition="", n_pareto=len(rows), selection=None, configs=rows,
                       n_val=len(data), untouched=[], zoo=zoo, cascades=[], admission={}, zoo_auc=None,
                       anchors_auc=None, machine={}, world_size=1).save(run.stage("evaluation"))
    return run.path


@pytest.fixture(scope="module")
def family():
    torch.manual_seed(0)
    return klas.create_family("fmnist-deit")


@pytest.fixture(scope="module")
def data():
    return load_dataset("fashion-mnist", "test").subset(N_IMAGES)


def context(run_dir: Path, family=None) -> StageContext:
    """The export stage's context as the pipeline builds it (``family``: handed in, else built from the run)."""
    return StageContext(run_dir=RunDir(run_dir), run=RunConfig(family="fmnist-deit"), data=DataConfig(),
                        progress=False, prebuilt=family)


def export_run(run_dir: Path, cfg: ExportConfig, provider, family=None) -> ExportArtifact:
    """``s6_export.run(cfg, ctx)`` with the run's configurations served by ``provider``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(s6_export, "finetuned_networks", lambda ctx: provider)
        return s6_export.run(cfg, context(run_dir, family))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, family, data):
    """One zoo exported by the stage, shared by the tests of this file: (zoo dir, run dir, provider)."""
    tmp = tmp_path_factory.mktemp("export")
    provider = Provider(family)
    run_dir = build_run(tmp, family, provider, data)
    export_run(run_dir, ExportConfig(**FAST), provider, family)
    return run_dir / "zoo", run_dir, provider


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
    # [export] exporter = "dynamo": the same failure is an error naming the setting, not a silent fallback
    with pytest.raises(KlasError, match=r"dynamo ONNX exporter failed .*batch.*\[export\] exporter"):
        export_onnx(standalone(BranchOnBatch(view, -1, view, -1, None).eval(), example), example, 18, "dynamo")


def test_exporter_torchscript_when_asked(family):
    """[export] exporter = "torchscript": the TorchScript exporter for every model, no fallback reason, and the graph
    agrees with float64 PyTorch at batch sizes other than the example's."""
    src, tgt = family["fmnist-deit-ti"], family["fmnist-deit-s"]
    torch.manual_seed(5)
    net = StitchedNet(src, 4, tgt, 6, StitchLayer(src.feature_dim(4), tgt.feature_dim(6))).eval()
    example = torch.randn(2, 1, 28, 28)
    module = standalone(net, example)
    model, info = export_onnx(module, example, 18, "torchscript")
    assert info == {"exporter": EXPORTER_TORCHSCRIPT}
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref64 = copy.deepcopy(module).double()
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28, dtype=torch.float64) * 3
        with torch.no_grad():
            want = ref64(x).numpy()
        got = sess.run(None, {"input": x.float().numpy()})[0]
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    with pytest.raises(KlasError, match="exporter 'tensorrt'"):
        export_onnx(module, example, 18, "tensorrt")


def test_zoo_holds_exactly_the_evaluation_zoo(zoo):
    zoo_dir, run_dir, _ = zoo
    want = {z["name"] for z in EvaluationArtifact.load(run_dir / "evaluation").zoo}
    manifest = load_manifest(zoo_dir)
    assert {m["name"] for m in manifest["models"]} == want and len(want) == 5
    assert sorted(p.name for p in zoo_dir.iterdir() if p.name != ".lock") == sorted(  # .lock: the zoo's writer lock
        [m["file"] for m in manifest["models"]] + ["manifest.json"])
    assert all(m["exporter"]["exporter"] in (EXPORTER_DYNAMO, EXPORTER_TORCHSCRIPT) for m in manifest["models"])


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
    rows = {json.dumps(z["config"], sort_keys=True): z for z in EvaluationArtifact.load(run_dir / "evaluation").zoo}
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
        export_models(cfgs, tmp_path / "zoo", "fmnist-deit", data.subset(100), ExportConfig(**TS, profile=False),
                      progress=False)
    assert list((tmp_path / "zoo").iterdir()) == []
    with pytest.raises(KlasError, match=r"max \|logit diff\|"):  # a tolerance below float32 rounding must trip
        export_models(cfgs[:1], tmp_path / "zoo", "fmnist-deit", data.subset(50),
                      ExportConfig(**{**TS, "parity_images": 50}, atol=1e-12, profile=False), progress=False)
    assert list((tmp_path / "zoo").iterdir()) == []


def test_evaluation_errors(tmp_path, family):
    RunDir(tmp_path / "run", "fmnist-deit")
    with pytest.raises(KlasError, match=r"evaluation\.json: missing"):
        export_run(tmp_path / "run", ExportConfig(), Provider(family), family)
    with pytest.raises(KlasError, match=r"configuration 0 has no config"):
        check_rows([{"config": {"source": "a", "i": 1}}], "ev.json")
    with pytest.raises(KlasError, match="not a percentage"):
        check_rows([{"config": dict(source="a", i=0, target="b", j=1), "test_acc": 250}], "ev.json")
    zoo = [dict(kind="configuration", name="x[:3]->y[4:]", config=dict(source="x", i=2, target="y", j=3)),
           dict(kind="anchor", name="x", config=dict(source="x", i=-1, target="x", j=-1)),
           dict(kind="cascade", name="x>y@0.5", members=["x", "y"])]
    items = zoo_items(zoo, "ev.json")
    assert [(it.name, it.untouched) for it in items] == [("x", True), ("x[:3]->y[4:]", False)]
    with pytest.raises(KlasError, match="the zoo is empty"):
        zoo_items(zoo[2:], "ev.json")
    with pytest.raises(KlasError, match=r"zoo\[0\]: expected \{source, i, target, j\}"):
        zoo_items([dict(kind="configuration", name="z", config=dict(source="x", i="two", target="y", j=3))], "e")


def test_export_stage_swaps_the_zoo_whole(tmp_path, family, data):
    """The stage builds the new zoo beside the old one and swaps it in with one rename; staging is cleaned up. Its
    artifact is the zoo folder: loadable through ``ctx.upstream``, its digest over the manifest and every file."""
    provider = Provider(family)
    run_dir = build_run(tmp_path, family, provider, data.subset(60), keep=2)
    old = run_dir / "zoo"
    old.mkdir()
    (old / "stale.onnx").write_bytes(b"old")
    art = export_run(run_dir, ExportConfig(parity_images=60, accuracy_images=60, runs=5, warmup=1, precisions="none",
                                           exporter="torchscript"), provider, family)
    assert not (old / "stale.onnx").exists() and not list(run_dir.glob(".zoo.staging-*"))
    assert {m["name"] for m in load_manifest(old)["models"]} == {m["name"] for m in art.models}
    assert s6_export.summary(art) == dict(models=2) and s6_export.FOLDER == ExportArtifact.FOLDER == "zoo"
    loaded = context(run_dir).upstream(ExportArtifact)
    assert isinstance(loaded, ExportArtifact) and loaded == art and sorted(loaded.files) == sorted(
        p.name for p in old.iterdir() if p.suffix == ".onnx")
    d = ExportArtifact.digest(old)
    assert d is not None and d == ExportArtifact.digest(old)
    # a model file changed, or gone: no digest (the stage is stale); the manifest edited: another digest
    victim = old / art.files[0]
    raw = victim.read_bytes()
    victim.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    assert ExportArtifact.digest(old) is None
    victim.unlink()
    assert ExportArtifact.digest(old) is None
    victim.write_bytes(raw)
    assert ExportArtifact.digest(old) == d
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["created"] = "yesterday"
    ExportArtifact(manifest).save(old)
    assert ExportArtifact.digest(old) not in (None, d)
    with pytest.raises(KlasError, match=r"zoo2/manifest\.json: missing; run the export stage first"):
        ExportArtifact.load(tmp_path / "zoo2")
    (tmp_path / "zoo2").mkdir()
    (tmp_path / "zoo2" / "manifest.json").write_text("{}")
    with pytest.raises(KlasError, match="missing field 'schema'"):
        ExportArtifact.load(tmp_path / "zoo2")


def test_stage_exports_the_untouched_anchors_as_given(tmp_path, family, data):
    """An anchor the evaluation's zoo lists as untouched is rebuilt from the weights the finetune record names (the
    record handed in as the pipeline would, through ``ctx.artifacts``) and checked bit for bit against its file."""
    from dataclasses import replace
    from types import SimpleNamespace

    from klas.stages.s4_finetune import FinetuneArtifact

    run_dir = build_run(tmp_path, family, Provider(family), data.subset(60), keep=1)
    ev = EvaluationArtifact.load(run_dir / "evaluation")
    replace(ev, zoo=[dict(ev.zoo[0], kind="anchor")]).save(run_dir / "evaluation")
    ctx = context(run_dir)
    ctx.artifacts[FinetuneArtifact] = SimpleNamespace(pretrained=True, family="fmnist-deit", weights=None,
                                                      num_classes=10, input_shape=[1, 28, 28])
    art = s6_export.run(ExportConfig(parity_images=60, accuracy_images=60, profile=False, precisions="none",
                                     exporter="torchscript"), ctx)
    (m,) = art.models
    assert m["name"] == "fmnist-deit-ti" and m["origin"] == "untouched"
    assert m["weights"]["check"].startswith("bit-identical") and Path(m["weights"]["file"]).is_file()
    assert m["test_acc_source"] == "onnxruntime on 60 fashion-mnist test images"
    pretrained = klas.create_family("fmnist-deit", pretrained=True)["fmnist-deit-ti"]
    with torch.no_grad():
        want = float((pretrained(data.normalize(data.images[:60])).argmax(1) == data.labels[:60]).double().mean())
    assert abs(m["test_acc"] - 100 * want) <= 100 / 60 + 1e-9


class Reversed(ImageClassification):
    """A task that predicts the LEAST likely class: a graph's score must come from the task, not from an argmax."""

    name = "reversed-classification"
    runtime_entry = "reversed"

    def predict(self, logits, targets=None):
        c, k = torch.softmax(logits.float(), dim=-1).min(dim=-1)
        return k, c


def test_graph_score_and_manifest_header_come_from_the_task(family, data):
    view = family["fmnist-deit-ti"]
    net = StitchedNet(view, -1, view, -1, None).eval()
    example = get_task(None).example_inputs(family, 2)
    model, _ = export_onnx(standalone(net, example), example, 18, "torchscript")
    raw = model.SerializeToString()
    with torch.no_grad():
        logits = net(data.normalize(data.images[:120]))
    for task, pick in ((get_task(None), logits.argmax(1)), (Reversed(), logits.argmin(1))):
        acc, n = graph_score(task, raw, data, 120)
        assert n == 120 and abs(acc - float((pick == data.labels[:120]).double().mean() * 100)) <= 100 / 120 + 1e-9
    # image classification: no task fields (what a manifest without them means); another task: its own
    assert task_header(get_task(None), family) == {}
    assert task_header(Reversed(), family) == dict(task="reversed-classification", cost_unit="image",
                                                   metric="top-1 accuracy", runtime_entry="reversed")
    assert get_task(None).input_spec(data, family)["shape"][1:] == list(family.input_shape)
    assert get_task(None).output_spec(data, family) == dict(name="logits", num_classes=10,
                                                           classes=list(data.spec.classes))


def test_export_of_a_finetuned_run_through_load_stitched(tmp_path):
    """Integration with the finetune and evaluation stages: their artifacts and load_stitched as they are, each stage
    through its ``run(cfg, ctx)``. The anchors were passed in (trained in place), so there are no untouched anchors
    to compare with: the zoo is the val Pareto front of the configurations."""
    from klas.stages import s4_finetune, s5_evaluation
    from klas.stages.s3_selection import SelectionArtifact
    from klas.stitch import FitCfg
    from klas.stitched import load_stitched

    anchors = ["fmnist-deit-ti", "fmnist-deit-s"]
    fam = klas.create_family("fmnist-deit", anchors=anchors)  # trained in place: not the shared fixture
    run = RunDir(tmp_path / "run", "fmnist-deit", dataset="fashion-mnist")
    SelectionArtifact(family="fmnist-deit", method="test", params={}, anchors=anchors, anchor_flops={},
                      anchor_pairs=[], anchor_selection={}, buckets={}, candidates=[],
                      selected=[dict(source=anchors[0], i=5, target=anchors[1], j=5)]).save(run.stage("selection"))
    s4_finetune.run(s4_finetune.FinetuneConfig(recipe="shared", distill=None, max_stitches=None, epochs=1,
                                               steps_per_epoch=3, batch_size=16, train_subset=64, val_images=50,
                                               init=FitCfg(samples=32)), context(run.path, fam))
    ev = s5_evaluation.run(s5_evaluation.EvaluationConfig(test_subset=80, val_subset=80, latency=False),
                           context(run.path))
    art = s6_export.run(ExportConfig(**{**TS, "parity_images": 80}), context(run.path))
    assert {m["name"] for m in art.models} == {z["name"] for z in ev.zoo} and not ev.untouched
    data = load_dataset("fashion-mnist", "test").subset(80)
    for m in art.models:
        net = copy.deepcopy(load_stitched(run.path, m["name"])).double()
        sess = ort.InferenceSession(str(run.path / "zoo" / m["file"]), providers=["CPUExecutionProvider"])
        x = data.normalize(data.images)
        with torch.no_grad():
            ref = net(x.double()).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.999 and np.abs(got - ref).max() < 1e-4
        assert m["test_acc"] == next(r["test_acc"] for r in ev.configs if r["key"] == m["name"])
