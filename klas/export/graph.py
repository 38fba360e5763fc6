"""One network as one self-contained ONNX graph: the weights its forward uses, a dynamic batch axis, every weight
inside the file.

``export_onnx`` tries ``torch.onnx.export(dynamo=True)`` first (the supported exporter, through ``torch.export``);
its graph must pass a self-check (opset, symbolic batch, full checker, float64 parity on random inputs at batch
sizes the example does not have: ``klas.export.parity.self_check``), else the deprecated TorchScript exporter is
used for that model and the reason recorded.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import warnings

import torch
import torch.nn as nn

from klas.errors import KlasError

INPUT_NAME, OUTPUT_NAME = "input", "logits"  # the graph's input and output (the manifest's input / output names)

EXPORTER_DYNAMO, EXPORTER_TORCHSCRIPT = "dynamo", "torchscript"
"""Values of the ``exporter`` field ``export_onnx`` returns: ``torch.onnx.export(dynamo=True)`` (the supported
exporter, through ``torch.export``) or the deprecated TorchScript one, used only when the dynamo export of a model
fails or loses parity (the reason is returned with it)."""


def standalone(net: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``net`` holding only the parameters its forward uses.

    A StitchedNet keeps both anchors whole (unused source tail and head, unused target stem and blocks); which
    weights a forward touches is found by autograd, and the others are dropped from the copy. A forward that
    still reached a dropped weight would fail loudly, so the pruning cannot silently change the function.
    """
    model = copy.deepcopy(net).float().eval()
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    with torch.enable_grad():
        model(example.float()).sum().backward()
    for name, p in params.items():
        if p.grad is None:
            owner_path, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            owner.register_parameter(attr, None)
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    return model


def export_onnx(module: nn.Module, example: torch.Tensor, opset: int,
                exporter: str = "auto") -> tuple["onnx.ModelProto", dict]:  # noqa: F821
    """``module`` as an in-memory ONNX model with a dynamic batch axis (``input [batch, ...] -> logits
    [batch, ...]``) and every weight inside it, plus ``{"exporter": "dynamo"}``, or ``{"exporter":
    "torchscript", "fallback_reason": ...}`` when the dynamo exporter failed for this model.

    ``exporter="auto"``: the dynamo exporter (``torch.export`` + onnxscript) is tried first; its graph must pass
    ``klas.export.parity.self_check``. Otherwise the model is exported again by the TorchScript exporter (the
    caller's parity check then judges that one). ``"dynamo"``: the same without the fallback (a failure is a
    ``KlasError``). ``"torchscript"``: the TorchScript exporter only (``{"exporter": "torchscript"}``, no reason:
    it was asked for). All are silent: their progress lines, warnings and log records are captured.
    """
    from klas.export.parity import self_check

    if exporter == EXPORTER_TORCHSCRIPT:
        return _torchscript_onnx(module, example, opset), dict(exporter=EXPORTER_TORCHSCRIPT)
    if exporter not in ("auto", EXPORTER_DYNAMO):
        raise KlasError(f"exporter {exporter!r}: expected auto, dynamo or torchscript")
    try:
        model = _dynamo_onnx(module, example, opset)
        self_check(model, module, example, opset)
        return model, dict(exporter=EXPORTER_DYNAMO)
    except Exception as e:  # noqa: BLE001 -- any failure of the dynamo path means: fall back, say why
        reason = _one_line(e)
        if exporter == EXPORTER_DYNAMO:
            raise KlasError(f"the dynamo ONNX exporter failed ({reason}); [export] exporter = \"auto\" falls back "
                            "to TorchScript") from None
    return _torchscript_onnx(module, example, opset), dict(exporter=EXPORTER_TORCHSCRIPT, fallback_reason=reason)


def _dynamo_onnx(module: nn.Module, example: torch.Tensor, opset: int) -> "onnx.ModelProto":  # noqa: F821
    """``torch.export`` (non-strict, batch axis dynamic) then ``torch.onnx.export(dynamo=True)`` with klas's
    GELU / attention translations; the graph is optimized by onnxscript (constant folding, CSE) and the exporter's
    per-node debug metadata (stack traces naming this machine's paths) is dropped, so the bytes do not depend on
    where klas is installed."""
    example = example.float()
    if example.shape[0] < 2:  # NOTE: torch.export specializes sizes 0 and 1; an example of 2 keeps the axis symbolic
        example = example.expand(2, *example.shape[1:]).contiguous()
    with quiet():
        program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},),
                                      strict=False)
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, opset_version=opset,
                                         input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                         dynamic_shapes=({0: "batch"},), custom_translation_table=_translations(),
                                         external_data=False, optimize=True, verbose=False)
        model = onnx_program.model_proto
    return finish_dynamo(model)


