"""Export a stitched zoo to ONNX: one standalone, self-contained file per Pareto model, plus ``manifest.json``.

For every configuration on the accuracy-vs-FLOPs Pareto front of ``RUN_DIR/evaluation/evaluation.json`` (and
every anchor listed there), a *model provider* builds the network (``klas.stages.s4_finetune.load_stitched`` by default); we
prune it to the weights its forward actually uses (source stem + blocks 0..i, stitch layer, target blocks j+1.. +
head), export it to ONNX (``torch.onnx.export(dynamo=True)``, TorchScript only as a per-model fallback: dynamic
batch axis, weights inside the file), run
``onnx.checker``, and compare onnxruntime logits with a float64 PyTorch reference on real test images. A model that
misses the tolerance is not written: export stops with the figures. Latency is then measured on this machine.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from klas.data import ImageSet, open_split
from klas.errors import KlasError
from klas.families import count_flops, get_family_cfg
from klas_runtime.errors import ZooError
from klas_runtime.manifest import (MANIFEST, METADATA_KEY, SCHEMA, SCHEMA_VERSION, embedded_entry, load_manifest,
                                   model_path, now, save_manifest, sha256_bytes, validate, write_atomic)
from klas_runtime.profile import latency_record, machine_info, open_session
from klas.contract import StageContext, digest, setting
from klas.io import sha256_file
from klas.rundir import RunDir
from klas.stages.s4_finetune import FinetuneArtifact
from klas.stages.s5_evaluation import EvaluationArtifact
from klas.stitch import StitchConfig, StitchedNet

ModelProvider = Callable[[StitchConfig], nn.Module]
"""Builds the trained network of one configuration (anchors: ``StitchConfig.anchor(name)``). It must return a
``klas.stitch.StitchedNet`` (or anything with its ``src``, ``tgt``, ``i``, ``j`` attributes and forward)."""

INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass(frozen=True)
class ExportConfig:
    """The ONNX zoo: the anchors and the Pareto configurations, each checked against PyTorch on real test images
    and timed with onnxruntime on this machine."""

    opset: int = setting(18, "ONNX opset", ge=18)
    exporter: str = setting("auto", "ONNX exporter: auto = torch.onnx.export(dynamo=True), TorchScript only where a "
                            "model's dynamo graph fails its self-check; dynamo = no fallback (fail instead); "
                            "torchscript = the deprecated TorchScript exporter for every model (much faster to export; "
                            "the same parity check)", choices=("auto", "dynamo", "torchscript"))
    parity_images: int = setting(10000, "test images for the ONNX vs PyTorch check", ge=1)
    parity_batch: int = setting(61, "images per parity batch (odd on purpose: exercises the dynamic batch axis)",
                                ge=1, key=False)
    atol: float = setting(1e-3, "max |logit difference| allowed", gt=0)
    min_agreement: float = setting(0.999, "min top-1 agreement with PyTorch (fraction)", ge=0, le=1)
    accuracy_images: int | None = setting(None, "test images for the accuracy of models the evaluation lacks",
                                          ge=1, none="all")
    profile: bool = setting(True, "measure onnxruntime latency of every model (else: `klas profile` later)")
    provider: str | None = setting(None, "onnxruntime execution provider to time on", choices=("cpu", "cuda"),
                                   none="auto")
    threads: int = setting(1, "intra-op threads while timing", ge=1)
    batch: int = setting(1, "batch size while timing", ge=1)
    warmup: int = setting(20, "untimed runs first", ge=0)
    runs: int = setting(200, "timed runs per measurement", ge=1)
    precisions: str = setting("fp16,int8", "reduced-precision variants of every model (klas.stages.variants): "
                              "int8 = static QDQ calibrated on val images, fp16 = float16 inside, float32 I/O",
                              choices=("fp16,int8", "fp16", "int8", "none"))
    calibration_images: int = setting(256, "val images the int8 variants are calibrated on", ge=1)
    per_channel: str = setting("auto", "int8 weights per channel (on), per tensor (off), or auto: both built, the "
                               "one agreeing more with the float32 model on held-out val images kept",
                               choices=("auto", "on", "off"))
    per_channel_images: int = setting(1000, "val images after the calibration ones that decide per_channel = auto",
                                      ge=1)
    max_accuracy_loss: float = setting(1.0, "a variant losing more test accuracy points than this against its "
                                       "float32 model is left out of the zoo (listed under rejected)", ge=0)


class ExportArtifact:
    """The zoo folder: ``manifest.json`` (validated by ``klas_runtime``) and the model files it lists."""

    KIND, VERSION, RECORD = "export", SCHEMA_VERSION, MANIFEST

    def __init__(self, manifest: dict):
        self.manifest = manifest
        self.models = manifest["models"]

    def save(self, folder: Path | str) -> None:
        save_manifest(validate(self.manifest), Path(folder))

    @classmethod
    def load(cls, folder: Path | str) -> "ExportArtifact":
        return cls(load_manifest(Path(folder), verify_files=False))

    @classmethod
    def digest(cls, folder: Path | str) -> str | None:
        """sha256 over the manifest (which holds every model file's sha256) -- None if any listed file is missing
        or differs from its recorded hash."""
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            return None
        try:
            load_manifest(folder, verify_files=True)
        except ZooError:
            return None
        return digest(sha256_file(folder / MANIFEST))


# --- what to export ----------------------------------------------------------------------------------------------

def check_rows(rows: list, where: str) -> list[dict]:
    """The evaluation rows, checked: each has a config {source, i, target, j}, a boolean pareto, a percentage."""
    for k, row in enumerate(rows):
        cfg = row.get("config") if isinstance(row, dict) else None
        if not isinstance(cfg, dict) or not all(key in cfg for key in ("source", "i", "target", "j")):
            raise KlasError(f"{where}: configuration {k} has no config {{source, i, target, j}}")
        if "pareto" in row and not isinstance(row["pareto"], bool):
            raise KlasError(f"{where}: configuration {k}: 'pareto' must be true or false")
        acc = row.get("test_acc")
        if acc is not None and not (isinstance(acc, (int, float)) and 0 <= acc <= 100):
            raise KlasError(f"{where}: configuration {k}: test_acc {acc!r} is not a percentage in [0, 100]")
    return rows


@dataclass(frozen=True)
class ZooItem:
    """One model of the zoo to export: its manifest name, configuration, where its network comes from, the
    evaluation figures, and whether it is an untouched anchor (the weights the user gave, exported as given)."""

    name: str
    config: StitchConfig
    untouched: bool
    row: dict


def zoo_items(zoo: list[dict], where: str) -> list[ZooItem]:
    """The models of the evaluation's zoo (untouched anchors first); cascades are entries over two of them."""
    items = []
    for k, z in enumerate(zoo):
        if z.get("kind") == "cascade":
            continue
        cfg = StitchConfig.from_dict(z.get("config") or {}, f"{where}: zoo[{k}]")
        items.append(ZooItem(z["name"], cfg, z.get("kind") == "anchor", z))
    if not items:
        raise KlasError(f"{where}: the zoo is empty: nothing to export")
    return sorted(items, key=lambda it: not it.untouched)


def supernet_provider(run_dir: Path | str) -> ModelProvider:
    """Trained networks from the supernetwork stage: ``klas.stages.s4_finetune.load_stitched(run_dir, config)``."""
    try:
        from klas.stages.s4_finetune import load_stitched
    except ImportError as e:
        raise KlasError(f"{run_dir}: cannot load trained stitched networks: klas.stages.s4_finetune.load_stitched is not "
                        f"available ({e})") from None
    return lambda config: load_stitched(run_dir, config)


# --- one model -----------------------------------------------------------------------------------------------------

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


EXPORTER_DYNAMO, EXPORTER_TORCHSCRIPT = "dynamo", "torchscript"
"""Values of the ``exporter`` field ``export_onnx`` returns: ``torch.onnx.export(dynamo=True)`` (the supported
exporter, through ``torch.export``) or the deprecated TorchScript one, used only when the dynamo export of a model
fails or loses parity (the reason is returned with it)."""

SELF_CHECK_BATCHES = (1, 3)  # NOTE: neither is the example's batch (2): a batch size baked into the graph shows
SELF_CHECK_TOL = 1e-3  # max |logit diff| / max(1, max |logit|) of the dynamo graph vs float64 PyTorch, random inputs


def export_onnx(module: nn.Module, example: torch.Tensor, opset: int,
                exporter: str = "auto") -> tuple["onnx.ModelProto", dict]:  # noqa: F821
    """``module`` as an in-memory ONNX model with a dynamic batch axis (``input [batch, C, H, W] -> logits
    [batch, classes]``) and every weight inside it, plus ``{"exporter": "dynamo"}``, or ``{"exporter":
    "torchscript", "fallback_reason": ...}`` when the dynamo exporter failed for this model.

    ``exporter="auto"``: the dynamo exporter (``torch.export`` + onnxscript) is tried first; its graph must declare
    ``opset``, pass ``onnx.checker`` (full check) and agree with a float64 PyTorch reference under onnxruntime at
    batch sizes the example does not have. Otherwise the model is exported again by the TorchScript exporter (the
    caller's parity check then judges that one). ``"dynamo"``: the same without the fallback (a failure is a
    ``KlasError``). ``"torchscript"``: the TorchScript exporter only (``{"exporter": "torchscript"}``, no reason:
    it was asked for). All are silent: their progress lines, warnings and log records are captured.
    """
    if exporter == EXPORTER_TORCHSCRIPT:
        return _torchscript_onnx(module, example, opset), dict(exporter=EXPORTER_TORCHSCRIPT)
    if exporter not in ("auto", EXPORTER_DYNAMO):
        raise KlasError(f"exporter {exporter!r}: expected auto, dynamo or torchscript")
    try:
        model = _dynamo_onnx(module, example, opset)
        _self_check(model, module, example, opset)
        return model, dict(exporter=EXPORTER_DYNAMO)
    except Exception as e:  # noqa: BLE001 -- any failure of the dynamo path means: fall back, say why
        reason = _one_line(e)
        if exporter == EXPORTER_DYNAMO:
            raise KlasError(f"the dynamo ONNX exporter failed ({reason}); [export] exporter = \"auto\" falls back "
                            "to TorchScript") from None
    return _torchscript_onnx(module, example, opset), dict(exporter=EXPORTER_TORCHSCRIPT, fallback_reason=reason)


def to_onnx(module: nn.Module, example: torch.Tensor, opset: int) -> "onnx.ModelProto":  # noqa: F821
    """``export_onnx`` without the exporter info."""
    return export_onnx(module, example, opset)[0]


def _dynamo_onnx(module: nn.Module, example: torch.Tensor, opset: int) -> "onnx.ModelProto":  # noqa: F821
    """``torch.export`` (non-strict, batch axis dynamic) then ``torch.onnx.export(dynamo=True)`` with klas's
    GELU / attention translations; the graph is optimized by onnxscript (constant folding, CSE) and the exporter's
    per-node debug metadata (stack traces naming this machine's paths) is dropped, so the bytes do not depend on
    where klas is installed."""
    import onnx

    example = example.float()
    if example.shape[0] < 2:  # NOTE: torch.export specializes sizes 0 and 1; an example of 2 keeps the axis symbolic
        example = example.expand(2, *example.shape[1:]).contiguous()
    with _quiet():
        program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},),
                                      strict=False)
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, opset_version=opset,
                                         input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                         dynamic_shapes=({0: "batch"},), custom_translation_table=_translations(),
                                         external_data=False, optimize=True, verbose=False)
        model = onnx_program.model_proto
    for node in model.graph.node:
        del node.metadata_props[:]
    del model.graph.value_info[:]
    _self_contained(model)
    return model


