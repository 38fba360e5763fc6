"""Bad input from the environment and the run folder (issue 32's cases): one line naming what is wrong and what
was expected, a non-zero exit, no traceback -- and nothing read at import time that could break every command."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from klas.errors import KlasError
from klas_runtime.errors import ZooError


def _klas(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "klas", *map(str, argv)], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=300)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5"])
def test_bad_pixel_limit_is_one_line_where_an_image_is_decoded(tmp_path, monkeypatch, value):
    from PIL import Image

    from klas.data.safety import open_image
    from klas_runtime.preprocess import open_checked_image

    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(img)
    r = _klas("--help", env={"KLAS_MAX_IMAGE_PIXELS": value})  # read when used, not on import
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-500:]
    monkeypatch.setenv("KLAS_MAX_IMAGE_PIXELS", value)
    for read in (lambda: open_image(img), lambda: open_checked_image(img)):
        with pytest.raises(ZooError, match=rf"^KLAS_MAX_IMAGE_PIXELS='{value}': expected a positive whole number"):
            read()
    monkeypatch.setenv("KLAS_MAX_IMAGE_PIXELS", "63")  # a valid limit still applies
    with pytest.raises(ZooError, match="refusing to decode it"):
        open_image(img)
    monkeypatch.setenv("KLAS_MAX_IMAGE_PIXELS", "64")
    assert open_image(img).size == (8, 8)


def test_bad_kl_implementation_in_the_environment_is_one_line(monkeypatch):
    import torch

    from klas.ops import pairwise_softmax_kl

    monkeypatch.setenv("KLAS_KL_IMPL", "bogus")
    with pytest.raises(KlasError, match=r"^KLAS_KL_IMPL='bogus': expected one of reference") as e:
        pairwise_softmax_kl(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)  # still a ValueError to Python callers


@pytest.mark.parametrize("content", ["[1, 2]", '{"dataset": "fashion-mnist"}', '"fmnist-deit"'])
def test_run_json_of_the_wrong_shape_names_the_file(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(content)
    r = _klas("run", "--run-dir", run, "--dry-run")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-800:]
    line = r.stderr.strip().splitlines()[-1]
    assert f"{run / 'run.json'}: expected a JSON object naming the run's family" in line
    assert (run / "run.json").read_text() == content  # nothing rewritten


# --- images of any bit depth and mode: read as timm / Pillow read their 8-bit equivalent ---------------------------

def _spec(color: str, size: int = 20) -> dict:
    c = 1 if color == "grayscale" else 3
    return dict(name="input", shape=["batch", c, size, size], dtype="float32", layout="NCHW", color=color,
                scale=1 / 255, mean=[0.5] * c, std=[0.25] * c, resize=[size, size], interpolation="bilinear",
                crop_pct=1.0, crop_mode="center")


@pytest.mark.parametrize("h, w", [(17, 23), (31, 9)])
def test_16_bit_png_reads_as_its_8_bit_equivalent(tmp_path, h, w):
    """A 16-bit grayscale PNG of 8-bit values v * 257 (what an 8-bit image saved at 16 bits holds) gives exactly the
    input and the decoded image of the 8-bit file, in the runtime and in klas's data readers; Pillow's own convert
    clips it (most pixels white), which is what was read before."""
    from PIL import Image

    from klas.data.safety import open_image
    from klas_runtime.preprocess import load_image

    v = np.random.default_rng(h * w).integers(0, 256, (h, w), dtype=np.uint8)
    Image.fromarray(v).save(tmp_path / "g8.png")
    Image.fromarray(v.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert (np.asarray(Image.open(tmp_path / "g16.png").convert("L")) == 255).mean() > 0.9  # the clipping
    for color in ("grayscale", "rgb"):
        a, b = (load_image(tmp_path / f, _spec(color)) for f in ("g8.png", "g16.png"))
        assert a.shape == b.shape and np.array_equal(a, b), color
    for mode in ("RGB", "L", None):
        a, b = (np.asarray(open_image(tmp_path / f, mode=mode)) for f in ("g8.png", "g16.png"))
        assert np.array_equal(a, b), mode


def test_palette_and_cmyk_read_as_pillow_converts_them(tmp_path):
    """Palette and CMYK files: the model input equals that of the RGB image Pillow converts them to (timm's
    loader: ``convert('RGB')``), saved losslessly."""
    from PIL import Image

    from klas_runtime.preprocess import load_image

    rgb = np.random.default_rng(1).integers(0, 256, (19, 21, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.tiff")
    for f in ("p.png", "c.tiff"):
        src = Image.open(tmp_path / f)
        assert src.mode in ("P", "CMYK")
        src.convert("RGB").save(tmp_path / f"{f}.rgb.png")
        for color in ("rgb", "grayscale"):
            want = load_image(tmp_path / f"{f}.rgb.png", _spec(color))
            assert np.array_equal(load_image(tmp_path / f, _spec(color)), want) or color == "grayscale" and \
                np.abs(load_image(tmp_path / f, _spec(color)) - want).max() <= 1 / 255 / 0.25 + 1e-6, (f, color)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_images_are_one_line(tmp_path, mode):
    from PIL import Image

    from klas_runtime.preprocess import load_image

    arr = np.full((8, 8), 70000, np.int32) if mode == "I" else np.full((8, 8), 0.5, np.float32)
    Image.fromarray(arr, mode).save(tmp_path / "x.tiff")
    with pytest.raises(ZooError, match=r"x\.tiff: .* image \(32-bit .*expected 8- or 16-bit samples") as e:
        load_image(tmp_path / "x.tiff", _spec("grayscale"))
    assert "\n" not in str(e.value)


def test_fifo_and_devices_are_refused_before_opening(tmp_path):
    """A FIFO named like an image would block the reader forever; a device never ends: refused by file type."""
    from klas.data.safety import open_image
    from klas_runtime.manifest import read_regular
    from klas_runtime.preprocess import load_image

    os.mkfifo(tmp_path / "x.png")
    for path, kind in ((tmp_path / "x.png", "a FIFO"), (Path("/dev/zero"), "a device")):
        with pytest.raises(ZooError, match=f"{kind}, not a regular file"):
            load_image(path, _spec("rgb"))
        with pytest.raises(KlasError, match=f"{kind}, not a regular file"):
            open_image(path)
    with pytest.raises(OSError, match="not a regular file"):
        read_regular(tmp_path / "x.png")  # a model file replaced by a FIFO: not blocked in open()


def test_empty_class_folder_is_one_line_with_counts(tmp_path):
    from PIL import Image

    from klas.data.stream import FolderSource

    for c in ("ant", "bee", "cat"):
        (tmp_path / c).mkdir()
    for k in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "ant" / f"{k}.png")
        Image.new("RGB", (8, 8)).save(tmp_path / "cat" / f"{k}.png")
    with pytest.raises(KlasError, match=r"1 of 3 class folders hold no image files .*'bee'") as e:
        FolderSource(tmp_path)
    assert "\n" not in str(e.value)
    Image.new("RGB", (8, 8)).save(tmp_path / "bee" / "0.png")
    assert len(FolderSource(tmp_path)) == 7


# --- what a model file says of itself, read without onnxruntime, against the onnx package -------------------------

def test_onnx_facts_agree_with_the_onnx_package(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from klas_runtime.onnxbytes import onnx_facts

    rng = np.random.default_rng(0)
    c, n = int(rng.integers(1, 5)), int(rng.integers(2, 12))
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c, 7, 9])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n])
    w = helper.make_tensor("w", TensorProto.FLOAT, [c * 63, n], rng.standard_normal(c * 63 * n).astype(np.float32))
    graph = helper.make_graph([helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "w"],
                               ["logits"])], "g", [x], [y], [w])
    model = helper.make_model(graph)
    helper.set_model_props(model, {"klas": '{"name": "m"}', "other": "é"})
    data = model.SerializeToString()
    facts = onnx_facts(data, "m.onnx")
    ref = onnx.load_from_string(data)
    assert facts["metadata"] == {p.key: p.value for p in ref.metadata_props}

    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]
    assert facts["inputs"] == [(i.name, dims(i)) for i in ref.graph.input]
    assert facts["outputs"] == [(o.name, dims(o)) for o in ref.graph.output]


# --- the zoo lock: a second writer waits for the first, and takes the swapped-in folder's lock --------------------

def test_zoo_lock_waits_for_the_holder_and_follows_a_swap(tmp_path):
    import threading
    import time

    from klas.io import swap_dirs
    from klas_runtime.io import zoo_lock

    zoo, new = tmp_path / "zoo", tmp_path / "new"
    new.mkdir()
    order, said = [], []
    with zoo_lock(zoo):
        t = threading.Thread(target=lambda: _hold(zoo, order, said))
        t.start()
        time.sleep(0.3)
        order.append("first")
        swap_dirs(new, zoo)  # an export swapping in a new zoo while it holds the old one's lock
    t.join(10)
    assert order == ["first", "second"] and said and "waiting for" in said[0]
    assert (zoo / ".lock").read_text() == ""  # released: no holder left named


def _hold(zoo, order, said):
    from klas_runtime.io import zoo_lock

    with zoo_lock(zoo, say=lambda *a, **k: said.append(a[0])) as lock:
        assert os.stat(lock).st_ino == os.stat(zoo / ".lock").st_ino
        order.append("second")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_budget_flags_blame_the_flag(value):
    from klas_runtime.budget import check_budget, parse_count

    with pytest.raises(ZooError, match=r"^--max-latency-ms .*: expected a finite number >= 0"):
        check_budget(value, "--max-latency-ms")
    with pytest.raises(ZooError, match=r"^--max-flops '1e400': expected a finite number"):
        parse_count("1e400")
    assert check_budget(3, "--x") == 3.0 and parse_count("2.5e3K") == 2.5e6