def finish_dynamo(model) -> "onnx.ModelProto":  # noqa: F821
    """A dynamo-exported model as klas ships it: the exporter's per-node debug metadata (stack traces naming this
    machine's paths) and value_info dropped, so the bytes do not depend on where klas is installed; every weight
    inside the file."""
    for node in model.graph.node:
        del node.metadata_props[:]
    del model.graph.value_info[:]
    _self_contained(model)
    return model


def _torchscript_onnx(module: nn.Module, example: torch.Tensor, opset: int) -> "onnx.ModelProto":  # noqa: F821
    """The deprecated TorchScript exporter (``dynamo=False``): a trace with constant folding; the fallback."""
    import onnx

    buf = io.BytesIO()
    with quiet():
        torch.onnx.export(module, (example.float(),), buf, dynamo=False, opset_version=opset,
                          do_constant_folding=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    model = onnx.load_from_string(buf.getvalue())
    _self_contained(model)
    return model


def _self_contained(model) -> None:
    import onnx

    if any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        raise KlasError("ONNX export produced external data; expected one self-contained file")


@contextlib.contextmanager
def quiet():
    """Capture what the exporters print (dynamo's ``[torch.onnx] ...`` steps, TorchScript's tracer warnings, log
    records of torch.export / onnxscript): ``klas export`` prints only its own lines. Correctness is not taken on
    their word: the graph is checked and compared with PyTorch."""
    import logging

    sink = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # NOTE: log handlers keep the stream they were made with; redirects miss them
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield sink
    finally:
        logging.disable(previous)


@functools.lru_cache(maxsize=1)
def _translations() -> dict:
    """ONNX translations of two ATen ops that give onnxruntime the graph patterns it fuses (what the TorchScript
    exporter emitted), instead of torchlib's: exact GELU as ``(x * 0.5) * (1 + erf(x / sqrt 2))``, which ORT turns
    into one (Bias)Gelu kernel, and attention without mask as ``softmax((q * s) @ (k^T * s)) @ v`` with a plain 4-D
    Transpose of k, which ORT folds into one FusedMatMul (torchlib reshapes k to 3-D and back around the transpose,
    which blocks that fusion). Same arithmetic as PyTorch's (scale split as sqrt on q and k); every other case of
    the two ops goes to torchlib. Measured on the fmnist-deit anchors: 13-24% lower onnxruntime latency than
    torchlib's translations, on par with or below the TorchScript graphs."""
    import math

    from onnxscript import ir
    from onnxscript.function_libs.torch_lib.ops.nn import aten_gelu, aten_scaled_dot_product_attention
    from onnxscript.onnx_opset import opset18 as op

    def gelu(self, approximate: str = "none"):
        if approximate != "none":
            return aten_gelu(self, approximate)
        one, half, root2 = (ir.tensor(v, dtype=self.dtype) for v in (1.0, 0.5, math.sqrt(2.0)))
        return op.Mul(op.Mul(self, half), op.Add(op.Erf(op.Div(self, root2)), one))

    def attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                  scale: float | None = None, enable_gqa: bool = False):
        head_dim = query.shape[-1] if query.shape is not None else None
        if (attn_mask is not None or is_causal or dropout_p or enable_gqa or key.shape is None
                or len(key.shape) != 4 or (scale is None and not isinstance(head_dim, int))):
            return aten_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                     enable_gqa)
        s = ir.tensor(math.sqrt(scale if scale is not None else 1.0 / math.sqrt(head_dim)), dtype=query.dtype)
        weights = op.Softmax(op.MatMul(op.Mul(query, s), op.Mul(op.Transpose(key, perm=[0, 1, 3, 2]), s)), axis=-1)
        return op.MatMul(weights, value)

    return {torch.ops.aten.gelu.default: gelu, torch.ops.aten.scaled_dot_product_attention.default: attention}


def _one_line(e: BaseException, limit: int = 300) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."