def _torchscript_onnx(module: nn.Module, example: torch.Tensor, opset: int) -> "onnx.ModelProto":  # noqa: F821
    """The deprecated TorchScript exporter (``dynamo=False``): a trace with constant folding; the fallback."""
    import onnx

    buf = io.BytesIO()
    with _quiet():
        torch.onnx.export(module, (example.float(),), buf, dynamo=False, opset_version=opset,
                          do_constant_folding=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    model = onnx.load_from_string(buf.getvalue())
    _self_contained(model)
    return model


def _self_check(model, module: nn.Module, example: torch.Tensor, opset: int) -> None:
    """Raise unless the dynamo graph is what was asked for: ``opset`` (below the exporter's own opset 18 it converts
    down and silently keeps 18 when it cannot), a symbolic batch axis, the full checker, and onnxruntime logits
    within ``SELF_CHECK_TOL`` of float64 PyTorch on fresh random inputs at batch sizes 1 and 3."""
    import onnx

    got_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if got_opset != opset:
        raise KlasError(f"the dynamo exporter produced opset {got_opset}, not {opset}")
    if not all(v.type.tensor_type.shape.dim[0].dim_param for v in (*model.graph.input, *model.graph.output)):
        raise KlasError("the dynamo exporter did not keep the batch axis dynamic")
    onnx.checker.check_model(model, full_check=True)
    session = open_session(model.SerializeToString(), "cpu")
    ref64 = copy.deepcopy(module).double().eval()
    gen = torch.Generator().manual_seed(0)
    for batch in SELF_CHECK_BATCHES:
        x = torch.randn(batch, *example.shape[1:], generator=gen, dtype=torch.float64)
        with torch.no_grad():
            want = ref64(x).numpy()
        got = session.run(None, {INPUT_NAME: x.float().numpy()})[0]
        err = float(np.abs(got.astype(np.float64) - want).max()) / max(1.0, float(np.abs(want).max()))
        if got.shape != want.shape or not err <= SELF_CHECK_TOL:
            raise KlasError(f"the dynamo graph disagrees with PyTorch at batch {batch}: output {got.shape} vs "
                            f"{tuple(want.shape)}, relative max |logit diff| {err:.3g} (tolerance {SELF_CHECK_TOL:g})")


def _self_contained(model) -> None:
    import onnx

    if any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        raise KlasError("ONNX export produced external data; expected one self-contained file")


@contextlib.contextmanager
def _quiet():
    """Capture what the exporters print (dynamo's ``[torch.onnx] ...`` steps, TorchScript's tracer warnings, log
    records of torch.export / onnxscript): ``klas export`` prints only its own lines. Correctness is not taken on
    their word: the graph is checked and compared with PyTorch."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield sink


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


def onnx_logits(session, images: torch.Tensor, normalize, batch: int) -> np.ndarray:
    """onnxruntime logits over uint8 ``images`` in batches of ``batch``."""
    out = [session.run(None, {INPUT_NAME: normalize(images[s:s + batch]).numpy()})[0]
           for s in range(0, len(images), batch)]
    return np.concatenate(out, axis=0)


def check_parity(model_bytes: bytes, module: nn.Module, data: ImageSet, options: ExportConfig, name: str) -> dict:
    """onnxruntime vs a float64 PyTorch reference on real test images: max |logit diff| and top-1 agreement;
    raises past the tolerance."""
    n = min(options.parity_images, len(data))
    if n < 1:
        raise KlasError(f"{name}: --parity-images must be >= 1")
    images = data.images[:n]
    session = open_session(model_bytes, "cpu")
    got = onnx_logits(session, images, data.normalize, options.parity_batch)
    ref64 = copy.deepcopy(module).double()
    with torch.no_grad():
        want = torch.cat([ref64(data.normalize(images[s:s + 256]).double()) for s in range(0, n, 256)]).numpy()
    diff = float(np.abs(got.astype(np.float64) - want).max())
    agree = float((got.argmax(1) == want.argmax(1)).mean())
    result = dict(images=n, max_abs_diff=diff, top1_agreement=agree, atol=options.atol,
                  min_agreement=options.min_agreement, reference="pytorch float64, onnxruntime CPU float32")
    if not (diff <= options.atol and agree >= options.min_agreement):
        raise KlasError(f"{name}: ONNX parity failed on {n} {data.spec.name} test images: max |logit diff| "
                        f"{diff:.3g} (tolerance {options.atol:g}), top-1 agreement {agree:.4f} "
                        f"(need {options.min_agreement:g}); not exported")
    return result


def onnx_accuracy(model_bytes: bytes, data: ImageSet, limit: int | None, batch: int = 256) -> tuple[float, int]:
    """Top-1 accuracy (%) of the exported model itself on the first ``limit`` test images."""
    data = data.subset(limit)
    logits = onnx_logits(open_session(model_bytes, "cpu"), data.images, data.normalize, batch)
    return float((logits.argmax(1) == data.labels.numpy()).mean() * 100), len(data)


def file_name(config: StitchConfig, name: str | None = None) -> str:
    """``fmnist-deit-ti.onnx`` for an anchor (``fmnist-deit-ti.finetuned.onnx`` for one finetuned in a shared
    supernetwork); ``ti.4+s.6.onnx``-style (source blocks kept, target block resumed at) for a stitch."""
    if config.is_anchor:
        return f"{name or config.source}.onnx"
    return f"{config.source}.{config.i + 1}+{config.target}.{config.j + 1}.onnx"


def check_untouched(view) -> dict:
    """The exported anchor's weights against the file the user gave, tensor by tensor and bit for bit (the ONNX
    parity check then ties the graph to them); a mismatch stops the export."""
    f = getattr(view, "weights_file", None)
    if f is None:
        return dict(file=None, check="no local file (hub or random weights): nothing to compare with")
    f = Path(f)
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file
        given = load_file(str(f))
    else:
        given = torch.load(f, map_location="cpu", weights_only=True)
        given = given.get("state_dict", given.get("model", given)) if isinstance(given, dict) else given
    mine = view.model.state_dict()
    shared = [k for k in given if k in mine]
    bad = [k for k in shared if not torch.equal(given[k].to(mine[k].dtype), mine[k]) or given[k].dtype != mine[k].dtype]
    if not shared or bad or len(shared) < len(given):
        raise KlasError(f"{f}: the anchor {view.name!r} to export differs from the weights file "
                        f"({len(bad)} tensors differ, {len(given) - len(shared)} missing): refusing to ship changed anchors")
    return dict(file=str(f), sha256=sha256_file(f), check=f"bit-identical ({len(shared)} tensors)")


def config_entry(config: StitchConfig, net: nn.Module) -> dict:
    for attr in ("src", "tgt", "i", "j"):
        if not hasattr(net, attr):
            raise KlasError(f"{config.key}: the model provider returned a {type(net).__name__}, not a StitchedNet "
                            f"(no {attr!r})")
    src_depth, tgt_depth = net.src.depth, net.tgt.depth
    if config.is_anchor:
        return dict(source=config.source, i=-1, target=config.target, j=-1, anchor=True,
                    source_blocks=[0, src_depth], target_blocks=[tgt_depth, tgt_depth])
    if (net.src.name, net.i, net.tgt.name, net.j) != (config.source, config.i, config.target, config.j):
        raise KlasError(f"{config.key}: the model provider returned {net.src.name}[:{net.i + 1}]->"
                        f"{net.tgt.name}[{net.j + 1}:] instead")
    return dict(source=config.source, i=config.i, target=config.target, j=config.j, anchor=False,
                source_blocks=[0, config.i + 1], target_blocks=[config.j + 1, tgt_depth])


def input_spec(data: ImageSet, shape: tuple[int, int, int], data_config: dict | None = None) -> dict:
    """The manifest's ``input``: shape, channels, scale, the mean/std the parity check normalized with, and the
    geometry of timm's evaluation transform from the family's ``data_config`` (``interpolation``, ``crop_pct``,
    ``crop_mode``; ``resize`` = floor(size / crop_pct)), which ``klas_runtime.preprocess`` applies to image files.
    Without a data config: straight to the input size, bilinear, no crop (what the runtime always did)."""
    from klas_runtime.preprocess import CROP_MODES, CROP_PCT_RANGE, INTERPOLATIONS, LEGACY, resize_size

    c, h, w = shape
    geo = dict(LEGACY)
    if data_config is not None:
        # timm's own defaults for what a data config leaves out: crop_pct 0.875, crop_mode center
        geo = dict(interpolation=data_config.get("interpolation") or "bilinear",
                   crop_pct=float(data_config.get("crop_pct") or 0.875),
                   crop_mode=data_config.get("crop_mode") or "center")
        where = f"family data config ({data.spec.name} export)"
        if geo["interpolation"] not in INTERPOLATIONS:
            raise KlasError(f"{where}: interpolation {geo['interpolation']!r} cannot be reproduced at run time; "
                            f"expected one of {', '.join(INTERPOLATIONS)}")
        if geo["crop_mode"] not in CROP_MODES:
            raise KlasError(f"{where}: crop_mode {geo['crop_mode']!r}: expected one of {', '.join(CROP_MODES)}")
        if not CROP_PCT_RANGE[0] <= geo["crop_pct"] <= CROP_PCT_RANGE[1]:
            raise KlasError(f"{where}: crop_pct {geo['crop_pct']:g}: expected a number in "
                            f"[{CROP_PCT_RANGE[0]:g}, {CROP_PCT_RANGE[1]:g}]")
    return dict(name=INPUT_NAME, shape=["batch", c, h, w], dtype="float32", layout="NCHW",
                color="grayscale" if c == 1 else "rgb", scale=1 / 255, mean=list(data.spec.mean),
                std=list(data.spec.std), resize=resize_size(h, w, geo["crop_pct"]), **geo)


def export_model(config: StitchConfig, net: nn.Module, row: dict | None, data: ImageSet, header: dict,
                 out_dir: Path, options: ExportConfig, name: str | None = None, untouched=None) -> dict:
    """Export, check, verify and profile one model; returns its manifest entry (the file is written last).
    ``untouched``: the anchor view whose weights the user gave (checked bit for bit against their file)."""
    import onnx

    shape = tuple(header["input_shape"])
    example = data.normalize(data.images[:2]) if len(data) >= 2 else torch.randn(2, *shape)
    module = standalone(net, example)
    flops = count_flops(module, example[:1])
    entry = dict(name=name or config.key, file=file_name(config, name), sha256="0" * 64, bytes=0, precision="fp32",
                 config=config_entry(config, net), params=sum(p.numel() for p in module.parameters()), flops=flops,
                 origin="untouched" if untouched is not None else ("finetuned" if config.is_anchor else "stitched"))
    if untouched is not None:
        entry["weights"] = check_untouched(untouched)
    model, info = export_onnx(module, example, options.opset, options.exporter)
    entry["exporter"] = info
    onnx.checker.check_model(model, full_check=True)
    raw = model.SerializeToString()
    if row is not None and row.get("val_acc") is not None:
        entry["val_acc"] = float(row["val_acc"])
    if row is not None and row.get("test_acc") is not None:
        entry.update(test_acc=float(row["test_acc"]), test_acc_source="evaluation stage (PyTorch)")
    else:
        acc, n = onnx_accuracy(raw, data, options.accuracy_images)
        entry.update(test_acc=acc, test_acc_source=f"onnxruntime on {n} {data.spec.name} test images")
    entry.update(input=input_spec(data, shape, header.get("data_config")),
                 output=dict(name=OUTPUT_NAME, num_classes=header["num_classes"], classes=list(data.spec.classes)),
                 opset=options.opset, parity=check_parity(raw, module, data, options, config.key), latency=[])
    del model.metadata_props[:]
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(embedded_entry(entry, header)))
    model.doc_string = f"klas {header['family']} zoo model {config.key}"
    onnx.checker.check_model(model)
    raw = model.SerializeToString()
    entry.update(sha256=sha256_bytes(raw), bytes=len(raw))
    if options.profile:
        entry["latency"].append(latency_record(raw, options.provider, options.threads, options.batch, options.warmup,
                                               options.runs))
    # NOTE: staged under a hidden name; export_models moves every file into place only once all models passed.
    write_atomic(out_dir / _staged(entry["file"]), raw)
    return entry


# --- a zoo ---------------------------------------------------------------------------------------------------------

def export_models(models: list[tuple], out_dir: Path | str, family: str, data: ImageSet, options: ExportConfig,
                  progress: bool = True, cascades: list[dict] = (), val: ImageSet | None = None,
                  data_config: dict | None = None) -> ExportArtifact:
    """Export ``(config, net or provider, evaluation row[, name, untouched anchor view])`` tuples into ``out_dir``
    and write its manifest; ``cascades`` (evaluation zoo entries over two of the models) become cascade entries.
    With ``val`` (the split int8 variants are calibrated on) every model also gets the ``options.precisions``
    variants (``klas.stages.variants``), measured on all of ``data``; without it, the float32 zoo only.
    ``data_config``: the timm data config ``data`` was preprocessed with (default: the family's
    ``data_config``), whose resize / crop / interpolation the manifest's input spec carries for the runtime."""
    from klas.stages.variants import make_variants, write_staged

    from klas import __version__
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = get_family_cfg(family)
    header = dict(schema=SCHEMA, schema_version=SCHEMA_VERSION, family=family, dataset=data.spec.name,
                  klas_version=__version__, input_shape=list(cfg.input_shape), num_classes=cfg.num_classes,
                  data_config=data_config if data_config is not None else getattr(cfg, "data_config", None))
    old = _previous_files(out_dir)
    entries, rejected = [], []
    for config, net, row, *extra in tqdm(models, desc="export", unit="model", disable=not progress):
        net = net(config) if not isinstance(net, nn.Module) else net
        try:
            entries.append(export_model(config, net.eval(), row, data, header, out_dir, options, *extra))
            if val is not None:
                parent = entries[-1]
                made, refused = make_variants(parent, (out_dir / _staged(parent["file"])).read_bytes(), data, val,
                                              header, options, write_staged(out_dir, _staged))
                entries += made
                rejected += refused
        except BaseException:
            for e in entries:
                (out_dir / _staged(e["file"])).unlink(missing_ok=True)
            raise
    for e in entries:
        os.replace(out_dir / _staged(e["file"]), model_path(out_dir, e["file"]))
    entries += [cascade_entry(c, entries, data, options, out_dir) for c in cascades]
    manifest = dict(schema=SCHEMA, schema_version=SCHEMA_VERSION, family=family, dataset=data.spec.name,
                    klas_version=__version__, created=now(), created_on=machine_info(),
                    models=sorted(entries, key=lambda e: (e["flops"], e["name"])))
    if val is not None:
        manifest["rejected"] = rejected
    art = ExportArtifact(manifest)
    art.save(out_dir)
    for stale in old - {e["file"] for e in entries if "file" in e}:
        model_path(out_dir, stale).unlink(missing_ok=True)
    return art


