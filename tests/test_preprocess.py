"""Run-time preprocessing (``klas_runtime.preprocess``, numpy + Pillow) against timm's own evaluation transform
(``timm.data.create_transform(**data_config, is_training=False)``, torchvision on PIL images) on real image files of
awkward sizes and modes; the manifest's input geometry (schema version 4), its validation, old manifests, and what
the export writes."""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from klas_runtime.errors import ZooError
from klas_runtime.manifest import METADATA_KEY, SCHEMA_VERSION, validate
from klas_runtime.preprocess import resize_size
from klas_runtime.runtime import Zoo, load_image, verify_zoo

GRAY = dict(mean=[0.2860], std=[0.3530])
RGB = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    """PNG and JPEG files: grayscale, RGB, RGBA, grey+alpha, palette; smaller and larger than the inputs below,
    non-square both ways, one exactly the input size."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(16)

    def noise(h, w, c):
        # smooth-ish content (JPEG keeps it) plus noise, full 0..255 range
        yy, xx = np.mgrid[0:h, 0:w]
        base = (127 + 120 * np.sin(xx / 3.1 + yy / 5.3))[..., None] + rng.normal(0, 30, (h, w, c))
        a = np.clip(base, 0, 255).astype(np.uint8)
        a.flat[0], a.flat[-1] = 0, 255
        return a

    made = []
    for name, (w, h), mode in (("g_small.png", (17, 23), "L"), ("rgb_wide.png", (61, 45), "RGB"),
                               ("rgba_very_wide.png", (300, 97), "RGBA"), ("rgb_tall.jpg", (33, 200), "RGB"),
                               ("g_big.jpg", (45, 61), "L"), ("pal.png", (40, 40), "P"), ("la.png", (29, 31), "LA"),
                               ("rgb_exact.png", (32, 32), "RGB"), ("rgb_exact_nonsq.png", (40, 24), "RGB")):
        c = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "P": 3}[mode]
        a = noise(h, w, c)
        if mode == "L":
            img = Image.fromarray(a[..., 0], "L")
        elif mode == "P":
            img = Image.fromarray(a, "RGB").quantize(64)
        else:
            img = Image.fromarray(a, mode)
        img.save(root / name, quality=90) if name.endswith(".jpg") else img.save(root / name)
        made.append(root / name)
    with Image.open(made[2]) as im:
        assert im.mode == "RGBA"
    with Image.open(made[5]) as im:
        assert im.mode == "P"
    return made


def _spec(c: int, size: tuple[int, int], interpolation: str, crop_pct: float, crop_mode: str = "center") -> dict:
    norm = GRAY if c == 1 else RGB
    return dict(name="input", shape=["batch", c, *size], dtype="float32", layout="NCHW",
                color="grayscale" if c == 1 else "rgb", scale=1 / 255, **copy.deepcopy(norm),
                resize=resize_size(*size, crop_pct), interpolation=interpolation, crop_pct=crop_pct,
                crop_mode=crop_mode)


def _timm_reference(path: Path, spec: dict) -> np.ndarray:
    """timm's evaluation transform of the data config the spec came from, on the image converted to the model's
    channels (what ``klas.data`` feeds the family)."""
    from timm.data import create_transform

    _, c, h, w = spec["shape"]
    tf = create_transform(input_size=(c, h, w), interpolation=spec["interpolation"], mean=tuple(spec["mean"]),
                          std=tuple(spec["std"]), crop_pct=spec["crop_pct"], crop_mode=spec["crop_mode"],
                          is_training=False)
    with Image.open(path) as im:
        return tf(im.convert("L" if c == 1 else "RGB")).numpy()


@pytest.mark.parametrize("interpolation,crop_pct,channels",
                         list(itertools.product(("bilinear", "bicubic"), (0.875, 0.9, 1.0), (1, 3))))
def test_runtime_matches_timm_eval_transform(image_files, interpolation, crop_pct, channels):
    spec = _spec(channels, (32, 32), interpolation, crop_pct)
    for path in image_files:
        got = load_image(path, spec)
        want = _timm_reference(path, spec)
        assert got.shape == (1, *want.shape) == (1, channels, 32, 32) and got.dtype == np.float32
        assert np.abs(got[0] - want).max() <= 1e-5, (path.name, np.abs(got[0] - want).max())


@pytest.mark.parametrize("interpolation,crop_pct,crop_mode,size", [
    ("nearest", 0.875, "center", (32, 32)), ("bicubic", 0.875, "center", (24, 40)),  # non-square: ResizeKeepRatio
    ("bilinear", 0.95, "center", (40, 24)), ("bilinear", 1.15, "center", (32, 32)),  # crop_pct > 1: zero padding
    ("bicubic", 0.9, "squash", (24, 40)), ("bilinear", 1.0, "squash", (32, 32)),
    ("bicubic", 0.875, "border", (32, 32)), ("bilinear", 1.0, "border", (24, 40)),  # pad with the mean colour
    ("lanczos", 0.875, "center", (32, 32)), ("box", 0.9, "center", (32, 32)), ("hamming", 1.0, "center", (32, 32))])
def test_runtime_matches_timm_other_geometries(image_files, interpolation, crop_pct, crop_mode, size):
    for channels in (1, 3):
        spec = _spec(channels, size, interpolation, crop_pct, crop_mode)
        for path in image_files:
            got, want = load_image(path, spec)[0], _timm_reference(path, spec)
            assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5, (path.name, channels)


def test_runtime_matches_the_klas_data_pipeline(image_files, tmp_path):
    """The runtime, fed the spec the export writes for a family, equals what the pipeline (``klas.data.open_split``,
    which the probes, finetuning, evaluation and the export's parity check read) makes of the same files."""
    import shutil

    import torch

    from klas.config import DataConfig
    from klas.data import batches, open_split
    from klas.families import AnchorCfg, FamilyCfg
    from _stitch_helpers import input_spec

    root = tmp_path / "folder"
    for split in ("train", "val"):
        for k, p in enumerate(image_files):
            (root / split / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
            shutil.copy(p, root / split / f"c{k % 2}" / p.name)
    for c, inp in ((3, dict(interpolation="bicubic", crop_pct=0.875)), (1, dict(channels=1, crop_pct=0.9))):
        cfg = FamilyCfg(name=f"pp-test-{c}", anchors=(AnchorCfg("a", "resnet18"), AnchorCfg("b", "resnet34")),
                        input_shape=(c, 32, 32), dataset="imagefolder", num_classes=2, input=inp)
        dc = cfg.data_config
        data = open_split(cfg, "test", DataConfig(workers=0, in_memory="no"), root=root)
        spec = input_spec(data, (c, 32, 32), dc)
        assert spec["crop_pct"] == dc["crop_pct"] and spec["interpolation"] == dc["interpolation"]
        x = torch.cat([xb for xb, _ in batches(data, 4)]).numpy()
        names = [n.decode() for n in data.source.names[data.index.numpy()]]
        for row, name in zip(x, names):
            got = load_image(root / "val" / name, spec)[0]
            assert np.abs(got - row).max() <= 1e-5, name


def test_spec_without_geometry_resizes_straight_to_the_input(image_files):
    """Manifests of schema version <= 3 carry no geometry: resize straight to the input size, bilinear, no crop
    (what the runtime always did), against an independent float64 reference."""
    for c, size in ((1, (28, 28)), (3, (24, 40))):
        spec = _spec(c, size, "bilinear", 1.0)
        for k in ("resize", "interpolation", "crop_pct", "crop_mode"):
            del spec[k]
        for path in image_files:
            with Image.open(path) as im:
                im = im.convert("L" if c == 1 else "RGB")
                if im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                px = np.asarray(im, dtype=np.float64).reshape(size[0], size[1], c).transpose(2, 0, 1)
            want = (px / 255 - np.array(spec["mean"]).reshape(-1, 1, 1)) / np.array(spec["std"]).reshape(-1, 1, 1)
            assert np.abs(load_image(path, spec)[0] - want).max() <= 1e-5, path.name


# --- the manifest ----------------------------------------------------------------------------------------------
MACHINE = dict(host="h", platform="p", cpu="c", cores=1, onnxruntime="1")


def _entry(input_spec: dict, file: str = "m.onnx", sha: str = "0" * 64, nbytes: int = 0) -> dict:
    return dict(name="m", file=file, sha256=sha, bytes=nbytes,
                config=dict(source="m", i=-1, target="m", j=-1, anchor=True, source_blocks=[0, 1],
                            target_blocks=[1, 1]),
                params=10, flops=100, test_acc=50.0, test_acc_source="t", input=input_spec,
                output=dict(name="logits", num_classes=3, classes=["a", "b", "c"]), opset=18,
                parity=dict(images=1, max_abs_diff=0.0, top1_agreement=1.0, atol=1e-3, min_agreement=0.999,
                            reference="r"), latency=[])


def _manifest(input_spec: dict, version: int = SCHEMA_VERSION, **entry_kw) -> dict:
    return dict(schema="klas-zoo", schema_version=version, family="f", dataset="d", klas_version="0",
                created="now", created_on=MACHINE, models=[_entry(input_spec, **entry_kw)])


def test_manifest_validates_the_geometry_fields():
    good = _spec(3, (224, 224), "bicubic", 0.875)
    assert good["resize"] == [256, 256]
    validate(_manifest(good))
    cases = [(dict(crop_pct=0.0), r"input\.crop_pct: invalid value 0\.0 \(expected a number in \[0\.1, 2\]"),
             (dict(crop_pct=5), r"input\.crop_pct: invalid value 5"),
             (dict(crop_pct="0.9"), r"input\.crop_pct: invalid value"),
             (dict(crop_pct=True), r"input\.crop_pct: invalid value"),
             (dict(interpolation="cubic"), r"input\.interpolation: invalid value \"cubic\" \(expected one of "
                                           r"bilinear, bicubic, nearest"),
             (dict(crop_mode="corner"), r"input\.crop_mode: invalid value \"corner\" \(expected one of center"),
             (dict(resize=[256]), r"input\.resize: invalid value \[256\] \(expected \[h, w\]"),
             (dict(resize=[256, 0]), r"input\.resize: invalid value"),
             (dict(resize=[255, 256]), r"input\.resize: \[255, 256\] is not floor\(\[224, 224\] / crop_pct 0\.875\) "
                                       r"= \[256, 256\]"),
             (dict(color="grayscale"), r"input\.color: 'grayscale' does not fit 3 input channel")]
    for change, msg in cases:
        bad = {**good, **change}
        with pytest.raises(ZooError, match=msg) as e:
            validate(_manifest(bad))
        assert "\n" not in str(e.value) and "models[0]" in str(e.value)
    partial = {k: v for k, v in good.items() if k != "crop_mode"}
    with pytest.raises(ZooError, match=r"input: missing field 'crop_mode' \(resize, interpolation, crop_pct and "
                                       r"crop_mode go together\)"):
        validate(_manifest(partial))
    # a version-3 reader refuses a version-4 manifest as a whole (this reader: anything newer than 4)
    with pytest.raises(ZooError, match=r"schema version 5 is newer than this klas understands \(4\)"):
        validate(_manifest(good, version=5))


def _tiny_onnx(c: int, h: int, w: int, classes: int, metadata: dict) -> tuple[bytes, np.ndarray]:
    """A linear classifier over the flattened input, as an ONNX model carrying klas's embedded entry."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((c * h * w, classes)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
    onnx.checker.check_model(model)
    return model.SerializeToString(), weight


@pytest.mark.parametrize("version", [2, 3])
def test_old_manifest_without_geometry_loads_and_predicts(image_files, tmp_path, version):
    """A zoo written before the geometry fields (schema version 2 or 3) loads, verifies and predicts on image files,
    with the old preprocessing (straight to the input size)."""
    spec = {k: v for k, v in _spec(1, (12, 12), "bilinear", 1.0).items()
            if k not in ("resize", "interpolation", "crop_pct", "crop_mode")}
    entry = _entry(spec)
    own = {k: v for k, v in entry.items() if k not in ("file", "sha256", "bytes", "latency")}
    own.update(schema="klas-zoo", schema_version=version, family="f", dataset="d", klas_version="0")
    raw, weight = _tiny_onnx(1, 12, 12, 3, own)
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "m.onnx").write_bytes(raw)
    m = _manifest(spec, version=version, sha=hashlib.sha256(raw).hexdigest(), nbytes=len(raw))
    (zoo / "manifest.json").write_text(json.dumps(m))
    assert verify_zoo(zoo) == []
    choice = Zoo(zoo).open("m")
    for path in image_files[:4]:
        with Image.open(path) as im:
            px = np.asarray(im.convert("L").resize((12, 12), Image.BILINEAR), dtype=np.float64)
        x = (px / 255 - spec["mean"][0]) / spec["std"][0]
        want = x.reshape(1, -1) @ weight.astype(np.float64)
        got = choice.run(load_image(path, choice.input))
        assert np.abs(got - want).max() < 1e-4, path.name


# --- what the export writes ----------------------------------------------------------------------------------------
def test_export_input_spec_carries_the_family_data_config():
    from klas.data import load_dataset
    from klas.errors import KlasError
    from klas.families import get_family_cfg
    from _stitch_helpers import input_spec

    data = load_dataset("fashion-mnist", "test").subset(4)
    # the embedded family: 28 x 28, no resize, no crop (its numbers do not change)
    spec = input_spec(data, (1, 28, 28), get_family_cfg("fmnist-deit").data_config)
    assert (spec["resize"], spec["interpolation"], spec["crop_pct"], spec["crop_mode"]) == \
        ([28, 28], "bilinear", 1.0, "center")
    # no data config (an older family object): straight to the input size, as before
    spec = input_spec(data, (1, 28, 28), None)
    assert (spec["resize"], spec["interpolation"], spec["crop_pct"], spec["crop_mode"]) == \
        ([28, 28], "bilinear", 1.0, "squash")
    # a hub-style config: bicubic, crop 0.875 at 224 -> resize 256
    dc = dict(input_size=(3, 224, 224), interpolation="bicubic", mean=RGB["mean"], std=RGB["std"], crop_pct=0.875,
              crop_mode="center")
    spec = input_spec(data, (3, 224, 224), dc)
    assert (spec["resize"], spec["interpolation"], spec["crop_pct"]) == ([256, 256], "bicubic", 0.875)
    validate(_manifest({**spec, **RGB}))  # (mean/std: the data's, here Fashion-MNIST's one channel)
    with pytest.raises(KlasError, match=r"interpolation 'random' cannot be reproduced at run time"):
        input_spec(data, (3, 224, 224), {**dc, "interpolation": "random"})
    with pytest.raises(KlasError, match=r"crop_pct 3: expected a number in \[0\.1, 2\]"):
        input_spec(data, (3, 224, 224), {**dc, "crop_pct": 3.0})


def test_exported_zoo_carries_geometry_and_predicts_like_before(exported_zoo, tmp_path):
    """The embedded family's zoo (export stage): schema version 4 with the geometry of its data config, and a
    28 x 28 PNG is read exactly as before (no resize, no crop)."""
    from klas_runtime.manifest import load_manifest

    m = load_manifest(exported_zoo)
    assert m["schema_version"] == SCHEMA_VERSION == 4
    for e in m["models"]:
        if e.get("kind", "model") == "model":
            inp = e["input"]
            assert (inp["resize"], inp["interpolation"], inp["crop_pct"], inp["crop_mode"]) == \
                ([28, 28], "bilinear", 1.0, "center")
    spec = m["models"][0]["input"]
    px = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(px).save(tmp_path / "x.png")
    want = (px.astype(np.float64) / 255 - spec["mean"][0]) / spec["std"][0]
    assert np.abs(load_image(tmp_path / "x.png", spec)[0, 0] - want).max() < 1e-6
