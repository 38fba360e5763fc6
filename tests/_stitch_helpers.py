"""Shared by the stitch / supernet / evaluation tests: a tiny registered ViT family and selection.json fixtures."""
import json

import pytest
import torch

from klas.families import AnchorCfg, FamilyCfg, create_family, get_family_cfg, register_family

TINY = "klas-test-vit"
TINY_STAGES = """
[probes]
epochs = 1
train_subset = 256
val_subset = 200
stat_samples = 128
[scores]
val_subset = 200
dm_samples = 100
[selection]
num_buckets = 2
[finetune]
steps_per_epoch = 2
batch_size = 32
train_subset = 256
val_images = 0
[finetune.init]
samples = 64
[evaluation]
val_subset = 300
test_subset = 100
latency = false
[export]
exporter = "torchscript"  # the dynamo exporter is tested in test_export.py; TorchScript exports far faster
precisions = "none"
parity_images = 50
profile = false
"""
"""Every stage's sections of a smoke run's TOML (seconds per stage): the CLI end-to-end tests add [run] / [family]."""
WIDTHS = (8, 16, 32)


def tiny_vit_args(w: int) -> dict:
    """timm ``vit_tiny_patch16_224`` arguments of the tiny test ViT of width ``w``: 4 blocks, 7x7 patches, 17 tokens."""
    return dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, depth=4, mlp_ratio=2.0, embed_dim=w,
                num_heads=max(1, w // 8))

VIT_FAMILY_TOML = """
[run]
family = "{name}"
threads = 1
[family]
name = "{name}"
dataset = "fashion-mnist"
num_classes = 10
[family.input]
channels = 1
size = 28
mean = [0.2860]
std = [0.3530]
{anchors}
""" + TINY_STAGES
VIT_ANCHOR_TOML = """
[[family.anchors]]
name = "tv-{w}"
arch = "vit_tiny_patch16_224"
model_args = {{ {args} }}
weights = "tv-{w}.safetensors"
"""


def tiny_vit_config(folder, widths=(8, 16), name="battery-vit"):
    """``folder/tiny.toml``: a config defining a family of 4-block ViTs of ``widths`` with seeded random weights
    saved beside it (safetensors) and TINY_STAGES: what a user's own family looks like, seconds per stage, and the
    same anchors in every process (unlike ``tiny_family``'s fresh random ones)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    anchors = ""
    for w in widths:
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **tiny_vit_args(w))
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder / f"tv-{w}.safetensors"))
        args = ", ".join(f"{k} = {v}" for k, v in tiny_vit_args(w).items())
        anchors += VIT_ANCHOR_TOML.format(w=w, args=args)
    cfg = folder / "tiny.toml"
    cfg.write_text(VIT_FAMILY_TOML.format(anchors=anchors, name=name))
    return cfg


def tiny_family():
    """Three 4-block ViTs (widths 8/16/32, 17 tokens) on Fashion-MNIST with random weights: fast to build and train."""
    try:
        get_family_cfg(TINY)
    except Exception:
        register_family(FamilyCfg(
            name=TINY, input_shape=(1, 28, 28), dataset="fashion-mnist", num_classes=10,
            anchors=tuple(AnchorCfg(f"tv-{w}", "vit_tiny_patch16_224", tiny_vit_args(w)) for w in WIDTHS)))
    return create_family(TINY)


def write_selection(path, stitches, anchors=("tv-8", "tv-32"), family=TINY, method="test"):
    """A selection.json in the selection stage's schema; ``stitches`` are (source, i, target, j)."""
    sel = dict(family=family, method=method, params={}, anchors=list(anchors), anchor_pairs=[], candidates=[],
               selected=[dict(source=s, i=i, target=t, j=j, flops=None, D=None, cap=None, score=None, bucket=None)
                         for s, i, t, j in stitches])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sel))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core box, two OpenMP threads competing with other processes can make these
    tiny models 10-50x slower (spin-waiting), while one thread is never worse for them."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


DDP_SCRIPT = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from _stitch_helpers import tiny_family
from klas.stitch import FitCfg
from klas.stages.s4_finetune import FinetuneConfig
from _stitch_helpers import finetune
torch.manual_seed(0)
cfg = FinetuneConfig(**{cfg}, init=FitCfg(samples=128, batch_size=64))
finetune(Path(sys.argv[1]), cfg, seed=0, selection_path=Path(sys.argv[2]), family=tiny_family(),
         progress=False)
