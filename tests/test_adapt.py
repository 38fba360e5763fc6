"""Anchors that do not match the dataset: the pipeline refuses them before any stage, in one line naming
``klas anchors adapt``; the command gives each anchor a new head, finetunes all with one recipe, resumes bit-exactly
after a SIGKILL, and writes a family that ``klas run`` takes.

Tiny random-init timm ResNets with 1000-class heads (as an ImageNet-pretrained family has) against a generated
10-class ImageFolder of RGB PNGs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from klas.errors import KlasError

ROOT = Path(__file__).resolve().parents[1]
ARGS = {"ra": dict(layers=[1, 1, 1, 1], channels=[4, 8, 16, 32], stem_width=4),
        "rb": dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64], stem_width=8)}
RECIPE = dict(epochs=2, batch_size=8, ckpt_every=4, lr=2e-3, warmup_epochs=0.5, seed=3)
N_CLASSES = 10
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A 10-class ImageFolder (20 x 20 RGB PNGs, class = the colour of a bar), two tiny ResNets with random
    1000-class heads saved as safetensors, and the run config naming them."""
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("adapt")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in range(N_CLASSES):
            (d / "data" / split / f"class{c}").mkdir(parents=True)
            for k in range(n):
                a = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
                a[:, 2 * c:2 * c + 2] = (40 + 20 * c, 255 - 20 * c, 128)
                Image.fromarray(a).save(d / "data" / split / f"class{c}" / f"{k}.png")
    torch.manual_seed(0)
    anchors = ""
    for name, args in ARGS.items():
        m = timm.create_model("resnet18", pretrained=False, num_classes=1000, **args)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / f"{name}.safetensors"))
        margs = ", ".join(f"{k} = {v}" for k, v in args.items())
        anchors += f'\n[[family.anchors]]\nname = "{name}"\narch = "resnet18"\nmodel_args = {{ {margs} }}\n' \
                   f'weights = "{name}.safetensors"\n'
    cfg = d / "user.toml"
    cfg.write_text('[family]\nname = "adapt-test"\nnum_classes = 1000\n\n[family.input]\nchannels = 3\nsize = 16\n'
                   'interpolation = "bicubic"\ncrop_pct = 0.875\n' + anchors +
                   f'\n[data]\ndataset = "imagefolder"\nroot = "{d / "data"}"\nworkers = 0\n')
    return dict(dir=d, cfg=cfg)


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_pipeline_refuses_anchors_with_other_classes_before_any_stage(setup, tmp_path):
    from klas.config import load_config
    from klas.pipeline import run_pipeline

    cfg = load_config(setup["cfg"])
    for dry in (True, False):
        with pytest.raises(KlasError) as e:
            run_pipeline(cfg, tmp_path / "run", dry_run=dry)
        msg = str(e.value)
        assert "\n" not in msg
        assert "family adapt-test: its anchors' classifiers predict 1000 classes but the imagefolder data" in msg
        assert f"has {N_CLASSES}; give each anchor a {N_CLASSES}-class head first: `klas anchors adapt " \
               f"{setup['cfg']} --out DIR`, then `klas run DIR/run.toml`" in msg
        assert not (tmp_path / "run").exists()  # nothing written, no stage started
    # the CLI: exit status 2, one line on stderr
    r = subprocess.run([sys.executable, "-m", "klas", "run", str(setup["cfg"]), "--run-dir", str(tmp_path / "r2"),
                        "--dry-run"], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "klas anchors adapt" in r.stderr, r.stderr


KILL_SCRIPT = """
import os, signal, sys, torch
torch.set_num_threads(1)
from klas.config import load_config
from klas.families.adapt import AdaptRecipe, adapt_family

def die(anchor, step):
    if anchor == "rb" and step == 10:  # mid-epoch 2 of the 2nd anchor; its last checkpoint is at step 8
        os.kill(os.getpid(), signal.SIGKILL)

adapt_family(load_config(sys.argv[1]), sys.argv[2], AdaptRecipe(**{recipe}), on_step=die)
"""


def test_adapt_resumes_bit_exactly_after_sigkill_and_writes_a_runnable_family(setup, tmp_path):
    from klas.config import load_config
    from klas.families import create_family
    from klas.families.adapt import AdaptRecipe, adapt_family
    from klas.io import load_json

    torch.set_num_threads(1)
    straight = tmp_path / "straight"
    family_file = adapt_family(load_config(setup["cfg"]), straight, AdaptRecipe(**RECIPE), progress=False)

    # the same, SIGKILLed in the middle of the second anchor, then finished by the CLI
    killed = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(recipe=repr(RECIPE)))
    r = subprocess.run([sys.executable, str(script), str(setup["cfg"]), str(killed)], capture_output=True, text=True,
                       env=ENV, cwd=tmp_path)
    assert r.returncode == -9, r.stderr[-2000:]
    assert (killed / "ra.safetensors").is_file() and not (killed / "rb.safetensors").exists()
    assert torch.load(killed / "rb.ckpt", weights_only=True)["step"] == 8
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in RECIPE.items()]
    r = subprocess.run([sys.executable, "-m", "klas", "anchors", "adapt", str(setup["cfg"]), "--out", str(killed),
                        "--threads", "1", *flags], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[adapt] ra: already adapted" in r.stdout and "[adapt] rb: resuming after step 8" in r.stdout, r.stdout
    assert not list(killed.glob("*.ckpt"))
    for name in ARGS:
        a, b = _load(straight / f"{name}.safetensors"), _load(killed / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)

    # what was adapted: a 10-class head, a finetuned backbone, one recipe for both anchors
    rec = load_json(straight / "adapt.json")
    assert rec["classes"] == [f"class{c}" for c in range(N_CLASSES)] and rec["recipe"] == {**AdaptRecipe().__dict__,
                                                                                           **RECIPE}
    assert [e["name"] for e in rec["anchors"]] == ["ra", "rb"] and all(len(e["history"]) == 2 for e in rec["anchors"])
    for name in ARGS:
        before, after = _load(setup["dir"] / f"{name}.safetensors"), _load(straight / f"{name}.safetensors")
        assert before["fc.weight"].shape == (1000, ARGS[name]["channels"][-1])
        assert after["fc.weight"].shape == (N_CLASSES, ARGS[name]["channels"][-1])
        assert not torch.equal(before["conv1.weight"], after["conv1.weight"])  # the whole anchor was finetuned

    # the family file and the run config: klas builds the family strictly from the new files, and the pipeline's
    # class check passes
    from klas.pipeline import run_pipeline

    assert family_file == straight / "family.toml"
    cfg = load_config(straight / "run.toml")
    assert cfg.run.family == "adapt-test-adapted" and cfg.family_cfg.num_classes == N_CLASSES
    fam = create_family(cfg.run.family, pretrained=True)
    for view in fam:
        want = _load(straight / f"{view.name}.safetensors")
        got = view.model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want) and view.model.num_classes == N_CLASSES
    old = load_config(setup["cfg"]).family_cfg.data_config
    assert fam.data_config == create_family("adapt-test").data_config == old  # the same preprocessing
    assert old["interpolation"] == "bicubic" and old["crop_pct"] == 0.875
    run_pipeline(cfg, tmp_path / "run", dry_run=True)

    # a rerun is a no-op; another recipe in the same folder is refused in one line
    again = adapt_family(load_config(setup["cfg"]), straight, AdaptRecipe(**RECIPE), progress=False)
    assert again == family_file and _load(straight / "ra.safetensors")["fc.weight"].equal(
        _load(killed / "ra.safetensors")["fc.weight"])
    with pytest.raises(KlasError, match=r"adapt\.json: made for another family, dataset or recipe"):
        adapt_family(load_config(setup["cfg"]), straight, AdaptRecipe(**{**RECIPE, "lr": 1e-3}), progress=False)
