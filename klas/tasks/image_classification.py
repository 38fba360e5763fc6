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

    def open_split(self, family, split, data=None, *, root=None, dataset=None, augment=False):
        from klas.data import open_split  # the family's own preprocessing, in memory or streamed

        return open_split(family, split, data, root=root, dataset=dataset, augment=augment)

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

    def predict(self, logits):
        # (predicted class, max softmax probability): what a max-softmax cascade decides on
        c, k = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        return k, c

    def quality(self, prediction, targets):
        return prediction == targets


IMAGE_CLASSIFICATION = register_task(ImageClassification())
