"""Image classification: images in, class logits out; top-1 accuracy; FLOPs and latency per image."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from klas.tasks import register_task
from klas.tasks.base import Task


class ImageClassification(Task):
    name = "image-classification"
    cost_unit = "image"
    metric = "top-1 accuracy"
    runtime_entry = "classify"
    datasets = ("imagefolder", "fashion-mnist", "cifar100")  # klas.data.DATASETS

    def open_split(self, family, split, data=None, *, root=None, dataset=None, augment=False):
        from klas.data import open_split  # the family's own preprocessing, in memory or streamed

        return open_split(family, split, data, root=root, dataset=dataset, augment=augment)

    def check_config(self, cfg) -> None:
        from klas.families.adapt import check_anchor_classes

        check_anchor_classes(cfg)  # anchors whose heads do not fit the dataset: one line naming `klas anchors adapt`

    def num_outputs(self, family) -> int:
        return getattr(family, "cfg", family).num_classes

    def loss(self, logits, targets, *, label_smoothing=0.0, reduction="mean"):
        return F.cross_entropy(logits.float() if reduction == "mean" else logits, targets,
                               label_smoothing=label_smoothing, reduction=reduction)

    def distillation(self, logits, teacher_logits, temperature):
        # KL(softmax(t / T) || softmax(s / T)) x T^2 (Hinton et al. 2015): the gradient scale does not depend on T
        t = temperature
        return F.kl_div(F.log_softmax(logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                        reduction="batchmean", log_target=True) * (t * t)

    def predict(self, logits, targets=None):
        # (predicted class, max softmax probability): what a max-softmax cascade decides on
        c, k = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        return k, c

    def quality(self, prediction, targets):
        return prediction == targets

    # --- export -------------------------------------------------------------------------------------------------
    def input_spec(self, split, family) -> dict:
        """Shape, channels, scale, the mean/std the export's parity check normalized with (``split``'s), and the
        geometry of timm's evaluation transform from the family's ``data_config`` (``interpolation``, ``crop_pct``,
        ``crop_mode``; ``resize`` = floor(size / crop_pct)), which ``klas_runtime.preprocess`` applies to image
        files. Without a data config: straight to the input size, bilinear, no crop (what the runtime always did)."""
        from klas.errors import KlasError
        from klas.export.graph import INPUT_NAME
        from klas_runtime.preprocess import CROP_MODES, CROP_PCT_RANGE, INTERPOLATIONS, LEGACY, resize_size

        c, h, w = family.input_shape
        data_config = getattr(family, "data_config", None)
        geo = dict(LEGACY)
        if data_config is not None:
            # timm's own defaults for what a data config leaves out: crop_pct 0.875, crop_mode center
            geo = dict(interpolation=data_config.get("interpolation") or "bilinear",
                       crop_pct=float(data_config.get("crop_pct") or 0.875),
                       crop_mode=data_config.get("crop_mode") or "center")
            where = f"family data config ({split.spec.name} export)"
            if geo["interpolation"] not in INTERPOLATIONS:
                raise KlasError(f"{where}: interpolation {geo['interpolation']!r} cannot be reproduced at run time; "
                                f"expected one of {', '.join(INTERPOLATIONS)}")
            if geo["crop_mode"] not in CROP_MODES:
                raise KlasError(f"{where}: crop_mode {geo['crop_mode']!r}: expected one of {', '.join(CROP_MODES)}")
            if not CROP_PCT_RANGE[0] <= geo["crop_pct"] <= CROP_PCT_RANGE[1]:
                raise KlasError(f"{where}: crop_pct {geo['crop_pct']:g}: expected a number in "
                                f"[{CROP_PCT_RANGE[0]:g}, {CROP_PCT_RANGE[1]:g}]")
        return dict(name=INPUT_NAME, shape=["batch", c, h, w], dtype="float32", layout="NCHW",
                    color="grayscale" if c == 1 else "rgb", scale=1 / 255, mean=list(split.spec.mean),
                    std=list(split.spec.std), resize=resize_size(h, w, geo["crop_pct"]), **geo)

    def output_spec(self, split, family) -> dict:
        """The class logits: their count and the split's class names."""
        from klas.export.graph import OUTPUT_NAME

        return dict(name=OUTPUT_NAME, num_classes=self.num_outputs(family), classes=list(split.spec.classes))


IMAGE_CLASSIFICATION = register_task(ImageClassification())