def export_zoo(run_dir: Path | str, out_dir: Path | str, options: ExportConfig, *,
               provider: ModelProvider | None = None, family=None, data_root: Path | str | None = None,
               progress: bool = True, data_settings=None) -> ExportArtifact:
    """``klas export``: the evaluation's zoo -- the user's untouched anchors (their weights as given), the admitted
    configurations (through ``provider``, default: the finetune stage's ``load_stitched``) and cascades."""
    from klas.stages.s5_evaluation import untouched_anchors

    run = RunDir(run_dir)
    ev = EvaluationArtifact.load(run.path / "evaluation")
    where = str(run.path / "evaluation" / EvaluationArtifact.RECORD)
    check_rows(ev.configs, where)
    items = zoo_items(ev.zoo, where)
    cfg = get_family_cfg(run.family)
    provider = provider or supernet_provider(run.path)
    anchors = {}
    if any(it.untouched for it in items):
        meta = FinetuneArtifact.load(run.path / "finetune")
        anchors = {v.name: v for v in (untouched_anchors(dict(pretrained=meta.pretrained, family=meta.family,
                                                              weights=meta.weights, num_classes=meta.num_classes,
                                                              input_shape=meta.input_shape), family) or [])}
    dataset = run.meta.get("dataset") or cfg.dataset
    # the family's own preprocessing (klas.data.open_split), in memory or streamed as the [data] settings say
    data = open_split(family if family is not None else run.family, "test", data_settings, root=data_root,
                      dataset=dataset)
    val = open_split(family if family is not None else run.family, "val", data_settings, root=data_root,
                     dataset=dataset) if options.precisions != "none" else None
    models = []
    for it in items:
        if it.untouched:
            if it.config.source not in anchors:
                raise KlasError(f"{where}: untouched anchor {it.name!r} cannot be rebuilt (anchors passed in?)")
            v = anchors[it.config.source]
            models.append((it.config, StitchedNet(v, -1, v, -1, None), it.row, it.name, v))
        else:
            models.append((it.config, provider, it.row, it.name))
    cascades = [z for z in ev.zoo if z.get("kind") == "cascade"]
    return export_models(models, out_dir, run.family, data, options, progress, cascades, val,
                         data_config=getattr(family, "data_config", None))


