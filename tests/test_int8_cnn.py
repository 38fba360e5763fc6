"""int8 on a CNN built for it: a small MobileNetV2-style network (batch norm, ReLU6, depthwise convolutions) trained
here in seconds on Fashion-MNIST, exported, and its int8 variant made by ``klas.export.make_variants`` with every
choice decided on val (ops x per channel, then the calibration method).

Checked independently with plain onnxruntime sessions and numpy on the test split: the int8 file loses at most
1 point of test accuracy and agrees with float32 on >= 98 % of top-1 answers; the float32 graph matches the PyTorch
network in float64; the recorded choice is the best of the recorded candidates, and the chosen configuration,
quantized again here, scores what the manifest says on the held-out val images; the paired sign test recorded for
the pick is recomputed with scipy.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

N_TRAIN, N_TEST, N_VAL, N_CAL, N_SEL = 10000, 2000, 1200, 200, 1000


def cbr(cin, cout, k=3, s=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection, residual where shapes allow."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(cbr(cin, hidden, 1), cbr(hidden, hidden, 3, stride, groups=hidden),
                                  cbr(hidden, cout, 1, act=False))

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class TinyMobileNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(cbr(1, 16, 3, 2), InvertedResidual(16, 16, 1, 1),
                                      InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4),
                                      InvertedResidual(24, 32, 2, 4), InvertedResidual(32, 32, 1, 4), cbr(32, 128, 1))
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def ort_logits(raw: bytes, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(raw, opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[s:s + 500]})[0] for s in range(0, len(x), 500)])


@pytest.fixture(scope="module")
def exported(one_thread):
    return train_and_export()


def train_and_export() -> dict:
    """The network trained on Fashion-MNIST (one epoch over ``N_TRAIN`` images), exported, and its int8 variant
    made by the export's own ``make_variants`` (also run by ``benchmarks/int8_cnn_grid.py``)."""
    from klas.data import load_dataset
    from klas.export import export_onnx, make_variants
    from klas.stages.s6_export import ExportConfig
    from klas.tasks import get_task
    from klas_runtime.manifest import SCHEMA_VERSION

    torch.manual_seed(0)
    train = load_dataset("fashion-mnist", "train").subset(N_TRAIN)
    x, y = train.normalize(train.images), train.labels
    net = TinyMobileNet()
    opt = torch.optim.AdamW(net.parameters(), 4e-3, weight_decay=1e-4)
    steps = len(x) // 128
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 4e-3, total_steps=steps)
    perm = torch.randperm(len(x))
    net.train()
    for s in range(steps):
        i = perm[s * 128:(s + 1) * 128]
        loss = nn.functional.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    test = load_dataset("fashion-mnist", "test").subset(N_TEST)
    val = load_dataset("fashion-mnist", "val").subset(N_VAL)
    model, info = export_onnx(net, torch.randn(2, 1, 28, 28), 18)
    raw = model.SerializeToString()
    task = get_task(None)
    parent = dict(name="tiny", file="tiny.onnx", precision="fp32", params=sum(p.numel() for p in net.parameters()),
                  flops=1, input=dict(name="input"),
                  output=dict(name="logits"), opset=18)
    header = dict(family="tiny-mobilenet", dataset="fashion-mnist", klas_version="test", schema_version=SCHEMA_VERSION)
    opts = ExportConfig(precisions="int8", calibration_images=N_CAL, per_channel_images=N_SEL, profile=False)
    written = {}
    made, rejected = make_variants(parent, raw, test, val, header, opts, lambda f, b: written.setdefault(f, b),
                                   task=task)
    return dict(net=net, raw=raw, test=test, val=val, made=made, rejected=rejected, written=written, model=model)


