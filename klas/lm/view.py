"""A block view over Hugging Face causal LMs (``LlamaForCausalLM`` and its same-structure siblings Qwen2 / Mistral).

stem = ``model.model.embed_tokens`` on int64 ids [B, T]; one block per decoder layer ``model.model.layers[k]``, on
hidden states [B, T, d]; head = ``model.model.norm`` + ``model.lm_head`` (logits [B, T, vocab]). Every block output
is the residual stream, so ``klas.stitch.StitchedNet`` stitches two LMs with a per-token linear map, unchanged.

Each block builds what HF's ``LlamaModel.forward`` builds once for all layers -- position ids 0..T-1, the rotary
(cos, sin) and the causal (or sliding-window) mask -- from its *own* model's rotary embedding and config, because two
anchors may differ in width, head dim, KV-head count, rope base and attention implementation. The HF decoder layer
itself is called, not copied.

Costs are per token at the view's context length T (``input_shape = (T,)``): block shapes are ``(d,)``, so a
stitch layer costs ``2 * d_src * d_tgt`` per token and ``klas.families.blockview.stitched_flops`` is per token too.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn

from klas.errors import KlasError
from klas.families.blockview import BlockInfo, BlockView, count_flops, register_view


def head_dim(config) -> int:
    """Per-head width: the config's ``head_dim`` where set (it may differ from hidden/heads), else hidden/heads."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _kv_heads(config) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def layer_flops_per_token(config, context_length: int) -> int:
    """FLOPs per token of one decoder layer at context T (2 per MAC, biases and norms not counted, as
    ``torch.utils.flop_counter`` counts): q/k/v/o projections (GQA: k, v have the KV heads), the gated MLP's three
    matrices, and attention scores + values over the full T x T (the counter's SDPA convention: no causal halving)."""
    d, hd, h, kv = int(config.hidden_size), head_dim(config), int(config.num_attention_heads), _kv_heads(config)
    inter = int(config.intermediate_size)
    proj = 2 * d * h * hd + 2 * 2 * d * kv * hd + 2 * h * hd * d
    mlp = 3 * 2 * d * inter
    attn = 2 * 2 * h * hd * int(context_length)  # per query token: q.k over T keys, then p.v over T values
    return proj + mlp + attn


def head_flops_per_token(config) -> int:
    """FLOPs per token of the LM head (the final norm is not counted)."""
    return 2 * int(config.hidden_size) * int(config.vocab_size)


def flops_per_token(config, context_length: int) -> int:
    """Analytic FLOPs per token of the whole model at context T (embedding lookups cost 0)."""
    return int(config.num_hidden_layers) * layer_flops_per_token(config, context_length) + head_flops_per_token(config)


def _is_sliding(config, index: int) -> bool:
    """Whether decoder layer ``index`` attends in a sliding window, as HF's model forward decides: Qwen2-style
    ``layer_types`` per layer, else Mistral-style one ``sliding_window`` for all (Llama has neither)."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[index] == "sliding_attention"
    return getattr(config, "sliding_window", None) is not None


class DecoderBlock(nn.Module):
    """One HF decoder layer as a function of hidden states [B, T, d]: positions 0..T-1, the model's own rotary and
    causal mask, no cache."""

    def __init__(self, layer: nn.Module, rotary: nn.Module, config, index: int):
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        self.config = config
        self.index = index
        self.sliding = _is_sliding(config, index)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        cos_sin = self.rotary(h, position_ids=pos)
        make_mask = create_sliding_window_causal_mask if self.sliding else create_causal_mask
        # NOTE: built from this anchor's config, so it follows its attention implementation (eager: an additive
        # [B, 1, T, T] mask; sdpa: None and is_causal) -- the same call HF's model forward makes
        mask = make_mask(config=self.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=pos)
        out = self.layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin, use_cache=False)
        return out[0] if isinstance(out, tuple) else out  # transformers 5 returns a tensor, 4.x a 1-tuple

    def extra_repr(self) -> str:
        return f"index={self.index}, sliding={self.sliding}"


class _LMLogits(nn.Module):
    """The untouched HF model as ids -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


class CausalLMView(BlockView):
    """Block view of a HF causal LM; ``input_shape = (T,)`` is the context length its per-token costs are stated at."""

    channels_last = True
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __init__(self, model: nn.Module, name: str, input_shape: tuple[int]):
        shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else (input_shape,)
        if len(shape) != 1 or int(shape[0]) < 1:
            raise KlasError(f"model {name!r} ({type(model).__name__}): a causal LM is measured at input_shape (T,), "
                            f"one context length >= 1; got {input_shape!r}")
        super().__init__(model, name, shape)

    def _blocks(self):
        inner = self.model.model
        return [(f"model.layers.{k}", 0, DecoderBlock(layer, inner.rotary_emb, self.model.config, k))
                for k, layer in enumerate(inner.layers)]

    def forward_stem(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids)

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(h))

    # --- LM facts ---
    @property
    def config(self):
        return self.model.config

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def context_length(self) -> int:
        return int(self.input_shape[0])

    @property
    def original(self) -> nn.Module:
        """The untouched HF model as a module ids -> logits (its own forward, not the block decomposition)."""
        return _LMLogits(self.model)

    def example_input(self, batch: int, seed: int = 0) -> torch.Tensor:
        """Random int64 token ids [batch, T] in [0, vocab_size) (CPU, seeded)."""
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.vocab_size, (batch, self.context_length), generator=g, dtype=torch.int64)

    def layer_kv_bytes(self, k: int, dtype_bytes: int = 4) -> int:
        """KV-cache bytes per token of decoder layer ``k`` (keys + values of its KV heads)."""
        if not -self.depth <= k < self.depth:
            raise IndexError(f"{self.name}: layer {k} out of range (0..{self.depth - 1})")
        cfg = self.model.config
        return 2 * _kv_heads(cfg) * head_dim(cfg) * int(dtype_bytes)

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """KV-cache bytes per token of the whole model (a stitch sums its source's and target's used layers)."""
        return sum(self.layer_kv_bytes(k, dtype_bytes) for k in range(self.depth))

    @torch.no_grad()
    def _measure(self) -> None:
        """Per-token FLOPs of stem, every layer and head, counted on one [1, T] batch and divided by T."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        was_training = self.training
        self.eval()
        try:
            p = next(self.model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
            t = self.context_length
            ids = self.example_input(1).to(device)
            # NOTE: torch's flop counter has no formula for the CPU flash kernel SDPA picks (it counts 0); the math
            # backend decomposes into counted matmuls with the same full T x T convention as the GPU kernels' formula
            ctx = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()

            def per_token(f: int) -> int:
                return (f + t // 2) // t

            with ctx:
                stem = count_flops(self.forward_stem, ids)
                h = self.forward_stem(ids)
                infos = []
                for i, blk in enumerate(self.blocks):
                    f = count_flops(blk, h)
                    h = blk(h)
                    infos.append(BlockInfo(i, self.block_names[i], 0, (int(h.shape[-1]),), per_token(f)))
                head = count_flops(self.forward_head, h)
            self.stem_flops, self.head_flops, self.infos = per_token(stem), per_token(head), infos
        finally:
            self.train(was_training)


def register_lm_views() -> None:
    """Register ``CausalLMView`` for LlamaForCausalLM and, where this transformers has them, Qwen2 / Mistral."""
    import transformers

    for cls_name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        try:
            cls = getattr(transformers, cls_name)
        except (AttributeError, ImportError):  # an older/trimmed transformers: skip that family
            continue
        register_view(cls, CausalLMView)


register_lm_views()