"""


def ddp_and_single(tmp_path, sel, kw: dict) -> None:
    """Finetune ``sel`` with FinetuneConfig(**kw) twice: under torchrun with two gloo ranks into tmp_path/ddp and in
    this process into tmp_path/single (both seeded alike), for the DDP-equals-single-process tests."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from klas.stages.s4_finetune import FinetuneConfig
    from klas.stitch import FitCfg

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(cfg=repr(kw)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "ddp"), str(sel)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.manual_seed(0)
    finetune(tmp_path / "single", FinetuneConfig(**kw, init=FitCfg(samples=128, batch_size=64)), seed=0,
             selection_path=sel, family=tiny_family(), progress=False)


def small_finetune_cfg(**kw):
    """A few steps of the shared supernetwork on the tiny family (the recipe tests override ``recipe`` etc.)."""
    from klas.stages.s4_finetune import FinetuneConfig
    from klas.stitch import FitCfg

    # NOTE: workers=1: the recipe tests spy on the stage in this process (tests/test_workers.py forks)
    base = dict(recipe="shared", workers=1, distill=None, max_stitches=None, epochs=2, steps_per_epoch=3, batch_size=32,
                train_subset=512, val_images=0, augment=True, lr=3e-3, warmup_frac=0.2,
                init=FitCfg(samples=128, batch_size=64))
    return FinetuneConfig(**{**base, **kw})


# --- one stage at a time, outside the pipeline: each builds a StageContext and calls the stage's run(cfg, ctx) ------

def _data(data, data_root):
    from dataclasses import replace

    from klas.config import DataConfig

    data = data if data is not None else DataConfig()
    return replace(data, root=str(data_root)) if data_root is not None else data


def selection_artifact(path):
    """A selection.json written by ``write_selection`` (or the stage) as the typed artifact the finetune stage reads."""
    from dataclasses import MISSING, fields

    from klas.stages.s3_selection import SelectionArtifact

    from klas.io import load_json

    rec = load_json(path)
    defaults = dict(family=None, method="test", params={}, anchors=[], anchor_flops={}, anchor_pairs=[],
                    anchor_selection={}, buckets={}, candidates=[], selected=[])
    return SelectionArtifact(**{f.name: rec.get(f.name, defaults.get(f.name)) for f in fields(SelectionArtifact)
                                if f.default is MISSING})


def probes(family, run_dir, cfg, *, seed=0, data_root=None, key="", progress=False, data=None):
    from klas.contract import StageContext
    from klas.stages import s1_probes

    return s1_probes.run(cfg, StageContext.open(run_dir, family, seed=seed, data=_data(data, data_root), key=key,
                                                progress=progress))


def finetune(run_dir, cfg, *, seed=0, selection_path=None, family=None, progress=False, data_root=None, data=None,
             weights=None, restart=False, **hooks):
    """The finetune stage on ``run_dir`` (selection: ``selection_path`` or the run's own); ``restart`` False (the
    tests' default): refuse checkpoints made under other settings."""
    from klas.contract import StageContext
    from klas.stages import s4_finetune
    from klas.stages.s3_selection import SelectionArtifact

    sel = selection_artifact(selection_path) if selection_path is not None else None
    fam = family if family is not None else (sel.family if sel is not None else None)
    ctx = StageContext.open(run_dir, fam, seed=seed, weights=weights, data=_data(data, data_root), progress=progress,
                            restart=restart, **hooks)
    if sel is not None:
        ctx.artifacts[SelectionArtifact] = sel
    return s4_finetune.run(cfg, ctx)


def evaluate(run_dir, cfg, *, data_root=None, state="final", family=None, out=None, progress=False, data=None):
    from klas.contract import StageContext
    from klas.rundir import RunDir
    from klas.stages import s5_evaluation

    name = family if family is not None else RunDir(run_dir).family
    hooks = dict(state=state, built_family=family, **({"out": out} if out is not None else {}))
    return s5_evaluation.run(cfg, StageContext.open(run_dir, name, data=_data(data, data_root), progress=progress,
                                                    **hooks))


def scores(family, run_dir, cfg, *, seed=0, data_root=None, progress=False, data=None):
    from klas.contract import StageContext
    from klas.stages import s2_scores

    return s2_scores.run(cfg, StageContext.open(run_dir, family, seed=seed, data=_data(data, data_root),
                                                progress=progress))


def input_spec(data, shape, data_config=None) -> dict:
    """The image-classification task's manifest input spec for ``data`` at ``shape`` (C, H, W) under ``data_config``
    (a family stand-in with just those two attributes)."""
    from types import SimpleNamespace

    from klas.tasks import get_task

    return get_task("image-classification").input_spec(data, SimpleNamespace(input_shape=tuple(shape),
                                                                           data_config=data_config))
