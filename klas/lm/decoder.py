"""A (stitched) causal LM as a decoder with a KV cache: the function every LM zoo file computes.

``CachedDecoder(net)`` runs ``input_ids``, ``attention_mask``, ``position_ids`` and one past key / value pair per
layer to ``logits`` and the present pairs -- the I/O optimum names for decoders with past
(``past_key_values.N.key`` / ``present.N.key``). A stitched model's layers come from two anchors, so each layer keeps
its own head dim, KV-head count, rotary embedding and attention implementation: the cache is a list of pairs of
different shapes, not one tensor.

The HF decoder layers are called, not copied: each gets a one-layer cache object (``_LayerCache``) whose ``update``
concatenates the past it was given with the new keys and values and keeps the result, which is all HF's attention
asks of a cache. The mask is built here, once per call, from ``attention_mask`` (left padding) and causality in cache
order; position ids come from the caller (the runtime: cumulative sum of the mask), as in optimum's exports.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from klas.lm.view import _is_sliding, _kv_heads, head_dim

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
PAST_KEY, PAST_VALUE = "past_key_values.{i}.key", "past_key_values.{i}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{i}.key", "present.{i}.value"


class _LayerCache:
    """What HF's attention calls on a cache for one layer: ``update(k, v, layer_idx, ...)`` -> the keys and values
    to attend over (past + new), kept as this call's present."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key, self.value = key, value

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx=None, *args, **kwargs):
        self.key = torch.cat([self.key, key], dim=-2)
        self.value = torch.cat([self.value, value], dim=-2)
        return self.key, self.value


class _Layer(nn.Module):
    """One decoder layer with the anchor it came from: its rotary embedding and mask rule."""

    def __init__(self, layer: nn.Module, rotary: nn.Module, config, index: int):
        super().__init__()
        self.layer, self.rotary = layer, rotary
        self.sliding_window = getattr(config, "sliding_window", None) if _is_sliding(config, index) else None
        self.kv_heads, self.head_dim = _kv_heads(config), head_dim(config)
        params = inspect.signature(layer.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.x renamed it

    def forward(self, h, mask, position_ids, past_key, past_value):
        cache = _LayerCache(past_key, past_value)
        cos_sin = self.rotary(h, position_ids=position_ids)
        out = self.layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin,
                         use_cache=True, **{self._cache_arg: cache})
        out = out[0] if isinstance(out, tuple) else out
        return out, cache.key, cache.value


def decoder_mask(attention_mask: torch.Tensor, seq: int, dtype: torch.dtype,
                 sliding_window: int | None = None) -> torch.Tensor:
    """The additive mask [B, 1, seq, total] over cache slots: query t (slot total - seq + t) sees slot s when
    s <= its own slot, the slot is not padding, and (sliding window) s is within the window; every query sees its own
    slot, so a padding row never has an empty softmax (its output is ignored)."""
    total = attention_mask.shape[-1]
    slots = torch.arange(total, device=attention_mask.device)
    q, s = torch.arange(total - seq, total, device=attention_mask.device)[:, None], slots[None, :]
    allowed = (s <= q) & attention_mask[:, None, None, :].bool()
    if sliding_window is not None:
        allowed = allowed & (s > q - int(sliding_window))
    allowed = allowed | (s == q)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.full_like(zero, torch.finfo(dtype).min))


class CachedDecoder(nn.Module):
    """``net`` (a ``klas.stitch.StitchedNet`` over two ``CausalLMView`` s, or one anchor) as the cached decoder
    ``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``; ``past`` / ``present`` alternate
    key, value per layer, in layer order."""

    def __init__(self, net):
        super().__init__()
        src, tgt = net.src, net.tgt
        if net.layer is None:
            pieces = [(src, k) for k in range(src.depth)]
            self.stitch_at = None
        else:
            pieces = [(src, k) for k in range(net.i + 1)] + [(tgt, k) for k in range(net.j + 1, tgt.depth)]
            self.stitch_at = net.i + 1
        self.embed = src.model.model.embed_tokens
        self.stitch = net.layer
        self.layers = nn.ModuleList(_Layer(v.model.model.layers[k], v.model.model.rotary_emb, v.model.config, k)
                                    for v, k in pieces)
        self.norm, self.lm_head = tgt.model.model.norm, tgt.model.lm_head
        self.vocab_size = int(tgt.model.config.vocab_size)

    @property
    def layer_shapes(self) -> list[dict]:
        """Per layer the cache's KV-head count and head dim (the manifest's ``decoder.layers``)."""
        return [dict(kv_heads=m.kv_heads, head_dim=m.head_dim) for m in self.layers]

    def input_names(self) -> list[str]:
        return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS] + [
            n.format(i=i) for i in range(len(self.layers)) for n in (PAST_KEY, PAST_VALUE)]

    def output_names(self) -> list[str]:
        return [LOGITS] + [n.format(i=i) for i in range(len(self.layers)) for n in (PRESENT_KEY, PRESENT_VALUE)]

    def empty_past(self, batch: int, past: int = 0, dtype=torch.float32, generator=None) -> list[torch.Tensor]:
        """Past pairs of length ``past`` (zeros, or random with ``generator``), in input order."""
        out = []
        for m in self.layers:
            shape = (batch, m.kv_heads, past, m.head_dim)
            for _ in range(2):
                out.append(torch.randn(shape, generator=generator, dtype=dtype) if generator is not None
                           else torch.zeros(shape, dtype=dtype))
        return out

    def forward(self, input_ids, attention_mask, position_ids, *past):
        if len(past) != 2 * len(self.layers):
            raise ValueError(f"expected {2 * len(self.layers)} past tensors (key, value per layer), got {len(past)}")
        h = self.embed(input_ids)
        seq = input_ids.shape[1]
        masks: dict = {}
        presents = []
        for k, layer in enumerate(self.layers):
            if k == self.stitch_at:
                h = self.stitch(h)
            w = layer.sliding_window
            if w not in masks:
                masks[w] = decoder_mask(attention_mask, seq, h.dtype, w)
            h, key, value = layer(h, masks[w], position_ids, past[2 * k], past[2 * k + 1])
            presents += [key, value]
        if self.stitch_at == len(self.layers):  # stitched straight into the target's head (no target layer left)
            h = self.stitch(h)
        return (self.lm_head(self.norm(h)), *presents)


def positions(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Position ids of the last ``seq`` slots: the count of real tokens before each, as the runtime computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
