"""A second kind of model, defined entirely in this file: multi-label classification on generated images.

The task says how its data is made and batched, what its probes predict, its loss and distillation term, the
per-sample quality the admission test pairs, its metric and what the manifest records; the family is three tiny
timm ViTs with a 4-output head, trained briefly here and saved as safetensors (a user's own family). The whole
pipeline then runs through it -- probes, scores, selection, finetuning, evaluation, export -- with no edit to
``klas/stages``, and the exported zoo is verified by the torch-free runtime and against the torch models.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _stitch_helpers import TINY_STAGES, one_thread  # noqa: F401  (autouse fixture)
from klas.data import DataSpec, ImageSet
from klas.families import AnchorCfg, FamilyCfg, create_family, register_family
from klas.tasks import get_task, register_task
from klas.tasks.image_classification import ImageClassification

LABELS = 4  # label k: a bright square in quadrant k (any number of them per image)
SPLIT_SIZES = dict(train=768, val=400, test=300)
SPEC = DataSpec("quadrants", LABELS, 1, 28, (0.2,), (0.3,), tuple(f"quadrant-{k}" for k in range(LABELS)))


def quadrant_images(split: str) -> ImageSet:
    """Seeded per split: uint8 [N, 1, 28, 28] noise with squares in a random subset of the quadrants; targets
    float [N, 4] (1 where a quadrant holds a square)."""
    rng = np.random.default_rng(dict(train=1, val=2, test=3)[split])
    n = SPLIT_SIZES[split]
    y = (rng.random((n, LABELS)) < 0.5).astype(np.float32)
    x = rng.normal(40, 20, (n, 1, 28, 28))
    for k in range(LABELS):
        r, c = divmod(k, 2)
        x[:, :, 14 * r + 3:14 * r + 11, 14 * c + 3:14 * c + 11] += 120 * y[:, k, None, None, None]
    return ImageSet(SPEC, split, torch.from_numpy(x.clip(0, 255).astype(np.uint8)), torch.from_numpy(y))


class MultiLabel(ImageClassification):
    """Images in, like the image task (so its preprocessing spec and one-graph exporter are inherited); the rest is
    this task's own."""

    name = "test-multi-label"
    cost_unit = "image"
    metric = "label accuracy"
    datasets = ()  # its own generated data only

    def open_split(self, family, split, data=None, *, root=None, dataset=None, augment=False):
        return quadrant_images(split)

    def num_outputs(self, family):
        return LABELS

    def loss(self, logits, targets, *, label_smoothing=0.0, reduction="mean"):
        t = targets * (1 - label_smoothing) + 0.5 * label_smoothing
        return F.binary_cross_entropy_with_logits(logits.float(), t, reduction=reduction)

    def distillation(self, logits, teacher_logits, temperature):
        return F.binary_cross_entropy_with_logits(logits.float() / temperature,
                                                  torch.sigmoid(teacher_logits.float() / temperature))

    def predict(self, logits, targets=None):
        p = torch.sigmoid(logits.float())
        return (p > 0.5).float(), ((p - 0.5).abs() * 2).mean(-1)

    def quality(self, prediction, targets):
        return (prediction == targets).float().mean(-1)  # fraction of the labels right


