"""The torch-free runtime: budget queries at/below/above every model's cost, refusal of tampered or unsafe zoos,
input checks, image preprocessing, ``klas profile/pick/predict``."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from klas_runtime.errors import ZooError as KlasError  # the runtime's errors; klas.errors.KlasError derives from it
from klas_runtime.manifest import MANIFEST, SCHEMA_VERSION, load_manifest, validate
from klas_runtime.profile import device_label, profile_zoo
from klas_runtime.runtime import Zoo, load_image, parse_count

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    """Three random-weight anchors and two untrained stitches, exported with accuracies measured at export."""
    import torch

    import klas
    from klas.data import load_dataset
    from klas.export import export_models
    from klas.stages.s6_export import ExportConfig
    from klas.stitch import StitchConfig, StitchedNet, StitchLayer

    torch.manual_seed(1)
    fam = klas.create_family("fmnist-deit")
    nets = [(StitchConfig.anchor(v.name), StitchedNet(v, -1, v, -1, None), None) for v in fam]
    for s, i, t, j in ((0, 5, 1, 6), (1, 3, 2, 2)):
        src, tgt = fam[s], fam[t]
        nets.append((StitchConfig(src.name, i, tgt.name, j),
                     StitchedNet(src, i, tgt, j, StitchLayer(src.feature_dim(i), tgt.feature_dim(j))), None))
    out = tmp_path_factory.mktemp("rt") / "zoo"
    data = load_dataset("fashion-mnist", "test").subset(200)
    export_models(nets, out, "fmnist-deit", data, ExportConfig(parity_images=200, accuracy_images=200, warmup=2,
                                                               runs=10, exporter="torchscript"), progress=False)
    return out


@pytest.fixture
def copy_zoo(zoo_dir, tmp_path):
    dst = tmp_path / "zoo"
    shutil.copytree(zoo_dir, dst)
    return dst


def _cpu_latency(m: dict, stat: str = "p90") -> float | None:
    """Oracle: this device's fastest CPU figure at batch 1 (other machines' figures do not count)."""
    recs = [r for r in m["latency"] if r["provider"] == "CPUExecutionProvider" and r["batch"] == 1]
    here = [r for r in recs if r["device"] == device_label("CPUExecutionProvider")]
    return min(r[f"{stat}_ms"] for r in here) if here else None


def _oracle(models, flops=None, ms=None, acc=None) -> str | None:
    fits = [m for m in models if (flops is None or m["flops"] <= flops)
            and (ms is None or (_cpu_latency(m) is not None and _cpu_latency(m) <= ms))
            and (acc is None or m["test_acc"] >= acc)]
    if not fits:
        return None
    best_acc = max(m["test_acc"] for m in fits)
    return min((m for m in fits if m["test_acc"] == best_acc), key=lambda m: (m["flops"], m["name"]))["name"]


def _pick_name(zoo: Zoo, **budget) -> str | None:
    try:
        return zoo.pick(device="cpu", with_session=False, **budget).name
    except KlasError:
        return None


def test_runtime_imports_and_runs_without_torch(zoo_dir):
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np\n"
        "import klas_runtime.runtime\n"
        "choice = klas_runtime.runtime.Zoo(sys.argv[1]).pick(device='cpu')\n"
        "x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)\n"
        "assert choice.run(x).shape == (3, 10)\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules)\n"
        "print('ok', choice.name)\n")
    res = subprocess.run([sys.executable, "-c", code, str(zoo_dir)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("ok ")


def test_pick_at_just_below_and_just_above_every_cost(zoo_dir):
    zoo = Zoo(zoo_dir)
    models = zoo.models
    assert len({m["flops"] for m in models}) == len(models)
    for m in models:
        for budget in (m["flops"] - 1, m["flops"], m["flops"] + 1):
            assert _pick_name(zoo, max_flops=budget) == _oracle(models, flops=budget), budget
        assert _pick_name(zoo, max_flops=m["flops"]) is not None
        ms = _cpu_latency(m)
        for budget in (np.nextafter(ms, 0.0), ms, np.nextafter(ms, np.inf)):
            assert _pick_name(zoo, max_latency_ms=float(budget)) == _oracle(models, ms=budget), budget
        acc = m["test_acc"]
        for budget in (np.nextafter(acc, -np.inf), acc, np.nextafter(acc, np.inf)):
            assert _pick_name(zoo, min_accuracy=float(budget)) == _oracle(models, acc=budget), budget
        combined = dict(flops=m["flops"], ms=_cpu_latency(m) * 1.5, acc=acc)
        assert _pick_name(zoo, max_flops=m["flops"], max_latency_ms=combined["ms"], min_accuracy=acc) == \
            _oracle(models, **combined)
    # the picked model's own cost always fits the budget
    choice = zoo.pick(max_flops=models[-1]["flops"], device="cpu")
    assert choice.entry["flops"] <= models[-1]["flops"] and "most accurate of" in choice.reason


def test_budget_below_cheapest_names_it(zoo_dir):
    zoo = Zoo(zoo_dir)
    cheapest = min(zoo.models, key=lambda m: m["flops"])
    with pytest.raises(KlasError, match=rf"below the cheapest model, {re.escape(cheapest['name'])}"):
        zoo.pick(max_flops=cheapest["flops"] - 1, device="cpu")
    fastest = min(zoo.models, key=_cpu_latency)
    with pytest.raises(KlasError, match="below the fastest model"):
        zoo.pick(max_latency_ms=_cpu_latency(fastest) * 0.999, device="cpu")
    top = max(m["test_acc"] for m in zoo.models)
    with pytest.raises(KlasError, match="above the most accurate model"):
        zoo.pick(min_accuracy=top + 0.01, device="cpu")
    with pytest.raises(KlasError, match="no latency measured|has a latency measured"):
        zoo.pick(max_latency_ms=1e6, device="cpu", batch=64)


def test_parse_count_suffixes():
    assert parse_count("40M") == 40e6 and parse_count("1.5k") == 1500.0 and parse_count("2G") == 2e9
    assert parse_count("7") == 7.0 and parse_count(" 3.25 m ") == 3.25e6 and parse_count(12) == 12.0
    for bad in ("40X", "M", "", "-1M", "1..2"):
        with pytest.raises(KlasError, match="--max-flops"):
            parse_count(bad)


def test_tampered_file_or_manifest_is_refused(copy_zoo):
    manifest = json.loads((copy_zoo / MANIFEST).read_text())
    target = copy_zoo / manifest["models"][0]["file"]
    original = target.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    target.write_bytes(bytes(flipped))
    with pytest.raises(KlasError, match="sha256 .* does not match"):
        Zoo(copy_zoo)
    target.write_bytes(original)
    Zoo(copy_zoo)
    # a manifest whose claims were edited (hashes still valid): the file's embedded entry disagrees
    manifest["models"][0]["flops"] -= 1
    (copy_zoo / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KlasError, match="embedded 'flops'"):
        Zoo(copy_zoo).session(manifest["models"][0]["name"], device="cpu")
    manifest["models"][0]["sha256"] = "f" * 64
    (copy_zoo / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KlasError, match="does not match"):
        Zoo(copy_zoo)


def test_missing_file_and_path_traversal_are_refused(copy_zoo, tmp_path):
    manifest = json.loads((copy_zoo / MANIFEST).read_text())
    first = manifest["models"][0]["file"]
    (copy_zoo / first).unlink()
    with pytest.raises(KlasError, match="missing"):
        Zoo(copy_zoo)
    outside = tmp_path / "outside.onnx"
    shutil.copy(next(copy_zoo.glob("*.onnx")), outside)
    for evil in ("../outside.onnx", str(outside), "sub/x.onnx", ".."):
        manifest["models"][0]["file"] = evil
        (copy_zoo / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(KlasError, match="plain file name"):
            Zoo(copy_zoo)
    (copy_zoo / first).symlink_to(outside)
    manifest["models"][0]["file"] = first
    (copy_zoo / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KlasError, match="outside the zoo folder"):
        Zoo(copy_zoo)


def test_schema_validation(zoo_dir):
    good = load_manifest(zoo_dir)
    validate(json.loads(json.dumps(good)))
    assert len(good["models"][0]["output"]["classes"]) == good["models"][0]["output"]["num_classes"] > 1
    unnamed = json.loads(json.dumps(good))
    for m in unnamed["models"]:
        if "output" in m:
            m["output"]["classes"] = []
    validate(unnamed)  # no class names at all is allowed (predictions are indices)
    cases = [(lambda m: m.pop("family"), "missing field 'family'"),
             (lambda m: m.update(schema_version=SCHEMA_VERSION + 1), "newer than this klas"),
             (lambda m: m["models"][0].update(test_acc=101.0), r"test_acc: invalid"),
             (lambda m: m["models"][0]["input"].update(shape=[1, 1, 28, 28]), r"input\.shape"),
             (lambda m: m["models"][0]["latency"][0].pop("p99_ms"), r"latency\[0\]: missing field 'p99_ms'"),
             (lambda m: m["models"].append(dict(m["models"][0])), "duplicate model"),
             (lambda m: m.update(models=[]), r"models: invalid"),
             # a class list shorter than the logits (issue 32): the names would be shifted or missing at run time
             (lambda m: m["models"][0]["output"].update(classes=m["models"][0]["output"]["classes"][:-1]),
              r"models\[0\]\.output: \d+ class names for num_classes \d+")]
    for edit, message in cases:
        bad = json.loads(json.dumps(good))
        edit(bad)
        with pytest.raises(KlasError, match=message):
            validate(bad)


def test_wrong_input_shape_is_a_clear_error(zoo_dir):
    choice = Zoo(zoo_dir).pick(device="cpu")
    rng = np.random.default_rng(3)
    for shape in ((1, 3, 28, 28), (1, 28, 28), (2, 1, 32, 32), (0, 1, 28, 28)):
        with pytest.raises(KlasError, match=r"input shape .* does not match the model input \[batch, 1, 28, 28\]"):
            choice.run(rng.standard_normal(shape).astype(np.float32))
    with pytest.raises(KlasError, match="not floating point"):
        choice.run(rng.integers(0, 255, (1, 1, 28, 28)))
    labels, probs = choice.predict(rng.standard_normal((5, 1, 28, 28)))
    assert labels.shape == (5,) and np.allclose(probs.sum(1), 1.0)


def test_load_image_matches_float64_reference(zoo_dir, tmp_path):
    from PIL import Image

    spec = Zoo(zoo_dir).models[0]["input"]
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    pixels[0, 0], pixels[-1, -1] = 0, 255  # extreme values
    Image.fromarray(pixels).save(tmp_path / "g.png")
    got = load_image(tmp_path / "g.png", spec)
    want = (pixels.astype(np.float64) / 255 - spec["mean"][0]) / spec["std"][0]
    assert got.shape == (1, 1, 28, 28) and got.dtype == np.float32
    assert np.abs(got[0, 0] - want).max() < 1e-5
    Image.fromarray(rng.integers(0, 256, (41, 57, 3), dtype=np.uint8)).save(tmp_path / "c.png")  # RGB, odd size
    assert load_image(tmp_path / "c.png", spec).shape == (1, 1, 28, 28)
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(KlasError, match="not a readable image"):
        load_image(tmp_path / "x.png", spec)


def test_profile_adds_this_device_and_replaces_same_key(copy_zoo):
    before = load_manifest(copy_zoo)
    profile_zoo(copy_zoo, providers=["cpu"], threads=[1, 2], batches=[3], warmup=1, runs=5, progress=False)
    profile_zoo(copy_zoo, providers=["cpu"], threads=[2], batches=[3], warmup=1, runs=7, progress=False)
    after = load_manifest(copy_zoo)
    assert not list(copy_zoo.glob(".*.tmp"))
    for old, new in zip(before["models"], after["models"]):
        keys = [(r["threads"], r["batch"]) for r in new["latency"]]
        assert sorted(keys) == sorted([(r["threads"], r["batch"]) for r in old["latency"]] + [(1, 3), (2, 3)])
        rec = next(r for r in new["latency"] if (r["threads"], r["batch"]) == (2, 3))
        assert rec["runs"] == 7 and rec["device"] == device_label("CPUExecutionProvider")
        assert 0 < rec["p50_ms"] <= rec["p90_ms"] <= rec["p99_ms"]
    choice = Zoo(copy_zoo).pick(max_latency_ms=1e6, device="cpu", batch=3, threads=2)
    assert choice.latency_record["batch"] == 3 and choice.latency_record["threads"] == 2


def test_cli_pick_profile_predict(zoo_dir, copy_zoo, tmp_path, capsys):
    from PIL import Image

    from klas import cli

    zoo = Zoo(zoo_dir)
    mid = sorted(zoo.models, key=lambda m: m["flops"])[2]
    budget = f"{mid['flops'] / 1e6:.6f}M"
    assert cli.main(["pick", str(zoo_dir), "--max-flops", budget, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    want = next(m for m in zoo.models if m["name"] == _oracle(zoo.models, flops=parse_count(budget)))
    assert out.splitlines()[0] == want["file"] and "why:" in out
    assert cli.main(["pick", str(zoo_dir), "--max-flops", "1K"]) == 2
    assert "below the cheapest model" in capsys.readouterr().err
    assert cli.main(["profile", str(copy_zoo), "--provider", "cpu", "--batch", "2", "--runs", "3"]) == 0
    assert "batch   2" in capsys.readouterr().out
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (28, 28), dtype=np.uint8)).save(img)
    assert cli.main(["predict", str(zoo_dir), "--max-latency-ms", "1000", "--device", "cpu", str(img)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    choice = zoo.pick(max_latency_ms=1000, device="cpu")
    k = int(choice.run(load_image(img, choice.entry["input"])).argmax())
    assert line.startswith(f"{img}: {choice.entry['output']['classes'][k]} (class {k}")


@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="GPU-only: needs onnxruntime-gpu with CUDA")
def test_cuda_session(zoo_dir):
    choice = Zoo(zoo_dir).pick(device="cuda")
    assert choice.session.get_providers()[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(6).standard_normal((4, 1, 28, 28)).astype(np.float32)
    cpu = Zoo(zoo_dir).session(choice.entry, device="cpu").run(None, {"input": x})[0]
    assert np.abs(choice.run(x) - cpu).max() < 1e-3


# --- runtime entries (klas_runtime.entries): predict dispatches on the manifest's runtime_entry ---------------------

TASK_FIELDS = ("task", "cost_unit", "metric", "runtime_entry")


def _set_header(zoo: Path, **fields) -> dict:
    """Rewrite the zoo's manifest header: ``fields`` set, the task fields not given removed (a pre-task zoo)."""
    manifest = json.loads((zoo / MANIFEST).read_text())
    for key in TASK_FIELDS:
        manifest.pop(key, None)
    manifest.update(fields)
    (zoo / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _predict_lines(zoo: Path, images: list, capsys) -> tuple[int, list[str], str]:
    from klas_runtime import cli as runtime_cli

    rc = runtime_cli.main(["predict", str(zoo), "--device", "cpu", *map(str, images)])
    captured = capsys.readouterr()
    return rc, captured.out.splitlines(), captured.err


def test_zoo_without_runtime_entry_is_served_by_classify(copy_zoo, tmp_path, capsys):
    """A manifest written before tasks (no task fields) and one naming ``classify`` load and predict alike."""
    from PIL import Image

    from klas_runtime.entries import DEFAULT_ENTRY, registered_entries

    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (28, 28), dtype=np.uint8)).save(img)
    _set_header(copy_zoo)
    assert DEFAULT_ENTRY == "classify" and "classify" in registered_entries()
    assert Zoo(copy_zoo).runtime.name == "classify"
    rc, before, _ = _predict_lines(copy_zoo, [img], capsys)
    assert rc == 0 and before[-1].startswith(f"{img}: ")
    manifest = _set_header(copy_zoo, task="image_classification", cost_unit="image", metric="accuracy",
                           runtime_entry="classify")
    assert validate(manifest)["runtime_entry"] == "classify"
    assert Zoo(copy_zoo).runtime.name == "classify"
    rc, after, _ = _predict_lines(copy_zoo, [img], capsys)
    assert rc == 0 and after == before
    with pytest.raises(KlasError, match=r"runtime_entry: invalid value 3"):
        validate({**manifest, "runtime_entry": 3})


