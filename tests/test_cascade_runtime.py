"""Cascade entries of a zoo manifest (schema version 2): two exported models and a max-softmax threshold, used by the
torch-free runtime like a model -- validation, pick by worst-case vs average FLOPs, predict against a numpy
reference on real Fashion-MNIST images, latency on real vs random inputs, verify.

The cascade is added by hand to a copy of the session's real exported zoo (``exported_zoo``: pretrained anchors), its
threshold taken from the cheaper member's confidences on val and every figure computed from onnxruntime predictions
on real val / test images, the way the evaluation stage and the exporter compute them."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from klas_runtime import cli
from klas_runtime.errors import ZooError
from klas_runtime.manifest import MANIFEST, SCHEMA_VERSION, load_manifest, save_manifest, validate
from klas_runtime.profile import device_label, profile_zoo
from klas_runtime.timing import RANDOM_NOTE, cascade_latency_record
from klas_runtime.runtime import CascadeChoice, Choice, Zoo, load_image, verify_zoo

FIRST, SECOND = "fmnist-deit-ti", "fmnist-deit-b"
N_VAL, N_TEST = 1000, 1000


# --- a numpy reference (onnxruntime for the members' logits, nothing from klas_runtime) ----------------------------

def normalize(pixels: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 [N, C, H, W] -> the model input, per the manifest's input spec, computed in float64."""
    mean = np.asarray(spec["mean"], dtype=np.float64).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float64).reshape(1, -1, 1, 1)
    return ((pixels.astype(np.float64) * spec["scale"] - mean) / std).astype(np.float32)


def member_logits(zoo_dir: Path, entry: dict, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(zoo_dir / entry["file"]), providers=["CPUExecutionProvider"])
    return sess.run([entry["output"]["name"]], {entry["input"]["name"]: x})[0]


def np_softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z.astype(np.float64) - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def reference_cascade(l1: np.ndarray, l2: np.ndarray, threshold: float):
    """(classes, probabilities, deferred) of a max-softmax cascade from both members' logits on the whole batch."""
    p1, p2 = np_softmax(l1), np_softmax(l2)
    deferred = p1.max(axis=1) < threshold
    probs = np.where(deferred[:, None], p2, p1)
    return probs.argmax(axis=1), probs, deferred