def _train_anchor(model, steps: int, seed: int) -> None:
    data = quadrant_images("train")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data), (64,), generator=g)
        x = data.normalize(data.images[idx])
        loss = F.binary_cross_entropy_with_logits(model(x), data.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def family_files(tmp_path_factory):
    """Three 4-block ViTs of widths 8/16/32 with a 4-output head, trained for more steps the wider they are."""
    import timm
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("anchors")
    anchors = []
    for w, steps in ((8, 20), (16, 40), (32, 80)):
        args = dict(img_size=28, patch_size=7, in_chans=1, num_classes=LABELS, depth=4, mlp_ratio=2.0, embed_dim=w,
                    num_heads=max(1, w // 8))
        torch.manual_seed(w)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
        _train_anchor(model, steps, seed=w)
        path = folder / f"ml-{w}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        anchors.append(AnchorCfg(f"ml-{w}", "vit_tiny_patch16_224", args, weights=str(path)))
    return tuple(anchors)


def test_second_task_runs_the_whole_pipeline_to_a_verified_zoo(tmp_path, family_files):
    from klas.config import load_config
    from klas.pipeline import run_pipeline
    from klas_runtime.manifest import load_manifest
    from klas_runtime.session import open_session
    from klas_runtime.runtime import verify_zoo

    register_task(MultiLabel())
    assert get_task("test-multi-label").name == "test-multi-label"
    # a config family of the user's own files (source set, so weights are read as given)
    register_family(FamilyCfg(name="test-quadrants", anchors=family_files, input_shape=(1, 28, 28),
                              dataset="quadrants", num_classes=LABELS, task="test-multi-label",
                              input=dict(mean=SPEC.mean, std=SPEC.std, interpolation="bilinear", crop_pct=1.0,
                                         crop_mode="center"), source="test_task_plugin.py"))
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('[run]\nfamily = "test-quadrants"\n' + TINY_STAGES.replace("val_images = 0", "val_images = 100"))
    cfg = load_config(cfg_file)
    run = tmp_path / "run"
    arts = run_pipeline(cfg, run, progress=False)
    assert list(arts) == ["probes", "scores", "selection", "finetune", "evaluation", "export"]

    # the task's metric and quality, not top-1: every figure is a fraction of labels right, recomputed here
    ev = arts["evaluation"]
    test = quadrant_images("test").subset(100)
    task = MultiLabel()
    fam = create_family("test-quadrants", pretrained=True)
    for u in ev.untouched:
        with torch.no_grad():
            logits = fam[u["key"]].model(test.normalize(test.images))
        assert u["test_acc"] == pytest.approx(task.score(task.predict(logits)[0], test.labels))
        assert 0.0 <= u["test_acc"] <= 100.0
    assert arts["finetune"].task == "test-multi-label"
    assert all(0.0 <= r["val_acc"] <= 100.0 for r in arts["finetune"].configs if r["val_acc"] is not None)
    assert any(not r["anchor"] for r in arts["finetune"].configs)  # a stitched model was trained

    # the exported zoo: the runtime verifies it, the manifest names the task, the graphs match the torch anchors
    zoo = run / "zoo"
    assert verify_zoo(zoo) == []  # no problem found
    manifest = load_manifest(zoo)
    assert manifest.get("task") == "test-multi-label"
    names = {m["name"] for m in manifest["models"]}
    assert {"ml-8", "ml-16", "ml-32"} <= names  # the user's anchors, untouched
    x = test.normalize(test.images[:7]).numpy()
    for m in manifest["models"]:
        if m["name"] in ("ml-8", "ml-16", "ml-32"):
            sess = open_session(zoo / m["file"], "cpu", 1)
            got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
            with torch.no_grad():
                want = fam[m["name"]].model(torch.from_numpy(x)).double().numpy()
            assert got.shape == (7, LABELS)
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_family_config_names_its_task(tmp_path, family_files):
    """`[family] task` picks a registered task (checked with one line naming the registered ones); the task's own
    data needs no `dataset` of the image datasets."""
    from klas.errors import KlasError
    from klas.families.user import parse_family

    register_task(MultiLabel())
    anchors = [dict(name=a.name, arch=a.arch, model_args=dict(a.model_args), weights=a.weights) for a in family_files]
    cfg = parse_family(dict(name="q", task="test-multi-label", anchors=anchors), "q.toml", tmp_path)
    assert cfg.task == "test-multi-label" and cfg.dataset == ""
    assert parse_family(dict(name="q2", anchors=anchors, dataset="fashion-mnist"), "q.toml", tmp_path).task == \
        "image-classification"
    with pytest.raises(KlasError, match=r"^q.toml: \[family\] task = 'nope': expected one of .*test-multi-label"):
        parse_family(dict(name="q3", task="nope", anchors=anchors), "q.toml", tmp_path)
    with pytest.raises(KlasError, match=r"^q.toml: \[family\] dataset = 'quadrants': expected one of imagefolder"):
        parse_family(dict(name="q4", dataset="quadrants", anchors=anchors), "q.toml", tmp_path)
