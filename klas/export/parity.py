"""ONNX outputs and what they are compared with: onnxruntime logits (one function for every caller), the float64
parity check (one check, run on random inputs by the exporter's self-check and on real test samples by the
export), the agreement of two graphs, and a graph's own score through the task.

The float64 reference is a double-precision copy of the very module that was exported, fed the same inputs; a
graph passes when its float32 onnxruntime outputs are within a tolerance of it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn as nn

from klas.errors import KlasError
from klas.export.graph import INPUT_NAME
from klas_runtime.session import open_session

SELF_CHECK_BATCHES = (1, 3)  # NOTE: neither is the example's batch (2): a batch size baked into the graph shows
SELF_CHECK_TOL = 1e-3  # max |logit diff| / max(1, max |logit|) of the dynamo graph vs float64 PyTorch, random inputs
REFERENCE_BATCH = 256  # samples per float64 PyTorch batch on real data
SCORE_BATCH = 256  # samples per onnxruntime batch when a graph's own score is measured


# --- inputs and outputs ----------------------------------------------------------------------------------------------

class SplitInputs:
    """The first ``n`` samples of a split, normalized as the models take them, read lazily by slices
    (``inputs[a:b]`` -> float32 tensor): a split is never held normalized in memory as a whole."""

    def __init__(self, data, n: int | None = None, start: int = 0):
        self.data, self.start = data, start
        self.stop = len(data) if n is None else min(len(data), start + n)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, s: slice) -> torch.Tensor:
        lo, hi, _ = s.indices(len(self))
        return self.data.normalize(self.data.images[self.start + lo:self.start + hi])


def batches(inputs, size: int):
    """``inputs`` (an array, a tensor or ``SplitInputs``) as float32 numpy batches of ``size`` (the last shorter)."""
    for s in range(0, len(inputs), size):
        x = inputs[s:s + size]
        yield x.float().numpy() if isinstance(x, torch.Tensor) else x


def onnx_logits(model, inputs, batch: int, input_name: str = INPUT_NAME) -> np.ndarray:
    """onnxruntime CPU outputs of ``model`` (ONNX bytes or an open session) over ``inputs`` (see ``batches``) in
    batches of ``batch``, concatenated."""
    session = model if hasattr(model, "run") else open_session(model, "cpu")
    return np.concatenate([session.run(None, {input_name: x})[0] for x in batches(inputs, batch)], axis=0)


def compare(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, max |difference|) of two output arrays of the same shape (float64 arithmetic)."""
    return (float((got.argmax(1) == want.argmax(1)).mean()),
            float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()))


def graph_score(task, model, data, limit: int | None = None) -> tuple[float, int]:
    """The task's metric (percent) of the ONNX graph ``model`` itself on the first ``limit`` samples of ``data``:
    its onnxruntime outputs through ``task.predict``, scored by ``task.score`` against the split's targets."""
    data = data.subset(limit)
    out = onnx_logits(model, SplitInputs(data), SCORE_BATCH)
    return score_outputs(task, out, data.labels), len(data)


def score_outputs(task, out: np.ndarray, targets) -> float:
    """``task.score`` of the predictions ``task.predict`` makes of the raw outputs ``out``."""
    return task.score(task.predict(torch.from_numpy(out))[0], torch.as_tensor(targets))


# --- the float64 parity check ------------------------------------------------------------------------------------

@dataclass
class Parity:
    """onnxruntime outputs ``got`` (float32) against the float64 PyTorch outputs ``want`` on the same inputs."""

    got: np.ndarray
    want: np.ndarray

    @property
    def same_shape(self) -> bool:
        return self.got.shape == self.want.shape

    @cached_property
    def figures(self) -> tuple[float, float]:
        """(top-1 agreement, max |output difference|); (0, inf) when the shapes differ."""
        return compare(self.got, self.want) if self.same_shape else (0.0, float("inf"))

    @property
    def top1_agreement(self) -> float:
        return self.figures[0]

    @property
    def max_abs_diff(self) -> float:
        return self.figures[1]

    @property
    def relative_diff(self) -> float:
        """max |difference| / max(1, max |reference|): the tolerance of outputs of any scale."""
        return self.max_abs_diff / max(1.0, float(np.abs(self.want).max()))


