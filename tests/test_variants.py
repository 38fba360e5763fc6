"""Reduced-precision variants of zoo models (int8 static QDQ, fp16) and latency per device.

A real exported zoo (the embedded family's pretrained fmnist-deit-ti anchor, parity-checked by the exporter) gets its
variants from ``klas.export.export_models(val=...)`` on real Fashion-MNIST images; every figure the manifest claims is
re-computed here with plain onnxruntime sessions and numpy (accuracy, agreement with the float32 parent, max logit
difference).
Rejection is engineered: int8 calibrated on a single val image with ``max_accuracy_loss = 0`` -- the clipped ranges
cost accuracy, which is checked independently before the rejection is. Pick by latency is checked against an oracle
over this device's records, and refused in one line (naming ``klas profile``) where only another device has any.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from klas_runtime import cli
from klas_runtime.errors import ZooError
from klas_runtime.manifest import (MANIFEST, SCHEMA_VERSION, VARIANTS_SINCE, load_manifest, read_manifest,
                                   save_manifest, validate)
from klas_runtime.profile import device_key, device_label, device_slug, profile_zoo
from klas_runtime.runtime import Zoo, verify_zoo

ANCHOR = "fmnist-deit-ti"
N_TEST, N_VAL, N_CAL = 1000, 400, 128
MAX_LOSS = 1.0


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[s:s + 250]})[0] for s in range(0, len(x), 250)])


@pytest.fixture(scope="module")
def sets():
    from klas.data import load_dataset

    test = load_dataset("fashion-mnist", "test").subset(N_TEST)
    val = load_dataset("fashion-mnist", "val").subset(N_VAL)
    return test, val


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, sets, one_thread):
    """The ti anchor exported with its fp16 and int8 variants (per_channel auto: both built, one kept)."""
    import torch

    import klas
    from klas.export import export_models
    from klas.stages.s6_export import ExportConfig
    from klas.stitch import StitchConfig, StitchedNet

    test, val = sets
    torch.manual_seed(0)
    view = klas.create_family("fmnist-deit", pretrained=True)[ANCHOR]
    out = tmp_path_factory.mktemp("variants") / "zoo"
    options = ExportConfig(parity_images=200, accuracy_images=N_TEST, provider="cpu", warmup=2, runs=10,
                           calibration_images=N_CAL, per_channel="auto", per_channel_images=200,
                           max_accuracy_loss=MAX_LOSS)
    export_models([(StitchConfig.anchor(ANCHOR), StitchedNet(view, -1, view, -1, None), None)], out, "fmnist-deit",
                  test, options, progress=False, val=val)
    return out


def x_y(data) -> tuple[np.ndarray, np.ndarray]:
    return data.normalize(data.images).numpy(), data.labels.numpy()


# --- accuracy and parity, recomputed ------------------------------------------------------------------------------

def test_variants_accuracy_and_parity_recomputed(zoo, sets):
    manifest = load_manifest(zoo)
    by = {m["name"]: m for m in manifest["models"]}
    assert sorted(by) == [ANCHOR, f"{ANCHOR}.fp16", f"{ANCHOR}.int8"] and manifest["rejected"] == []
    assert manifest["schema_version"] == SCHEMA_VERSION >= VARIANTS_SINCE == 3 and by[ANCHOR]["precision"] == "fp32"
    x, y = x_y(sets[0])
    ref = ort_logits(zoo / by[ANCHOR]["file"], x)
    parent_acc = (ref.argmax(1) == y).mean() * 100
    for prec in ("fp16", "int8"):
        e = by[f"{ANCHOR}.{prec}"]
        assert e["precision"] == prec and e["parent"] == ANCHOR and e["file"] == f"{ANCHOR}.{prec}.onnx"
        path = zoo / e["file"]
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert e["bytes"] == path.stat().st_size
        z = ort_logits(path, x)
        acc = (z.argmax(1) == y).mean() * 100
        agree = (z.argmax(1) == ref.argmax(1)).mean()
        diff = np.abs(z.astype(np.float64) - ref).max()
        # one image of slack: onnxruntime's intra-op threads may reorder a reduction
        assert abs(e["test_acc"] - acc) <= 100 / N_TEST + 1e-9, (prec, e["test_acc"], acc)
        assert abs(e["parity"]["top1_agreement"] - agree) <= 1 / N_TEST + 1e-9
        assert e["parity"]["max_abs_diff"] == pytest.approx(diff, rel=0.05, abs=1e-3)
        assert e["parity"]["images"] == N_TEST and e["variant"]["parent_test_acc"] == pytest.approx(parent_acc)
        assert parent_acc - acc <= MAX_LOSS, (prec, parent_acc, acc)  # within the configured loss
        assert e["variant"]["accuracy_loss"] == pytest.approx(parent_acc - acc, abs=100 / N_TEST + 1e-9)
        assert 0 < diff and agree > 0.9  # a different arithmetic, the same classifier
        init_types = {t.data_type for t in model.graph.initializer}
        io_types = {v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
        assert io_types == {onnx.TensorProto.FLOAT}
        if prec == "fp16":
            assert onnx.TensorProto.FLOAT16 in init_types
            assert e["bytes"] < 0.8 * by[ANCHOR]["bytes"]
        else:
            ops = {n.op_type for n in model.graph.node}
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops and onnx.TensorProto.INT8 in init_types
            v = e["variant"]
            choice = v["int8_choice"]
            rank = lambda c: (c["top1_agreement"], c["val_acc"], -c["max_abs_diff"], -c["bytes"])  # noqa: E731
            plain = [c for c in choice["candidates"] if not c["float_nodes"]]
            # 6 MinMax cells, 2 more calibrations, then the stem / classifier in float32 unless already exact
            assert choice["held_out"] and choice["images"] == 200 and len(plain) == 8
            assert len(choice["candidates"]) == 8 + (max(map(rank, plain))[0] < 1.0)
            best = max(choice["candidates"], key=rank)
            keys = ("ops", "per_channel", "reduce_range", "calibration_method", "float_nodes")
            assert [v[k] for k in keys] == [best[k] for k in keys]
            assert v["calibration"] == dict(split="val", images=N_CAL)
        # the paired sign test the pick reads, recomputed with scipy from the two files' answers
        from scipy.stats import binomtest

        mine, theirs = z.argmax(1) == y, ref.argmax(1) == y
        b, c = int((mine & ~theirs).sum()), int((~mine & theirs).sum())
        sig = e["variant"]["significance"]
        assert abs(sig["only_variant"] - b) + abs(sig["only_parent"] - c) <= 1  # one image of slack, as above
        if (sig["only_variant"], sig["only_parent"]) == (b, c):
            p_up = binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
            assert sig["p_more_accurate"] == pytest.approx(p_up)
        assert e["latency"] and e["latency"][0]["device"] == device_label("CPUExecutionProvider")
    assert verify_zoo(zoo) == []


def test_rejected_when_the_loss_exceeds_the_setting(zoo, sets):
    """int8 calibrated on one val image, max_accuracy_loss 0: it loses accuracy (checked here first), so it is
    rejected with the figures; fp16 is kept or rejected exactly as its own loss says."""
    from klas.export import make_variants, to_int8
    from klas.stages.s6_export import ExportConfig

    test, val = sets
    manifest = load_manifest(zoo)
    parent = next(m for m in manifest["models"] if m["name"] == ANCHOR)
    raw = (zoo / parent["file"]).read_bytes()
    x, y = x_y(test)
    ref = ort_logits(zoo / parent["file"], x)
    parent_acc = (ref.argmax(1) == y).mean() * 100
    from klas.export.variants import pre_process

    coarse = to_int8(pre_process(onnx.load_from_string(raw))[0], x_y(val)[0][:1], False, "input")
    onnx.save(coarse, str(zoo.parent / "coarse.onnx"))
    coarse_acc = (ort_logits(zoo.parent / "coarse.onnx", x).argmax(1) == y).mean() * 100
    assert parent_acc - coarse_acc > 100 / N_TEST, (parent_acc, coarse_acc)  # the engineered loss is real
    written = {}
    opts = ExportConfig(calibration_images=1, per_channel="off", int8_ops="weights", calibration_method="minmax",
                        max_accuracy_loss=0.0, profile=False)
    header = dict(family="fmnist-deit", dataset="fashion-mnist", klas_version="test",
                  schema_version=SCHEMA_VERSION)
    made, rejected = make_variants(parent, raw, test, val, header, opts, lambda f, b: written.setdefault(f, b))
    int8 = next(r for r in rejected if r["precision"] == "int8")
    assert int8["test_acc"] == pytest.approx(coarse_acc, abs=100 / N_TEST + 1e-9)
    assert int8["accuracy_loss"] > 0 and "max_accuracy_loss = 0" in int8["reason"]
    assert re.search(rf"loses {int8['accuracy_loss']:.2f} accuracy points", int8["reason"])
    assert f"{ANCHOR}.int8.onnx" not in written
    fp16_acc = (ort_logits(zoo / f"{ANCHOR}.fp16.onnx", x).argmax(1) == y).mean() * 100
    assert (f"{ANCHOR}.fp16.onnx" in written) == (parent_acc - fp16_acc <= 0)
    assert [m["precision"] for m in made] == (["fp16"] if parent_acc - fp16_acc <= 0 else [])
    # a manifest listing the rejection validates; one without a reason does not
    manifest["rejected"] = rejected
    validate(json.loads(json.dumps(manifest)))
    bad = json.loads(json.dumps(manifest))
    del bad["rejected"][0]["reason"]
    with pytest.raises(ZooError, match=r"rejected\[0\]: missing field 'reason'"):
        validate(bad)


def test_forked_int8_grid_gives_the_in_process_models(zoo, sets, tmp_path):
    """The grid's quantize_static calls in forked workers (``_Quantizer``) give byte for byte the models the same
    calls make in this process, in the order asked, for mixed ops / granularity / methods / float nodes."""
    from klas.export.variants import _Quantizer, _quantize, end_weight_nodes, pre_process

    manifest = load_manifest(zoo)
    parent = next(m for m in manifest["models"] if m["name"] == ANCHOR)
    model = pre_process(onnx.load_from_string((zoo / parent["file"]).read_bytes()))[0]
    cal = x_y(sets[1])[0][:48]
    keys = [("all", (False, False), "MinMax", ()), ("weights", (True, True), "MinMax", ()),
            ("all", (True, False), "MinMax", end_weight_nodes(model)), ("weights", (False, False), "Percentile", ())]
    with _Quantizer(model, cal, "input", str(tmp_path)) as quantize:
        assert quantize.pool is not None  # this machine has more than one core (CI's has two)
        first = list(quantize(keys[:1]))  # the widest ops first: it writes the cache the others read
        forked = first + list(quantize(keys[1:]))
    (tmp_path / "seq").mkdir()
    job = (model, cal, "input", str(tmp_path / "seq"))
    alone = [_quantize(k, job) for k in keys]
    assert len(set(alone)) == len(keys)  # the keys make different models
    assert forked == alone


# --- manifest ------------------------------------------------------------------------------------------------------

def test_manifest_round_trip_with_variants_and_old_manifests(zoo, tmp_path):
    dst = tmp_path / "zoo"
    shutil.copytree(zoo, dst)
    m = load_manifest(dst, verify_files=True)
    save_manifest(m, dst)
    assert read_manifest(dst) == m == json.loads((zoo / MANIFEST).read_text())
    # an old (version 2) manifest: no variants, no precision fields -- still read, every entry float32
    from klas_runtime.preprocess import GEOMETRY

    old = json.loads(json.dumps(m))
    old["schema_version"] = 2
    old["models"] = [e for e in old["models"] if "parent" not in e]
    for e in old["models"]:
        e.pop("precision")
        for k in GEOMETRY:  # version 4's input geometry
            e["input"].pop(k, None)
    old.pop("rejected")
    (dst / MANIFEST).write_text(json.dumps(old))
    assert load_manifest(dst) == old
    assert Zoo(dst).pick(device="cpu", with_session=False).name == ANCHOR
    assert Zoo(dst).pick(device="cpu", with_session=False, precision="fp32").name == ANCHOR
    with pytest.raises(ZooError, match="no such entry"):
        Zoo(dst).pick(device="cpu", with_session=False, precision="int8")
    # what the schema refuses
    k = next(i for i, e in enumerate(m["models"]) if e.get("precision") == "int8")
    cases = [(lambda d: d.update(schema_version=VARIANTS_SINCE - 1), "need schema_version >= 3"),
             (lambda d: d["models"][k].update(parent="nope"), "parent 'nope' is not a float32 model"),
             (lambda d: d["models"][k].update(flops=d["models"][k]["flops"] + 1), "'flops' differs from its parent"),
             (lambda d: d["models"][k].update(precision="int4"), r"precision: invalid value"),
             (lambda d: d["models"][k].pop("variant"), "missing field 'variant'"),
             (lambda d: d["models"][k]["parity"].pop("top1_agreement"), "missing field 'top1_agreement'")]
    for edit, msg in cases:
        bad = json.loads(json.dumps(m))
        edit(bad)
        with pytest.raises(ZooError, match=msg):
            validate(bad)
    # a variant file swapped for its parent's is caught by verify (hash), as any model
    shutil.copy(zoo / MANIFEST, dst / MANIFEST)
    shutil.copy(dst / f"{ANCHOR}.onnx", dst / f"{ANCHOR}.int8.onnx")
    assert any(f"{ANCHOR}.int8.onnx" in p and "sha256" in p for p in verify_zoo(dst))


# --- latency per device ---------------------------------------------------------------------------------------------

def _oracle(manifest: dict, ms: float, batch: int, precisions=None) -> str | None:
    """The pick's rule over this device's (CPU) fastest p90 at ``batch``, written out: a variant slower than its
    parent and not significantly more accurate (recorded paired test) is not offered; an offered variant counts
    its parent's accuracy unless the difference is significant; equal accuracy: the faster variant, else float32."""
    here = device_label("CPUExecutionProvider")

    def p90(e):
        recs = [r["p90_ms"] for r in e["latency"] if r["device"] == here and r["batch"] == batch
                and r["provider"] == "CPUExecutionProvider"]
        return min(recs) if recs else None

    pool = {e["name"]: e for e in manifest["models"] if precisions is None or e.get("precision", "fp32") in precisions}
    ranked = []
    for e in pool.values():
        par = pool.get(e.get("parent"))
        acc, faster = e["test_acc"], False
        if par is not None:
            verdict = e["variant"]["significance"]["verdict"]
            if p90(e) >= p90(par) and verdict != "more accurate":
                continue
            acc = e["test_acc"] if verdict != "not significant" else par["test_acc"]
            faster = p90(e) < p90(par)
        if p90(e) is not None and p90(e) <= ms:
            ranked.append(((acc, faster, -p90(e) if faster else 0.0, e.get("precision", "fp32") == "fp32",
                            e["name"]), e["name"]))
    return max(ranked)[1] if ranked else None