def cascade_entry(c: dict, entries: list[dict], data: ImageSet, options: ExportConfig, out_dir: Path) -> dict:
    """The manifest entry of a cascade over two exported models: worst-case and average FLOPs, accuracy as the
    evaluation measured it, and latency measured through the runtime on real test images."""
    by_name = {e["name"]: e for e in entries}
    missing = [m for m in c["members"] if m not in by_name]
    if missing:
        raise KlasError(f"cascade {c['name']}: member {missing[0]!r} is not in the zoo")
    small, large = (by_name[m] for m in c["members"])
    entry = dict(name=c["name"], kind="cascade", members=list(c["members"]), threshold=c["threshold"],
                 flops=small["flops"] + large["flops"], flops_avg=c["flops_avg"], deferral=c["deferral"],
                 params=small["params"] + large["params"], val_acc=c["val_acc"], test_acc=c["test_acc"],
                 test_acc_source="evaluation stage (PyTorch members)", latency=[])
    if options.profile:
        from klas_runtime.profile import cascade_latency_record

        n = min(len(data), max(options.runs, options.warmup) * options.batch)
        images = data.normalize(data.images[:n]).numpy()
        entry["latency"].append(cascade_latency_record(
            out_dir / small["file"], out_dir / large["file"], c["threshold"], options.provider, options.threads,
            options.batch, options.warmup, options.runs, inputs=images, inputs_label=f"{n} {data.spec.name} test images"))
    return entry


