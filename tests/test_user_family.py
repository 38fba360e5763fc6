"""Issue 16's "Done when": a user's own family and data, end to end through the real command line.

(a) three small timm ResNets of one architecture at three widths, single-channel 28 x 28 input, trained briefly and
    saved as safetensors, an ImageFolder of grayscale PNGs and a ``user.toml`` with a ``[family]`` section ->
    ``klas run user.toml`` -> an exported zoo -> ``klas predict ZOO one.png``;
(b) the same with RGB PNGs of another size (40 x 40, resized and cropped to the family's 32 x 32) and an
    inverted-residual family (timm ``mobilenetv2`` at tiny widths).

No Python is written by the "user": the fixtures (``tests/_user_fixtures.py``) only make files. The checks compare
with independent references: each untouched anchor's test accuracy in the manifest against the user's own file
run through timm's own ``create_transform`` on every test PNG, and ``klas predict``'s answer against the same.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _user_fixtures import CLASSES, load_folder, make_image_folder, train_and_save, write_user_toml

KLAS = [sys.executable, "-m", "klas"]
TINY = ["run.threads=1", "probes.epochs=1", "probes.batch_size=64", "probes.stat_samples=64", "scores.metrics=false",
        "finetune.steps_per_epoch=4", "finetune.batch_size=32", "finetune.max_stitches=2", "finetune.val_images=40",
        "finetune.init.samples=64", "finetune.init.batch_size=64", "evaluation.latency=false", "export.profile=false",
        "export.parity_images=40", "export.precisions=none", "export.exporter=torchscript", "data.workers=1"]


def klas(*args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([*KLAS, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"klas {' '.join(map(str, args))} failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                             f"{out.stderr[-3000:]}")
    return out


def reference_predictions(arch: str, model_args: dict, weights: Path, folder: Path, data_config: dict,
                          channels: int) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """The user's file in timm, fed by timm's own eval transform, on every PNG of ``folder``: (pred, label, files)."""
    import timm
    from PIL import Image
    from safetensors.torch import load_file
    from timm.data import create_transform

    model = timm.create_model(arch, **model_args)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    tf = create_transform(**data_config, is_training=False)
    preds, labels, files = [], [], []
    for k, c in enumerate(CLASSES):
        for f in sorted((folder / c).glob("*.png")):
            x = tf(Image.open(f).convert("L" if channels == 1 else "RGB"))
            with torch.no_grad():
                preds.append(int(model(x[None]).argmax(1)))
            labels.append(k)
            files.append(f)
    return np.asarray(preds), np.asarray(labels), files


def run_user(tmp: Path, name: str, widths: list[tuple], img_size: int, rgb: bool, channels: int,
             family_input: dict, data_config: dict, train_size: int):
    data = make_image_folder(tmp / "data", n_train=40, n_val=12, size=img_size, rgb=rgb)
    x, y = load_folder(data, "train", train_size, channels, data_config["mean"], data_config["std"])
    anchors = []
    (tmp / "models").mkdir()
    for k, (aname, arch, args) in enumerate(widths):
        args = dict(args, in_chans=channels, num_classes=len(CLASSES))
        acc = train_and_save(arch, args, tmp / "models" / f"{aname}.safetensors", x, y, seed=k)
        assert acc > 0.3, f"{aname}: the user's brief training reached only {acc:.2f}"
        anchors.append(dict(name=aname, arch=arch, model_args=args, weights=f"models/{aname}.safetensors"))
    cfg = write_user_toml(tmp / "user.toml", name, anchors, "data", family_input)
    run_dir = tmp / "R"
    out = klas("run", cfg, "--run-dir", run_dir, *[a for s in TINY for a in ("--set", s)], cwd=tmp)
    assert "[6/6] export: done" in out.stdout, out.stdout[-2000:]
    zoo = run_dir / "zoo"
    manifest = json.loads((zoo / "manifest.json").read_text())
    assert manifest["family"] == name
    by_name = {m["name"]: m for m in manifest["models"]}
    # every anchor the user gave is in the zoo untouched, and its test accuracy is what timm's own transform and the
    # user's file give on the folder's val/ PNGs (the test split)
    refs = {}
    for a in anchors:
        m = by_name[a["name"]]
        assert m["origin"] == "untouched" and m["weights"]["check"].startswith("bit-identical")
        pred, lab, files = reference_predictions(a["arch"], a["model_args"], tmp / a["weights"], data / "val",
                                                 data_config, channels)
        refs[a["name"]] = (pred, files)
        assert len(lab) == len(CLASSES) * 12
        assert abs(m["test_acc"] - 100.0 * float((pred == lab).mean())) < 1e-6, (a["name"], m["test_acc"])
    # klas predict on one of the user's PNG files, with the largest anchor's budget: the zoo's own choice
    png = refs[anchors[0]["name"]][1][5]
    out = klas("predict", zoo, png, cwd=tmp)
    chosen = re.search(r"\[predict\] model (\S+)", out.stdout).group(1)
    line = next(s for s in out.stdout.splitlines() if s.startswith(str(png)))
    got = int(re.search(r"\(class (\d+)", line).group(1))
    if chosen in refs:
        want = int(refs[chosen][0][5])
    else:  # a stitched model or a cascade: its ONNX file(s), fed by timm's transform
        want = _onnx_reference(zoo, by_name[chosen], by_name, png, data_config, channels)
    assert got == want, (chosen, got, want, out.stdout)
    return manifest, run_dir


def _onnx_reference(zoo: Path, entry: dict, by_name: dict, png: Path, data_config: dict, channels: int) -> int:
    import onnxruntime as ort
    from PIL import Image
    from timm.data import create_transform

    x = create_transform(**data_config, is_training=False)(Image.open(png).convert("L" if channels == 1 else "RGB"))
    x = x[None].numpy()

    def logits(e):
        s = ort.InferenceSession(str(zoo / e["file"]), providers=["CPUExecutionProvider"])
        z = s.run(None, {s.get_inputs()[0].name: x})[0][0]
        return np.exp(z - z.max()) / np.exp(z - z.max()).sum()

    if entry.get("kind") == "cascade":
        p = logits(by_name[entry["members"][0]])
        if p.max() < entry["threshold"]:
            p = logits(by_name[entry["members"][1]])
        return int(p.argmax())
    return int(logits(entry).argmax())


GREY_CONFIG = dict(input_size=(1, 28, 28), interpolation="bilinear", mean=(0.5,), std=(0.25,), crop_pct=1.0,
                   crop_mode="center")


def test_user_resnet_family_grayscale_end_to_end(tmp_path):
    widths = [(f"tiny-r{c}", "resnet18", dict(layers=[1, 1, 1, 1], channels=[c, 2 * c, 4 * c, 8 * c], stem_width=c))
              for c in (4, 6, 8)]
    manifest, run_dir = run_user(tmp_path, "my-resnets", widths, img_size=28, rgb=False, channels=1,
                                 family_input=dict(channels=1, size=28, mean=[0.5], std=[0.25],
                                                   interpolation="bilinear", crop_pct=1.0),
                                 data_config=GREY_CONFIG, train_size=28)
    anchors = [m for m in manifest["models"] if m.get("origin") == "untouched"]
    assert len(anchors) == 3 and len({m["flops"] for m in anchors}) == 3
    assert all(m["input"]["shape"][1:] == [1, 28, 28] for m in manifest["models"] if "input" in m)
    # the run recorded the family, so a single-stage command rebuilds it from config.toml alone
    assert "[family]" in (run_dir / "config.toml").read_text()
    out = klas("run", run_dir / "config.toml", "--run-dir", run_dir, "--dry-run", cwd=tmp_path)
    assert sum("skip (up to date)" in s for s in out.stdout.splitlines()) == 6, out.stdout
    # replacing a weights file (same name) makes every stage stale
    w = tmp_path / "models" / "tiny-r4.safetensors"
    from safetensors.torch import load_file, save_file
    sd = load_file(str(w))
    sd["fc.bias"] = sd["fc.bias"] + 1.0
    save_file(sd, str(w))
    out = klas("run", tmp_path / "user.toml", "--run-dir", run_dir, "--dry-run", cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert len(lines) == 6 and all(" re-run (" in s for s in lines), out.stdout
    assert "settings or upstream artifacts changed" in lines[0]


RGB_CONFIG = dict(input_size=(3, 32, 32), interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225), crop_pct=0.875, crop_mode="center")


def test_user_mobilenet_family_rgb_resized_end_to_end(tmp_path):
    """RGB 40 x 40 PNGs, a MobileNetV2 family (width x0.35 / x0.5 / x0.75, half depth: 11 inverted-residual
    blocks) at 32 x 32: resized to 36 (bicubic), centre-cropped to 32, ImageNet mean/std from timm's cfg."""
    widths = [(f"mnv2-{m}", f"mobilenetv2_{m}", dict(depth_multiplier=0.5)) for m in ("035", "050", "075")]
    manifest, _ = run_user(tmp_path, "my-mobilenets", widths, img_size=40, rgb=True, channels=3,
                           family_input=dict(channels=3, size=32, interpolation="bicubic", crop_pct=0.875),
                           data_config=RGB_CONFIG, train_size=32)
    assert all(m["input"]["shape"][1:] == [3, 32, 32] for m in manifest["models"] if "input" in m)