def test_pick_by_latency_with_and_without_this_device(zoo, tmp_path, capsys):
    dst = tmp_path / "zoo"
    shutil.copytree(zoo, dst)
    assert cli.main(["profile", str(dst), "--threads", "1", "--batch", "1", "2", "--warmup", "1", "--runs", "5",
                     "--provider", "cpu", "--percentile", "p90"]) == 0
    out = capsys.readouterr().out
    manifest = load_manifest(dst)
    for e in manifest["models"]:
        assert {(r["threads"], r["batch"]) for r in e["latency"]} == {(1, 1), (1, 2)}
    # the per-device profile: JSON + PNG beside the manifest, its front recomputed here
    base = dst / f"profile-{device_slug(device_key('cpu'))}"
    prof = json.loads(base.with_suffix(".json").read_text())
    assert base.with_suffix(".png").stat().st_size > 5000 and prof["device"] == device_key("cpu")
    for table in prof["settings"]:
        pts = [(r["name"], r["p90_ms"], r["test_acc"]) for r in table["entries"]]
        front = [p for p in pts if not any(q[1] <= p[1] and q[2] >= p[2] and q[:1] != p[:1] and
                                           (q[1], q[2]) != (p[1], p[2]) for q in pts)]
        assert set(table["front"]) == {p[0] for p in front} and table["front"]
        assert {r["precision"] for r in table["entries"]} == {"fp32", "fp16", "int8"}
        assert f"batch {table['batch']} (p90): {' < '.join(table['front'])}" in out
    # budgets between the measured figures: the oracle over this device's records
    for batch in (1, 2):
        figures = sorted(min(r["p90_ms"] for r in e["latency"] if r["batch"] == batch) for e in manifest["models"])
        for ms in [figures[0] * 0.99] + [f * 1.0001 for f in figures]:
            want = _oracle(manifest, ms, batch)
            try:
                got = Zoo(dst).pick(max_latency_ms=ms, batch=batch, device="cpu", with_session=False).name
            except ZooError:
                got = None
            assert got == want, (batch, ms)
        for prec in ("fp16", "int8"):
            got = Zoo(dst).pick(max_latency_ms=1e6, batch=batch, device="cpu", precision=prec).name
            assert got == _oracle(manifest, 1e6, batch, (prec,)) == f"{ANCHOR}.{prec}"
    assert cli.main(["pick", str(dst), "--max-latency-ms", "1e6", "--percentile", "p90", "--precision", "int8",
                     "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{ANCHOR}.int8.onnx"
    # only another machine's figures: no pick by latency here, one line naming the command that measures
    other = json.loads(json.dumps(manifest))
    for e in other["models"]:
        for r in e["latency"]:
            r["device"] = "cpu: Some Other CPU"
    save_manifest(other, dst)
    with pytest.raises(ZooError, match=r"no entry of this zoo has a latency measured on this device") as err:
        Zoo(dst).pick(max_latency_ms=1e6, device="cpu", with_session=False)
    assert "klas profile" in str(err.value) and "\n" not in str(err.value)
    assert cli.main(["pick", str(dst), "--max-latency-ms", "1e6", "--device", "cpu"]) == 2
    err_line = capsys.readouterr().err.strip()
    assert len(err_line.splitlines()) == 1 and f"klas profile {dst}" in err_line
    assert Zoo(dst).pick(max_flops="1G", device="cpu", with_session=False).name  # FLOPs budgets still answer
    profile_zoo(dst, providers=["cpu"], threads=[1], batches=[1], warmup=1, runs=3, progress=False)
    assert _oracle(load_manifest(dst), 1e6, 1) == Zoo(dst).pick(max_latency_ms=1e6, device="cpu",
                                                               with_session=False).name


def test_pick_counts_only_significant_accuracy_and_measured_speed(zoo, tmp_path, capsys):
    """Latency and the paired test's verdicts set by hand on a copy: a slower, not significantly better variant is
    never offered (the pick says why); a faster one of equal accuracy wins over its parent; a significantly more
    accurate one competes on its own accuracy even when slower."""
    dst = tmp_path / "zoo"
    shutil.copytree(zoo, dst)
    base = load_manifest(dst)
    here = device_label("CPUExecutionProvider")
    rec = next(r for r in base["models"][0]["latency"] if r["device"] == here)

    def setup(ms: dict, verdicts: dict, accs: dict):
        m = json.loads(json.dumps(base))
        for e in m["models"]:
            e["latency"] = [dict(rec, p50_ms=ms[e["name"]], p90_ms=ms[e["name"]], p99_ms=ms[e["name"]],
                                 mean_ms=ms[e["name"]], threads=1, batch=1)]
            e["test_acc"] = accs[e["name"]]
            if "variant" in e:
                e["variant"]["significance"]["verdict"] = verdicts[e["name"]]
        save_manifest(m, dst)
        return m

    names = [ANCHOR, f"{ANCHOR}.fp16", f"{ANCHOR}.int8"]
    rng = np.random.default_rng(0)
    for trial in range(12):
        ms = dict(zip(names, rng.uniform(0.1, 1.0, 3).round(3)))
        accs = dict(zip(names, (80 + rng.uniform(-1, 1, 3)).round(2)))
        verdicts = {n: rng.choice(["not significant", "more accurate", "less accurate"]) for n in names[1:]}
        m = setup(ms, verdicts, accs)
        for budget in (1e6, float(np.median(list(ms.values())))):
            want = _oracle(m, budget, 1)
            try:
                got = Zoo(dst).pick(max_latency_ms=budget, device="cpu", with_session=False)
            except ZooError:
                got = None
            assert (got.name if got else None) == want, (trial, ms, accs, verdicts, budget)
            slow = [n for n in names[1:] if ms[n] >= ms[ANCHOR] and verdicts[n] != "more accurate"]
            if got is not None:
                assert got.name not in slow
                for n in slow:
                    assert f"{n} not offered: slower than {ANCHOR}" in got.reason
    # `klas pick` prints the same explanation: slower variants of equal accuracy are named as not offered
    setup({ANCHOR: 0.2, f"{ANCHOR}.fp16": 0.5, f"{ANCHOR}.int8": 0.4},
          {f"{ANCHOR}.fp16": "not significant", f"{ANCHOR}.int8": "not significant"},
          {ANCHOR: 80.0, f"{ANCHOR}.fp16": 80.5, f"{ANCHOR}.int8": 80.9})
    assert cli.main(["pick", str(dst), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{ANCHOR}.onnx"
    assert f"{ANCHOR}.int8 not offered: slower than {ANCHOR} (p90 0.4 vs 0.2 ms" in out
    assert "not significantly more accurate (80.90 vs 80.00%" in out and "paired sign test" in out


def test_family_order_warning_from_an_adaptation_record(tmp_path):
    """A family whose larger anchors are not more accurate on val than smaller ones is named in one line, with the
    numbers; sizes come from the safetensors headers (parameters), checked here against the tensors themselves."""
    import torch
    from safetensors.torch import save_file

    from klas.commands.anchors import adapted_family_warnings
    from klas.families.adapt import RECORD

    rng = np.random.default_rng(1)
    for trial in range(6):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        anchors = []
        for k, width in enumerate(rng.permutation([3, 7, 11, 17])[:3]):
            tensors = {"w": torch.zeros(int(width), 5), "b": torch.zeros(int(width) + k)}
            save_file(tensors, str(folder / f"a{k}.safetensors"))
            anchors.append(dict(name=f"a{k}", file=f"a{k}.safetensors", val_acc=float(rng.uniform(50, 90)),
                                params=sum(t.numel() for t in tensors.values())))
        (folder / RECORD).write_text(json.dumps(dict(anchors=anchors)))
        lines = adapted_family_warnings(folder)
        bad = [(a, b) for a in anchors for b in anchors if a["params"] > b["params"] and a["val_acc"] <= b["val_acc"]]
        assert len(lines) == (1 if bad else 0), (anchors, lines)
        for a, b in bad:
            assert f"{a['name']} ({a['params']} params) {a['val_acc']:.2f}% <=" in lines[0]
        if lines:
            assert "\n" not in lines[0] and str(folder / RECORD) in lines[0]


@pytest.mark.parametrize("config", ["fmnist-deit", "fmnist-mixed", "pydoc-llama"])
def test_family_order_warning_from_an_embedded_card(config):
    """Before any stage of an embedded family's run: the card's FLOPs and val accuracy, checked pair by pair here."""
    from klas.commands.pipeline import carded_family_warnings
    from klas.config import load_config
    from klas.families.trainer import load_card

    cfg = load_config(Path(__file__).resolve().parents[1] / "klas" / "configs" / f"{config}.toml", [])
    lines = carded_family_warnings(cfg)
    rows = [e for e in load_card(cfg.run.family)["anchors"] if "val_acc" in e]
    bad = {a["name"] for a in rows for b in rows if a["flops"] > b["flops"] and a["val_acc"] <= b["val_acc"]}
    assert len(lines) == (1 if bad else 0), lines
    for name in bad:
        assert f"{name} (" in lines[0] and "card" in lines[0]
