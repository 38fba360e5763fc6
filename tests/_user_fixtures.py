"""What a new user brings, made at test time: an ImageFolder of PNG files, a few small timm models of one
architecture at different widths (trained briefly, saved as safetensors) and a ``user.toml`` that names them.
Nothing here calls klas: the tests then drive the real ``klas`` command line only."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# sorted, as ImageFolder numbers classes: label k is CLASSES[k]
CLASSES = ("bar-top", "bar-bottom", "bar-right", "bar-left")
CLASSES = tuple(sorted(CLASSES))


def draw(label: int, size: int, rng: np.random.Generator, rgb: bool) -> np.ndarray:
    """A noisy image whose class is where a bright bar lies (top, bottom, right, left), a little jittered."""
    h = w = size
    img = rng.normal(60, 25, (h, w)).clip(0, 255)
    t = max(2, size // 5)
    off = int(rng.integers(0, max(1, size // 8)))
    where = CLASSES[label]
    if where == "bar-top":
        img[off:off + t, 2:-2] += 150
    elif where == "bar-bottom":
        img[h - t - off:h - off, 2:-2] += 150
    elif where == "bar-right":
        img[2:-2, w - t - off:w - off] += 150
    else:
        img[2:-2, off:off + t] += 150
    img = img.clip(0, 255).astype(np.uint8)
    if not rgb:
        return img
    tint = np.array([(1.0, 0.6, 0.6), (0.6, 1.0, 0.6), (0.6, 0.6, 1.0), (1.0, 1.0, 0.5)][label])
    return (img[..., None] * tint[None, None, :]).clip(0, 255).astype(np.uint8)


def make_image_folder(root: Path, n_train: int, n_val: int, size: int, rgb: bool, seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` (grayscale or RGB PNGs of ``size``)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for k, c in enumerate(CLASSES):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(draw(k, size, rng, rgb), "RGB" if rgb else "L").save(d / f"{c}_{i:04d}.png")
    return root


def load_folder(root: Path, split: str, size: int, channels: int, mean, std):
    """The user's own (numpy) reading of their folder, for their training script: resize to ``size``, normalize."""
    from PIL import Image

    xs, ys = [], []
    for k, c in enumerate(CLASSES):
        for f in sorted((root / split / c).glob("*.png")):
            im = Image.open(f).convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float32) / 255.0
            a = a[None] if channels == 1 else a.transpose(2, 0, 1)
            xs.append((a - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None])
            ys.append(k)
    return np.stack(xs), np.asarray(ys)


def train_and_save(arch: str, model_args: dict, path: Path, x: np.ndarray, y: np.ndarray, steps: int = 20,
                   seed: int = 0) -> float:
    """A few Adam steps on the user's images (so the weights differ from random), saved as safetensors; returns the
    training accuracy reached."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, **model_args)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(xt), generator=g)[:64]
        loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # batch-norm statistics of the trained weights (a few steps leave them near their init)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        for s in range(0, len(xt), 64):
            model(xt[s:s + 64])
        model.eval()
        acc = float((model(xt).argmax(1) == yt).float().mean())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return acc


def toml_value(v) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(a) for a in v) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(a)}" for k, a in v.items()) + "}"


def write_user_toml(path: Path, name: str, anchors: list[dict], data_root: str, family_input: dict | None = None,
                    num_classes: int | None = None) -> Path:
    lines = ["[family]", f"name = {toml_value(name)}"]
    if num_classes is not None:
        lines.append(f"num_classes = {num_classes}")
    if family_input:
        lines += ["", "[family.input]"] + [f"{k} = {toml_value(v)}" for k, v in family_input.items()]
    for a in anchors:
        lines += ["", "[[family.anchors]]"] + [f"{k} = {toml_value(v)}" for k, v in a.items()]
    lines += ["", "[data]", 'dataset = "imagefolder"', f"root = {toml_value(data_root)}", ""]
    path.write_text("\n".join(lines))
    return path
