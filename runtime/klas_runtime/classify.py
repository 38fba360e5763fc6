"""The ``classify`` runtime entry: image classification -- normalized image batches in, logits out, softmax and
argmax, and max-softmax cascades.

A ``Choice`` is a picked model with its session; a ``CascadeChoice`` is a picked cascade (two models and a
threshold) used exactly like one (``predict``, ``run``, ``input``, ``classes``). ``klas_runtime.entries``
registers this module's pieces as the ``classify`` entry; numpy only (inputs come from
``klas_runtime.preprocess.load_image``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klas_runtime.choice import ModelChoice
from klas_runtime.errors import ZooError, first_line


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (what ``predict`` and the cascade's threshold test use)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def deferred(logits: np.ndarray, threshold: float) -> np.ndarray:
    """The samples a cascade sends on to its second member: those whose max softmax probability from the first
    member's ``logits`` is below ``threshold`` (bool [N]; the rule both prediction and latency timing follow)."""
    return softmax(logits).max(axis=1) < threshold


def check_input(x: np.ndarray, spec: dict, name: str = "model") -> np.ndarray:
    """Refuse an input whose shape differs from the model's [batch, C, H, W], in one line naming both shapes."""
    x = np.asarray(x)
    want = spec["shape"][1:]
    if x.ndim != 4 or list(x.shape[1:]) != want or x.shape[0] < 1:
        raise ZooError(f"{name}: input shape {tuple(x.shape)} does not match the model input "
                        f"[batch, {', '.join(map(str, want))}] ({spec['color']} {want[1]}x{want[2]}, {spec['layout']})")
    if not np.issubdtype(x.dtype, np.floating):
        raise ZooError(f"{name}: input dtype {x.dtype} is not floating point; pass normalized float32 "
                        f"(see klas_runtime.runtime.load_image)")
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class Choice(ModelChoice):
    """The picked model: its manifest entry, a session for it and why it was chosen (``ModelChoice``).

    A picked cascade is a ``CascadeChoice`` with the same attributes and methods, so callers need not tell them
    apart: ``predict``/``run`` take the same input, ``input``/``classes`` say what that input and output are,
    ``files`` the ONNX files it runs and ``members`` which model answers (``predict_detailed``). The input spec is
    what ``load_image(path, choice.input)`` reads for."""

    @property
    def classes(self) -> list[str]:
        return self.entry["output"]["classes"]

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits [N, classes] for normalized input [N, C, H, W] (float32)."""
        x = check_input(x, self.entry["input"], self.name)
        return self.session.run([self.entry["output"]["name"]], {self.entry["input"]["name"]: x})[0]

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(top-1 class index [N], softmax probabilities [N, classes])."""
        labels, probs, _ = self.predict_detailed(x)
        return labels, probs

    def predict_detailed(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``predict`` plus, per sample, the index into ``members`` of the model that answered (here always 0)."""
        probs = softmax(self.run(x))
        return probs.argmax(axis=1), probs, np.zeros(len(probs), dtype=np.int64)


@dataclass
class CascadeChoice(Choice):
    """A picked cascade: the first (cheaper) member answers every sample whose max softmax probability is at least
    ``threshold``; the second runs only on the others. ``session`` is the pair of member sessions (None without
    sessions); ``parts`` the members' own ``Choice`` objects."""

    parts: tuple = ()

    @property
    def kind(self) -> str:
        return "cascade"

    @property
    def threshold(self) -> float:
        return float(self.entry["threshold"])

    @property
    def input(self) -> dict:
        return self.parts[0].entry["input"]  # the same for both members (validated)

    @property
    def classes(self) -> list[str]:
        return self.parts[0].entry["output"]["classes"]

    @property
    def files(self) -> list[str]:
        return [p.entry["file"] for p in self.parts]

    @property
    def members(self) -> list[str]:
        return list(self.entry["members"])

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits [N, classes] of whichever member answered each sample."""
        return self._route(x)[0]

    def predict_detailed(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits, answered = self._route(x)
        probs = softmax(logits)
        return probs.argmax(axis=1), probs, answered

    def _route(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        first, second = self.parts
        if first.session is None:
            raise ZooError(f"{self.name}: picked without sessions (with_session=False); nothing to run")
        x = check_input(x, first.entry["input"], self.name)
        logits = first.run(x)
        sent = deferred(logits, self.threshold)
        if sent.any():
            logits = logits.copy()
            logits[sent] = second.run(x[sent])
        return logits, sent.astype(np.int64)


def describe(choice: Choice, x: np.ndarray) -> str:
    """One line for the prediction on a batch of one: the label, its class index and probability, and for a
    cascade the member that answered (what ``klas-runtime predict`` prints after the file name)."""
    cls, probs, answered = choice.predict_detailed(x)
    k, classes = int(cls[0]), choice.classes
    label = classes[k] if k < len(classes) else str(k)
    by = f", answered by {choice.members[int(answered[0])]}" if choice.kind == "cascade" else ""
    return f"{label} (class {k}, p={probs[0, k]:.3f}{by})"


def check_cascade(choice: CascadeChoice) -> str | None:
    """What ``verify_zoo`` asks of a cascade whose members passed: that both members and the composite run on a
    small random batch, giving [N, classes]. A problem line (without the cascade's name), or None."""
    spec, classes = choice.input, choice.parts[0].entry["output"]["num_classes"]
    x = np.random.default_rng(0).standard_normal([2] + spec["shape"][1:]).astype(np.float32)
    try:
        for p in choice.parts:  # both members, whatever the threshold routes to
            shape = p.run(x).shape
            if shape != (2, classes):
                return f"member {p.name!r} gives logits of shape {shape}, not (2, {classes})"
        probs = choice.predict(x)[1]
        if probs.shape != (2, classes):
            return f"the composite gives probabilities of shape {probs.shape}, not (2, {classes})"
    except ZooError as e:
        return str(e)
    except Exception as e:  # onnxruntime's own errors
        return f"does not run ({first_line(e)})"
    return None


def check_signature(session, entry: dict, where: str) -> None:
    """What ``verify_zoo`` asks of an image model's session: one input of the manifest's name and [C, H, W], and
    the manifest's output among its outputs (one ZooError line otherwise)."""
    from klas_runtime.manifest import MANIFEST

    inputs, outputs = session.get_inputs(), session.get_outputs()
    spec, out = entry["input"], entry["output"]
    if len(inputs) != 1 or inputs[0].name != spec["name"] or list(inputs[0].shape[1:]) != spec["shape"][1:]:
        got = ", ".join(f"{i.name}{list(i.shape)}" for i in inputs)
        raise ZooError(f"{where}: model inputs {got} do not match {MANIFEST} "
                       f"({spec['name']}{spec['shape']})")
    if out["name"] not in [o.name for o in outputs]:
        raise ZooError(f"{where}: no output {out['name']!r} (the file has {', '.join(o.name for o in outputs)})")
