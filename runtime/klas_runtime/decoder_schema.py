"""The schema of decoder zoos (schema version 5, ``runtime_entry = "generate"``): KV-cache decoder entries, their
variants and latency records, the tokenizer and generation header blocks, and their cross-field checks.

Registered into ``klas_runtime.manifest.KINDS_BY_ENTRY`` on import (``klas_runtime/__init__`` imports it), so
``validate`` holds every manifest naming the ``generate`` entry to it; the image schema is untouched.
"""
from __future__ import annotations

import math
from typing import Any

from klas_runtime.errors import ZooError
from klas_runtime.manifest import (_EXPECTED, _HEX64, _SAFE_JSON, DECODER_PRECISIONS, DECODER_SCHEMA_VERSION, KINDS_BY_ENTRY,
                                   LATENCY, MANIFEST, MODEL, REJECTED, ManifestKind, _bool, _check, _fraction,
                                   _nonneg_int, _num, _pos_num, _str)

DECODER_VARIANT_KEYS = ("config", "flops", "flops_context", "input", "output", "decoder", "kv_bytes_per_token")

def _pos_int(v: Any) -> bool:
    return _nonneg_int(v) and v > 0


def _kv_name(v: Any) -> bool:
    """A cache tensor name pattern with one ``{i}`` (the layer index), e.g. 'past_key_values.{i}.key'."""
    return _str(v) and v.count("{i}") == 1 and "{" not in v.replace("{i}", "") and "}" not in v.replace("{i}", "")


def _ttft(v: Any) -> bool:
    """{"16": ms, "64": ms, ...}: time to first token per swept prompt length (decimal keys > 0)."""
    return (isinstance(v, dict) and len(v) > 0
            and all(isinstance(k, str) and k.isdigit() and int(k) > 0 and _pos_num(x) for k, x in v.items()))


def _token_ids(v: Any) -> bool:
    return isinstance(v, list) and all(_nonneg_int(x) for x in v)


DECODER_INPUT = {"name": (_str, True), "kind": (lambda v: v == "decoder", True),
                 "dtype": (lambda v: v == "int64", True), "shape": (lambda v: v == ["batch", "sequence"], True),
                 "attention_mask": (_str, True), "position_ids": (_str, True)}
DECODER_OUTPUT = {"name": (_str, True), "vocab_size": (_pos_int, True)}
DECODER_LAYER = {"kv_heads": (_pos_int, True), "head_dim": (_pos_int, True)}
DECODER_BLOCK = {"layers": (lambda v: isinstance(v, list) and len(v) > 0, True),
                 "past_key": (_kv_name, True), "past_value": (_kv_name, True),
                 "present_key": (_kv_name, True), "present_value": (_kv_name, True),
                 "kv_dtype": (lambda v: v == "float32", True)}
DECODER_PARITY = {"prompts": (_nonneg_int, True), "max_abs_diff": (lambda v: _num(v) and v >= 0, True),
                  "relative_diff": (lambda v: _num(v) and v >= 0, True), "atol": (_pos_num, True),
                  "greedy_steps": (_nonneg_int, True), "greedy_match": (_fraction, True), "reference": (_str, True)}
DECODER_LATENCY = {**LATENCY, "prompt_tokens": (_pos_int, True), "new_tokens": (_pos_int, True),
                   "ttft_ms": (_ttft, True), "tokens_per_s": (_pos_num, True),
                   "peak_memory_mb": (lambda v: _num(v) and v >= 0, False)}
_MODEL_COMMON = {k: MODEL[k] for k in ("name", "file", "sha256", "bytes", "config", "params", "flops",
                                       "test_acc_source", "opset", "latency", "kind")}
DECODER_MODEL = {**_MODEL_COMMON, "flops_context": (_pos_int, True), "test_acc": (_pos_num, True),
                 "test_perplexity": (lambda v: _num(v) and v >= 1, True), "val_acc": (_pos_num, False),
                 "val_perplexity": (lambda v: _num(v) and v >= 1, False), "kv_bytes_per_token": (_pos_int, True),
                 "input": (DECODER_INPUT, True), "output": (DECODER_OUTPUT, True), "decoder": (DECODER_BLOCK, True),
                 "parity": (DECODER_PARITY, True), "precision": (lambda v: v in DECODER_PRECISIONS, False),
                 "origin": (lambda v: True, False)}
DECODER_VARIANT_PARITY = {"prompts": (_nonneg_int, True), "max_abs_diff": (lambda v: _num(v) and v >= 0, True),
                          "relative_diff": (lambda v: _num(v) and v >= 0, False), "atol": (_pos_num, False),
                          "greedy_steps": (_nonneg_int, True), "greedy_match": (_fraction, True),
                          "reference": (_str, True)}
DECODER_VARIANT_INFO = {"method": (_str, True), "parent_test_perplexity": (lambda v: _num(v) and v >= 1, True),
                        "perplexity_increase": (_num, True),
                        "max_perplexity_increase": (lambda v: _num(v) and v >= 0, True),
                        "kept_because": (_str, True)}
DECODER_VARIANT = {**DECODER_MODEL, "precision": (lambda v: v in DECODER_PRECISIONS[1:], True),
                   "parent": (_str, True), "parity": (DECODER_VARIANT_PARITY, True),
                   "variant": (DECODER_VARIANT_INFO, True)}
DECODER_REJECTED = {**REJECTED, "precision": (lambda v: v in DECODER_PRECISIONS[1:], True)}
TOKENIZER = {"file": (lambda v: isinstance(v, str) and bool(_SAFE_JSON.match(v)) and v != MANIFEST, True),
             "sha256": (lambda v: isinstance(v, str) and bool(_HEX64.match(v)), True), "bytes": (_nonneg_int, True)}