def _previous_files(out_dir: Path) -> set[str]:
    """Model files of an earlier zoo in ``out_dir`` (to remove those the new one drops); none if unreadable."""
    if not (out_dir / MANIFEST).is_file():
        return set()
    try:
        return {m["file"] for m in load_manifest(out_dir, verify_files=False)["models"] if "file" in m}
    except ZooError:  # klas_runtime's errors (KlasError's base)
        return set()


def _staged(file: str) -> str:
    return f".{file}.staged"


# --- the stage contract ---------------------------------------------------------------------------------------------
NAME, CONFIG, ARTIFACT, AFTER = "export", ExportConfig, ExportArtifact, ("evaluation",)
FOLDER = "zoo"  # the artifact is the run's zoo folder, <run>/zoo
DESCRIBE = "export the zoo (untouched anchors + admitted models and cascades) to ONNX + manifest"


def run(cfg: ExportConfig, ctx: StageContext) -> ExportArtifact:
    """The new zoo is built in a sibling folder and swapped in with one rename: a kill at any moment leaves the old
    zoo or the new one whole, never a mix."""
    import shutil

    from klas.io import swap_dirs

    final = ctx.run_dir.path / FOLDER
    staging = ctx.run_dir.path / f".{FOLDER}.staging-{os.getpid()}"
    for stale in ctx.run_dir.path.glob(f".{FOLDER}.staging-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    try:
        art = export_zoo(ctx.run_dir.path, staging, cfg, data_root=ctx.data_root, progress=ctx.progress,
                         data_settings=ctx.data)
        swap_dirs(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return art


def summary(art: ExportArtifact) -> dict:
    return dict(models=len(art.models))