def test_int8_keeps_the_accuracy_of_a_batchnorm_relu6_depthwise_cnn(exported):
    test, net = exported["test"], exported["net"]
    xt, yt = test.normalize(test.images).numpy(), test.labels.numpy()
    ops = {n.op_type for n in exported["model"].graph.node}
    assert "Conv" in ops and "Clip" in ops  # ReLU6 is in the graph (as Clip)
    assert any(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
               for n in exported["model"].graph.node)  # depthwise convolutions
    ref = ort_logits(exported["raw"], xt)
    with torch.no_grad():
        want = net.double()(torch.from_numpy(xt).double()).numpy()
    net.float()
    assert np.abs(ref - want).max() < 1e-3  # the float32 graph is the network
    fp32_acc = (ref.argmax(1) == yt).mean() * 100
    assert fp32_acc > 75, fp32_acc  # it learned something
    assert exported["rejected"] == [] and [e["precision"] for e in exported["made"]] == ["int8"]
    e = exported["made"][0]
    raw8 = exported["written"][e["file"]]
    q = onnx.load_from_string(raw8)
    onnx.checker.check_model(q, full_check=True)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}
    z = ort_logits(raw8, xt)
    acc = (z.argmax(1) == yt).mean() * 100
    agree = (z.argmax(1) == ref.argmax(1)).mean()
    assert fp32_acc - acc <= 1.0, (fp32_acc, acc)
    assert agree >= 0.98, agree
    assert e["test_acc"] == pytest.approx(acc, abs=100 / N_TEST + 1e-9)
    assert e["parity"]["top1_agreement"] == pytest.approx(agree, abs=1 / N_TEST + 1e-9)
    # the paired sign test the pick reads, recomputed with scipy
    from scipy.stats import binomtest

    sig = e["variant"]["significance"]
    mine, theirs = z.argmax(1) == yt, ref.argmax(1) == yt
    b, c = int((mine & ~theirs).sum()), int((~mine & theirs).sum())
    assert (sig["only_variant"], sig["only_parent"], sig["samples"]) == (b, c, N_TEST)
    p_up = binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
    p_down = binomtest(c, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
    assert sig["p_more_accurate"] == pytest.approx(p_up) and sig["p_less_accurate"] == pytest.approx(p_down)
    want_verdict = "more accurate" if p_up < 0.05 else "less accurate" if p_down < 0.05 else "not significant"
    assert sig["verdict"] == want_verdict
    json.dumps(e)  # the entry is plain JSON


def test_the_int8_choice_is_the_best_measured_on_held_out_val(exported):
    from klas.export import to_int8

    v = exported["made"][0]["variant"]
    choice = v["int8_choice"]
    cands = choice["candidates"]
    weights = ((False, False), (True, False), (True, True))  # per tensor, per channel, per channel at 7 bits
    assert {(c["ops"], c["per_channel"], c["reduce_range"]) for c in cands} >= {(o, *w) for o in ("weights", "all")
                                                                                for w in weights}
    assert {c["calibration_method"] for c in cands} == {"MinMax", "Entropy", "Percentile"}
    best = max(cands, key=lambda c: (c["top1_agreement"], c["val_acc"], -c["max_abs_diff"], -c["bytes"]))
    assert (v["ops"], v["per_channel"], v["calibration_method"], v["float_nodes"]) == (
        best["ops"], best["per_channel"], best["calibration_method"], best["float_nodes"])
    # the stem / classifier kept in float32: tried (on the best int8-everywhere candidate) unless that one was exact
    kept = [c for c in cands if c["float_nodes"]]
    plain = max((c for c in cands if not c["float_nodes"]),
                key=lambda c: (c["top1_agreement"], c["val_acc"], -c["max_abs_diff"], -c["bytes"]))
    assert len(kept) == (plain["top1_agreement"] < 1.0)
    from klas.export.variants import end_weight_nodes, pre_process

    pre, _ = pre_process(onnx.load_from_string(exported["raw"]))
    weight_ops = [n for n in pre.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert weight_ops[0].op_type == "Conv" and weight_ops[-1].op_type in ("Gemm", "MatMul")
    for c in kept:
        assert c["float_nodes"] == [weight_ops[0].name, weight_ops[-1].name]
        assert (c["ops"], c["per_channel"], c["calibration_method"]) == (
            plain["ops"], plain["per_channel"], plain["calibration_method"])
    assert end_weight_nodes(pre) == (weight_ops[0].name, weight_ops[-1].name)
    assert choice["held_out"] and choice["images"] == N_SEL and v["calibration"] == dict(split="val", images=N_CAL)
    assert v["pre_process"]["applied"]
    # the chosen configuration, quantized again here, scores what the manifest says on the held-out val images
    val = exported["val"]
    xv = val.normalize(val.images).numpy()
    x_sel, y_sel = xv[N_CAL:N_CAL + N_SEL], val.labels.numpy()[N_CAL:N_CAL + N_SEL]
    q = to_int8(pre, xv[:N_CAL], best["per_channel"], "input", best["ops"], best["calibration_method"],
                best["reduce_range"], exclude=tuple(best["float_nodes"]))
    z, ref = ort_logits(q.SerializeToString(), x_sel), ort_logits(exported["raw"], x_sel)
    assert (z.argmax(1) == ref.argmax(1)).mean() == pytest.approx(best["top1_agreement"], abs=2 / N_SEL)
    assert (z.argmax(1) == y_sel).mean() * 100 == pytest.approx(best["val_acc"], abs=200 / N_SEL)