def real_images(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    from klas.data import load_dataset

    d = load_dataset("fashion-mnist", split).subset(n)
    return d.images.numpy(), d.labels.numpy()


def add_cascade(zoo_dir: Path, first: str = FIRST, second: str = SECOND, quantile: float = 0.3) -> dict:
    """Add the cascade ``first > second`` to the zoo at ``zoo_dir`` (a copy), as the exporter writes it: threshold =
    the ``quantile`` of ``first``'s max softmax probability on val (4 decimals), deferral / average FLOPs / accuracy
    from real val and test predictions. Every model's ``test_acc`` / ``val_acc`` is re-measured on the same images
    so the accuracies compared by ``pick`` come from one test set. Returns the figures the tests need."""
    manifest = json.loads((zoo_dir / MANIFEST).read_text())
    models = {m["name"]: m for m in manifest["models"]}
    a, b = models[first], models[second]
    spec = a["input"]
    data = {s: real_images(s, n) for s, n in (("val", N_VAL), ("test", N_TEST))}
    x = {s: normalize(px, spec) for s, (px, _) in data.items()}
    logits = {(name, s): member_logits(zoo_dir, m, x[s]) for name, m in models.items() for s in x}
    for name, m in models.items():
        for s, (_, y) in data.items():
            m[f"{s}_acc"] = float((logits[name, s].argmax(1) == y).mean() * 100)
        m["test_acc_source"] = f"onnxruntime on {N_TEST} fashion-mnist test images (test_cascade_runtime)"
    threshold = round(float(np.quantile(np_softmax(logits[first, "val"]).max(1), quantile)), 4)
    acc, deferral = {}, {}
    for s, (_, y) in data.items():
        cls, _, deferred = reference_cascade(logits[first, s], logits[second, s], threshold)
        acc[s], deferral[s] = float((cls == y).mean() * 100), float(deferred.mean())
    entry = dict(name=f"{first}>{second}@{threshold:.4f}", kind="cascade", members=[first, second],
                 threshold=threshold, flops=a["flops"] + b["flops"],
                 flops_avg={s: a["flops"] + deferral[s] * b["flops"] for s in ("val", "test")},
                 deferral=deferral, params=a["params"] + b["params"], test_acc=acc["test"], val_acc=acc["val"],
                 test_acc_source=f"onnxruntime members on {N_TEST} fashion-mnist test images", latency=[])
    manifest["models"] = sorted(manifest["models"] + [entry], key=lambda e: (e["flops"], e["name"]))
    manifest["schema_version"] = SCHEMA_VERSION
    save_manifest(manifest, zoo_dir)
    return dict(entry=entry, pixels=data["test"][0], labels=data["test"][1], x=x["test"],
                logits=(logits[first, "test"], logits[second, "test"]))


@pytest.fixture(scope="module")
def cascade(exported_zoo, tmp_path_factory) -> dict:
    zoo_dir = tmp_path_factory.mktemp("cascade") / "zoo"
    shutil.copytree(exported_zoo, zoo_dir)
    return dict(add_cascade(zoo_dir), zoo=zoo_dir)


@pytest.fixture
def copy_zoo(cascade, tmp_path) -> Path:
    dst = tmp_path / "zoo"
    shutil.copytree(cascade["zoo"], dst)
    return dst


# --- oracle for pick -------------------------------------------------------------------------------------------------

def _cost(e: dict, by_average: bool) -> float:
    return e["flops_avg"]["val"] if (by_average and e.get("kind") == "cascade") else e["flops"]


def _oracle(entries: list[dict], flops: float, by_average: bool) -> str | None:
    fits = [e for e in entries if _cost(e, by_average) <= flops]
    if not fits:
        return None
    return max(fits, key=lambda e: (e["test_acc"], -_cost(e, by_average), e["name"]))["name"]


def _pick(zoo: Zoo, flops: float, by_average: bool) -> str | None:
    try:
        return zoo.pick(max_flops=flops, device="cpu", with_session=False, by_average=by_average).name
    except ZooError:
        return None


# --- validation ----------------------------------------------------------------------------------------------------

def test_manifest_validation_of_cascades(cascade):
    good = load_manifest(cascade["zoo"])
    assert good["schema_version"] == SCHEMA_VERSION == 4  # 4: input geometry (test_preprocess.py)
    name = cascade["entry"]["name"]
    k = next(i for i, e in enumerate(good["models"]) if e["name"] == name)

    def edit(fn):
        bad = json.loads(json.dumps(good))
        fn(bad["models"][k], bad)
        return bad

    cases = [
        (lambda c, m: c.update(members=[FIRST, "fmnist-deit-xl"]), r"member 'fmnist-deit-xl' is not a model entry"),
        (lambda c, m: c.update(members=[FIRST, name]), rf"member {re.escape(repr(name))} is not a model entry"),
        (lambda c, m: c.update(members=[FIRST, FIRST]), "two distinct models"),
        (lambda c, m: c.update(members=[FIRST]), r"members: invalid"),
        (lambda c, m: c.update(members=[SECOND, FIRST]), "cheaper first"),
        (lambda c, m: c.update(flops=c["flops"] - 1), "is not the worst case, the sum of its members' flops"),
        (lambda c, m: c.update(params=c["params"] + 1), "params .* is not the sum"),
        (lambda c, m: c.update(threshold=0.0), r"threshold: invalid value 0\.0 \(expected a probability in \(0, 1\]\)"),
        (lambda c, m: c.update(threshold=1.5), r"threshold: invalid"),
        (lambda c, m: c.update(threshold="0.5"), r"threshold: invalid"),
        (lambda c, m: c["flops_avg"].update(val=c["flops"] + 1.0), r"flops_avg\.val .* is outside"),
        (lambda c, m: c["flops_avg"].update(test=1000.0), r"flops_avg\.test .* is outside"),
        (lambda c, m: c["flops_avg"].pop("test"), r"flops_avg: missing field 'test'"),
        (lambda c, m: c["deferral"].update(val=1.2), r"deferral\.val: invalid"),
        (lambda c, m: c.update(file="x.onnx"), "a cascade has no 'file' of its own"),
        (lambda c, m: c.update(kind="ensemble"), r"kind: invalid value \"ensemble\""),
        (lambda c, m: c.pop("val_acc"), "missing field 'val_acc'"),
        (lambda c, m: m.update(schema_version=1), "cascade entries need schema_version >= 2"),
        (lambda c, m: m["models"].append(dict(c)), "duplicate model name"),
    ]
    for fn, message in cases:
        with pytest.raises(ZooError, match=message) as e:
            validate(edit(fn))
        assert "\n" not in str(e.value) and name in str(e.value), str(e.value)  # one line naming the cascade
    # a version-1 manifest (models only, no "kind") is still read; a newer version is refused
    old = json.loads(json.dumps(good))
    old["models"] = [m for m in old["models"] if m.get("kind") != "cascade"]
    old["schema_version"] = 1
    validate(old)
    with pytest.raises(ZooError, match="newer than this klas"):
        validate(edit(lambda c, m: m.update(schema_version=SCHEMA_VERSION + 1)))


def test_zoo_lists_cascades_apart_and_refuses_a_session_for_one(cascade):
    zoo = Zoo(cascade["zoo"])
    name = cascade["entry"]["name"]
    assert [c["name"] for c in zoo.cascades] == [name] and name not in [m["name"] for m in zoo.models]
    assert len(zoo) == len(zoo.models) + 1 and zoo[name]["kind"] == "cascade"
    with pytest.raises(ZooError, match="a cascade has no file"):
        zoo.session(name, device="cpu")


# --- pick ----------------------------------------------------------------------------------------------------------

def test_pick_by_worst_case_and_by_average(cascade):
    zoo = Zoo(cascade["zoo"])
    c = cascade["entry"]
    entries = zoo.entries
    for by_average in (False, True):
        for e in entries:
            cost = _cost(e, by_average)
            for budget in (np.nextafter(cost, 0.0), cost, np.nextafter(cost, np.inf), cost - 1, cost + 1):
                assert _pick(zoo, float(budget), by_average) == _oracle(entries, budget, by_average), \
                    (e["name"], by_average, budget)

    # the cascade is more accurate than every model within its average cost (real figures; a precondition)
    avg, worst = c["flops_avg"]["val"], c["flops"]
    cheaper = [m for m in zoo.models if m["flops"] <= avg]
    assert c["flops"] > max(m["flops"] for m in zoo.models) and c["test_acc"] > max(m["test_acc"] for m in cheaper)
    # by average: fits at its val average, not just below; by worst case: not at the average
    choice = zoo.pick(max_flops=avg, device="cpu", by_average=True)
    assert isinstance(choice, CascadeChoice) and choice.name == c["name"]
    why = choice.reason
    assert all(s in why for s in (c["name"], FIRST, SECOND, f"threshold {c['threshold']:g}"))
    assert "average on validation data" in why and "by_average" in why
    assert _pick(zoo, float(np.nextafter(avg, 0.0)), True) != c["name"]
    best_model = max(cheaper, key=lambda m: (m["test_acc"], -m["flops"]))["name"]
    why = zoo.pick(max_flops=avg, device="cpu", with_session=False).reason
    assert why.startswith(f"{best_model}: ") and f"cascade {c['name']} " in why and "would fit by its average" in why
    # by worst case the cascade fits from the sum of its members' FLOPs on: shown with its large member made (in
    # memory) less accurate than the cascade, so nothing else outranks it
    zoo[SECOND]["test_acc"] = c["test_acc"] - 0.5
    assert _pick(zoo, worst, False) == c["name"]
    assert _pick(zoo, worst - 1, False) == SECOND  # large member alone fits; the cascade does not
    why = zoo.pick(max_flops=worst, device="cpu", with_session=False).reason
    assert "checked against its worst case" in why and all(s in why for s in (c["name"], FIRST, SECOND))
    # budget below the cheapest model names it, in either mode
    for by_average in (False, True):
        with pytest.raises(ZooError, match=f"below the cheapest model, {FIRST}"):
            zoo.pick(max_flops=zoo[FIRST]["flops"] - 1, device="cpu", by_average=by_average)


# --- predict -------------------------------------------------------------------------------------------------------

def test_predict_equals_numpy_reference_on_real_images(cascade):
    zoo = Zoo(cascade["zoo"])
    c = cascade["entry"]
    want_cls, want_probs, want_deferred = reference_cascade(*cascade["logits"], c["threshold"])
    assert 0 < want_deferred.sum() < len(want_deferred)  # both members answer some images
    choice = zoo.pick(max_flops=c["flops_avg"]["val"], device="cpu", by_average=True)
    assert isinstance(choice, CascadeChoice) and choice.files == [zoo[FIRST]["file"], zoo[SECOND]["file"]]
    assert choice.input == zoo[FIRST]["input"] and choice.classes == zoo[FIRST]["output"]["classes"]
    x = normalize(cascade["pixels"], choice.input)
    for lo, hi in ((0, N_TEST), (0, 1), (7, 68)):  # the whole set, one image, an odd batch
        cls, probs = choice.predict(x[lo:hi])
        assert cls.dtype == np.int64 and probs.dtype == np.float64 and probs.shape == (hi - lo, 10)
        assert np.array_equal(cls, want_cls[lo:hi])
        assert np.abs(probs - want_probs[lo:hi]).max() < 1e-5
        _, _, answered = choice.predict_detailed(x[lo:hi])
        assert np.array_equal(answered, want_deferred[lo:hi].astype(np.int64))
    assert np.array_equal(choice.run(x).argmax(1), want_cls)
    acc = float((want_cls == cascade["labels"]).mean() * 100)
    assert acc == pytest.approx(c["test_acc"])
    # a model and a cascade are used identically: same calls, same return types
    model = zoo.open(FIRST, device="cpu")
    assert isinstance(model, Choice) and model.members == [FIRST] and model.files == [zoo[FIRST]["file"]]
    m_cls, m_probs = model.predict(x[:5])
    assert m_cls.dtype == cls.dtype and m_probs.dtype == probs.dtype
    with pytest.raises(ZooError, match=r"input shape .* does not match"):
        choice.predict(np.zeros((2, 3, 28, 28), np.float32))


def test_cli_pick_and_predict_with_a_cascade(cascade, tmp_path, capsys):
    from PIL import Image

    zoo_dir, c = cascade["zoo"], cascade["entry"]
    budget = str(c["flops_avg"]["val"])
    zoo = Zoo(zoo_dir)
    assert cli.main(["pick", str(zoo_dir), "--max-flops", budget, "--device", "cpu", "--by-average"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{zoo[FIRST]['file']} {zoo[SECOND]['file']}" and c["name"] in out[1]
    assert cli.main(["pick", str(zoo_dir), "--max-flops", budget, "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[0] != out[0]  # worst case: a single model
    _, _, deferred = reference_cascade(*cascade["logits"], c["threshold"])
    idx = [int(np.flatnonzero(~deferred)[0]), int(np.flatnonzero(deferred)[0])]
    paths = []
    for i in idx:
        paths.append(tmp_path / f"test-{i}.png")
        Image.fromarray(cascade["pixels"][i, 0]).save(paths[-1])
    assert cli.main(["predict", str(zoo_dir), "--max-flops", budget, "--by-average", "--device", "cpu",
                     *map(str, paths)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"[predict] model {c['name']} (cascade ")
    want_cls, want_probs, _ = reference_cascade(*cascade["logits"], c["threshold"])
    for line, i, path, member in zip(lines[1:], idx, paths, (FIRST, SECOND)):
        k = int(want_cls[i])
        got = re.fullmatch(rf"{re.escape(str(path))}: (.+) \(class (\d+), p=([0-9.]+), answered by (.+)\)", line)
        assert got, line
        assert got.group(1) == zoo[FIRST]["output"]["classes"][k] and int(got.group(2)) == k
        assert abs(float(got.group(3)) - want_probs[i, k]) < 1.5e-3 and got.group(4) == member


# --- profile -------------------------------------------------------------------------------------------------------

def test_profile_cascade_on_real_and_random_inputs(cascade, copy_zoo, capsys):
    c = cascade["entry"]
    x = normalize(cascade["pixels"][:200], Zoo(copy_zoo)[FIRST]["input"])
    profile_zoo(copy_zoo, providers=["cpu"], threads=[1], batches=[1], warmup=0, runs=60, models=[c["name"]],
                inputs=x, inputs_label="200 fashion-mnist test images", progress=False)
    profile_zoo(copy_zoo, providers=["cpu"], threads=[1], batches=[1], warmup=0, runs=20, models=[c["name"]],
                progress=False)
    zoo = Zoo(copy_zoo)
    recs = zoo[c["name"]]["latency"]
    assert len(recs) == 2  # same (device, provider, threads, batch): real and random figures kept side by side
    real = next(r for r in recs if r["inputs"] != "random")
    rand = next(r for r in recs if r["inputs"] == "random")
    assert real["inputs"] == "200 fashion-mnist test images" and "note" not in real
    assert rand["note"] == RANDOM_NOTE and "not that of real data" in rand["note"]
    for r in recs:
        assert r["device"] == device_label("CPUExecutionProvider") and r["batch"] == 1 and r["threads"] == 1
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and 0 <= r["deferral"] <= 1
    # batch 1 over the first 60 test images: the deferral seen while timing is the reference's on them
    _, _, deferred = reference_cascade(*cascade["logits"], c["threshold"])
    assert abs(real["deferral"] - deferred[:60].mean()) <= 1 / 60 + 1e-12
    # the runtime budgets on the real-image figure
    ms, rec = zoo.latency(zoo[c["name"]], "CPUExecutionProvider", batch=1)
    assert rec is real and ms == real["p90_ms"]
    # models still get their own records; a re-measure replaces the record with the same key and input kind
    profile_zoo(copy_zoo, providers=["cpu"], threads=[1], batches=[1], warmup=0, runs=7, models=[c["name"]],
                inputs=x, progress=False)
    recs = Zoo(copy_zoo)[c["name"]]["latency"]
    assert len(recs) == 2 and next(r for r in recs if r["inputs"] != "random")["runs"] == 7
    # the CLI: image files time the cascade on those images; without them it says the inputs were random
    assert cli.main(["profile", str(copy_zoo), "--provider", "cpu", "--runs", "3", "--warmup", "0",
                     "--model", c["name"]]) == 0
    out = capsys.readouterr().out
    assert "random inputs" in out and "deferred" in out


def test_cascade_latency_record_checks_inputs(cascade):
    zoo = Zoo(cascade["zoo"])
    a, b = (cascade["zoo"] / zoo[n]["file"] for n in (FIRST, SECOND))
    rec = cascade_latency_record(a, b, 1.0, "cpu", 1, 3, 1, 4)  # threshold 1: (nearly) every sample deferred
    assert rec["inputs"] == "random" and rec["batch"] == 3 and rec["deferral"] > 0.9
    with pytest.raises(ZooError, match=r"do not match the members' input \[batch, 1, 28, 28\]"):
        cascade_latency_record(a, b, 0.5, "cpu", 1, 1, 0, 2, inputs=np.zeros((4, 3, 28, 28), np.float32))


# --- verify --------------------------------------------------------------------------------------------------------

def test_verify_passes_and_catches_a_tampered_member(cascade, copy_zoo, capsys):
    assert verify_zoo(cascade["zoo"]) == []
    assert cli.main(["verify", str(cascade["zoo"])]) == 0
    assert "4 models and 1 cascade(s)" in capsys.readouterr().out
    zoo = Zoo(copy_zoo)
    target = copy_zoo / zoo[SECOND]["file"]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    problems = verify_zoo(copy_zoo)
    assert len(problems) == 2, problems
    assert zoo[SECOND]["file"] in problems[0] and "sha256" in problems[0]
    assert cascade["entry"]["name"] in problems[1] and f"member {SECOND!r} failed verification" in problems[1]
    assert cli.main(["verify", str(copy_zoo)]) == 1
    with pytest.raises(ZooError, match="sha256 .* does not match"):
        Zoo(copy_zoo)


def test_load_image_feeds_a_cascade(cascade, tmp_path):
    """``load_image(path, choice.input)`` works the same for a cascade as for a model."""
    from PIL import Image

    zoo = Zoo(cascade["zoo"])
    choice = zoo.open(cascade["entry"]["name"], device="cpu")
    Image.fromarray(cascade["pixels"][3, 0]).save(tmp_path / "x.png")
    x = load_image(tmp_path / "x.png", choice.input)
    assert np.abs(x - normalize(cascade["pixels"][3:4], choice.input)).max() < 1e-5
    want_cls, _, _ = reference_cascade(*(lg[3:4] for lg in cascade["logits"]), cascade["entry"]["threshold"])
    assert choice.predict(x)[0].tolist() == want_cls.tolist()