def test_unknown_runtime_entry_is_refused_in_one_line(copy_zoo, tmp_path, capsys):
    from klas_runtime.runtime import verify_zoo

    _set_header(copy_zoo, task="segmentation", cost_unit="image", metric="miou", runtime_entry="segment")
    load_manifest(copy_zoo)  # the schema accepts it: only serving it needs the entry
    where = str(copy_zoo / MANIFEST)
    with pytest.raises(KlasError, match=r"runtime entry 'segment' .*registered: classify, generate") as e:
        Zoo(copy_zoo).pick(device="cpu")
    assert where in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "x.txt").write_text("some text")
    rc, out, err = _predict_lines(copy_zoo, [tmp_path / "x.txt"], capsys)
    assert rc == 2 and out == [] and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert where in err and "'segment'" in err and "registered: classify, generate" in err
    problems = verify_zoo(copy_zoo)  # the files are sound; that this runtime cannot serve them is the problem
    assert len(problems) == 1 and "runtime entry 'segment'" in problems[0]


def test_predict_dispatches_to_a_registered_entry(copy_zoo, tmp_path, capsys, monkeypatch):
    """A second entry registered beside ``classify`` serves the zoos that name it: its own input reader (here a
    text file, which ``classify`` would refuse) and its own prediction line."""
    from klas_runtime import entries
    from klas_runtime.classify import Choice
    from klas_runtime.entries import RuntimeEntry, register_entry

    monkeypatch.setattr(entries, "_ENTRIES", entries._ENTRIES.copy())  # registrations end with the test
    seen = []

    def load_input(path, spec):
        seen.append(Path(path).read_text())
        return np.zeros([1] + spec["shape"][1:], dtype=np.float32)

    register_entry(RuntimeEntry("echo", model=Choice, load_input=load_input,
                                describe=lambda choice, x: f"echo {choice.name} {tuple(x.shape)}"))
    with pytest.raises(KlasError, match="already registered"):
        register_entry(RuntimeEntry("echo", model=Choice, load_input=load_input, describe=str))
    assert entries.registered_entries() == ("classify", "generate", "echo")
    _set_header(copy_zoo, task="echo-task", runtime_entry="echo")
    (tmp_path / "x.txt").write_text("hello")
    rc, out, err = _predict_lines(copy_zoo, [tmp_path / "x.txt"], capsys)
    choice = Zoo(copy_zoo).pick(device="cpu", with_session=False)
    assert rc == 0, err
    assert out[-1] == f"{tmp_path / 'x.txt'}: echo {choice.name} (1, 1, 28, 28)" and seen == ["hello"]
    _set_header(copy_zoo)  # the same zoo without the field: classify again, which refuses a text file
    rc, out, err = _predict_lines(copy_zoo, [tmp_path / "x.txt"], capsys)
    assert rc == 2 and "not a readable image" in err