def float64_parity(model, module: nn.Module, inputs, batch: int, reference_batch: int | None = None,
                   reference: nn.Module | None = None) -> Parity:
    """The ONNX graph ``model`` (bytes or an open session) under onnxruntime CPU in float32, in batches of
    ``batch``, against a float64 copy of ``module`` in batches of ``reference_batch`` (default: ``batch``), on the
    same ``inputs`` (a tensor [N, ...] of any float dtype, or ``SplitInputs``). ``reference``: that float64 copy,
    when the caller checks several batches against one."""
    got = onnx_logits(model, inputs, batch)
    ref64 = reference if reference is not None else copy.deepcopy(module).double().eval()
    step = reference_batch or batch
    with torch.no_grad():
        want = torch.cat([ref64(inputs[s:s + step].double()) for s in range(0, len(inputs), step)]).numpy()
    return Parity(got, want)


def self_check(model, module: nn.Module, example: torch.Tensor, opset: int) -> None:
    """Raise unless the exported graph is what was asked for: ``opset`` (below the exporter's own opset 18 it
    converts down and silently keeps 18 when it cannot), a symbolic batch axis, the full checker, and onnxruntime
    outputs within ``SELF_CHECK_TOL`` (relative) of float64 PyTorch on fresh random inputs at batch sizes 1 and 3."""
    import onnx

    got_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if got_opset != opset:
        raise KlasError(f"the dynamo exporter produced opset {got_opset}, not {opset}")
    if not all(v.type.tensor_type.shape.dim[0].dim_param for v in (*model.graph.input, *model.graph.output)):
        raise KlasError("the dynamo exporter did not keep the batch axis dynamic")
    onnx.checker.check_model(model, full_check=True)
    session = open_session(model.SerializeToString(), "cpu")
    gen = torch.Generator().manual_seed(0)
    ref64 = copy.deepcopy(module).double().eval()  # one float64 copy for every batch size
    for batch in SELF_CHECK_BATCHES:
        x = torch.randn(batch, *example.shape[1:], generator=gen, dtype=torch.float64)
        p = float64_parity(session, module, x, batch, reference=ref64)
        if not p.same_shape or not p.relative_diff <= SELF_CHECK_TOL:
            raise KlasError(f"the dynamo graph disagrees with PyTorch at batch {batch}: output {p.got.shape} vs "
                            f"{tuple(p.want.shape)}, relative max |logit diff| {p.relative_diff:.3g} (tolerance "
                            f"{SELF_CHECK_TOL:g})")


def check_parity(model_bytes: bytes, module: nn.Module, data, options, name: str, keep: dict | None = None) -> dict:
    """The exported graph against float64 PyTorch on the first ``options.parity_images`` test samples (onnxruntime
    in batches of ``options.parity_batch``): max |logit diff| and top-1 agreement, the manifest's ``parity``;
    raises past ``options.atol`` / ``options.min_agreement``. ``keep``: receives the graph's onnxruntime outputs
    (``keep["outputs"]``), which the variants compare with instead of running the parent again."""
    n = min(options.parity_images, len(data))
    if n < 1:
        raise KlasError(f"{name}: --parity-images must be >= 1")
    p = float64_parity(model_bytes, module, SplitInputs(data, n), options.parity_batch, REFERENCE_BATCH)
    diff, agree = p.max_abs_diff, p.top1_agreement
    if keep is not None:
        keep["outputs"] = p.got
    result = dict(images=n, max_abs_diff=diff, top1_agreement=agree, atol=options.atol,
                  min_agreement=options.min_agreement, reference="pytorch float64, onnxruntime CPU float32")
    if not (diff <= options.atol and agree >= options.min_agreement):
        raise KlasError(f"{name}: ONNX parity failed on {n} {data.spec.name} test images: max |logit diff| "
                        f"{diff:.3g} (tolerance {options.atol:g}), top-1 agreement {agree:.4f} "
                        f"(need {options.min_agreement:g}); not exported")
    return result