GENERATION = {"eos_token_id": (_token_ids, True), "pad_token_id": (_nonneg_int, True),
              "bos_token_id": (lambda v: v is None or _nonneg_int(v), True), "add_bos": (_bool, True),
              "max_context": (_pos_int, True)}
DECODER_TOP = {"tokenizer": (TOKENIZER, True), "generation": (GENERATION, True)}
_DECODER_EXPECTED = {**_EXPECTED,
                     "precision": "one of " + ", ".join(DECODER_PRECISIONS) + " (a variant: int8 or int4)",
                     "shape": "['batch', 'sequence']", "test_acc": "100 / test perplexity, a number > 0",
                     "val_acc": "100 / val perplexity, a number > 0", "file": "a plain file name inside the zoo "
                     "folder (no path separators, no '..'): .onnx for a model, .json for the tokenizer",
                     "dtype": "'int64' (token ids)", "kind": "'decoder' (input) or 'model' (entry)",
                     "kv_dtype": "'float32'", "past_key": "a name with one '{i}' (the layer index)",
                     "past_value": "a name with one '{i}' (the layer index)",
                     "present_key": "a name with one '{i}' (the layer index)",
                     "present_value": "a name with one '{i}' (the layer index)",
                     "ttft_ms": "{prompt length: ms} with decimal keys > 0 and positive times",
                     "eos_token_id": "a list of token ids (ints >= 0)", "bos_token_id": "a token id or null",
                     "layers": "a non-empty list of {kv_heads, head_dim}"}
PERPLEXITY_RTOL = 5e-3  # test_acc must be 100 / test_perplexity up to the exporter's rounding


def kv_names(decoder: dict, i: int) -> dict[str, str]:
    """The four cache tensor names of layer ``i`` (past/present key/value) of a ``decoder`` block."""
    return {k: decoder[k].replace("{i}", str(i)) for k in ("past_key", "past_value", "present_key", "present_value")}


def kv_bytes_per_token(layers: list[dict]) -> int:
    """float32 keys + values of one token over all layers: 2 * 4 * sum(kv_heads * head_dim)."""
    return 8 * sum(layer["kv_heads"] * layer["head_dim"] for layer in layers)


def _check_decoder_model(entry: dict, manifest: dict, at: str) -> None:
    """A decoder entry's cross-field claims: every layer {kv_heads > 0, head_dim > 0}, distinct cache tensor names,
    KV bytes per token as the layers give them, test_acc = 100 / test_perplexity, and the generation token ids
    inside the vocabulary."""
    dec = entry["decoder"]
    for i, layer in enumerate(dec["layers"]):
        _check(layer, DECODER_LAYER, f"{at}.decoder.layers[{i}]", _DECODER_EXPECTED)
    names = [entry["input"][k] for k in ("name", "attention_mask", "position_ids")]
    names += [n for i in range(len(dec["layers"])) for n in kv_names(dec, i).values()]
    if len(set(names)) != len(names) or entry["output"]["name"] in names:
        raise ZooError(f"{at}: input, output and cache tensor names must be distinct (past_key, past_value, "
                        f"present_key, present_value differ by more than the layer index)")
    want = kv_bytes_per_token(dec["layers"])
    if entry["kv_bytes_per_token"] != want:
        raise ZooError(f"{at}.kv_bytes_per_token: {entry['kv_bytes_per_token']} is not float32 keys + values over "
                        f"its {len(dec['layers'])} layers (8 * sum(kv_heads * head_dim) = {want})")
    for acc, ppl in (("test_acc", "test_perplexity"), ("val_acc", "val_perplexity")):
        if acc in entry and ppl in entry and not math.isclose(entry[acc], 100 / entry[ppl], rel_tol=PERPLEXITY_RTOL):
            raise ZooError(f"{at}.{acc}: {entry[acc]:g} is not 100 / {ppl} ({100 / entry[ppl]:g})")
    vocab, gen = entry["output"]["vocab_size"], manifest["generation"]
    ids = [("eos_token_id", i) for i in gen["eos_token_id"]] + [("pad_token_id", gen["pad_token_id"])]
    ids += [("bos_token_id", gen["bos_token_id"])] if gen["bos_token_id"] is not None else []
    for key, i in ids:
        if i >= vocab:
            raise ZooError(f"{at}: generation.{key} {i} is outside the vocabulary of {entry['name']!r} "
                            f"(vocab_size {vocab})")


def _check_decoder_zoo(manifest: dict, where: str, files: set) -> None:
    """The header blocks of a decoder zoo against each other: a bos token when add_bos, a tokenizer file that is
    not also a model's."""
    gen, tok = manifest["generation"], manifest["tokenizer"]
    if gen["add_bos"] and gen["bos_token_id"] is None:
        raise ZooError(f"{where}: generation.add_bos is true but bos_token_id is null (expected the id to prepend)")
    if tok["file"] in files:
        raise ZooError(f"{where}: tokenizer.file {tok['file']!r} is also a model's file")


DECODER_KIND = ManifestKind("generate", "decoder zoos", (DECODER_SCHEMA_VERSION, DECODER_SCHEMA_VERSION),
                            DECODER_MODEL, DECODER_VARIANT, DECODER_LATENCY, DECODER_PRECISIONS,
                            _check_decoder_model, DECODER_VARIANT_KEYS, rejected=DECODER_REJECTED, top=DECODER_TOP,
                            hints=_DECODER_EXPECTED, cascades=False, check_zoo=_check_decoder_zoo,
                            files=lambda manifest: [("tokenizer", manifest["tokenizer"])])
KINDS_BY_ENTRY[DECODER_KIND.entry] = DECODER_KIND
