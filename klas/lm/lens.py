"""Probes over the vocabulary: lenses (nostalgebraist's logit lens; Belrose et al. 2023's tuned lens).

A full d x V linear probe per layer is too big for 32k-128k vocabularies, so a lens reads layer k's residual
stream through the anchor's OWN frozen final norm and unembedding: ``logits_k = head(h_k + delta_k(h_k))``.

* ``tuned`` (default): ``delta_k(h) = A_k h + b_k``, a d x d affine map per layer, zero-initialised (so training
  starts at the logit lens), trained on KL(anchor's final distribution || lens distribution);
* ``lowrank``: ``delta_k(h) = U_k (V_k h) + b_k`` of rank ``lens_rank`` (U zero-initialised);
* ``logit``: no parameters, ``delta_k = 0``.

Every kind folds to one affine map (``folded()``: W = I + A, b) on the raw stream, saved like the linear probes
(``<anchor>/<k>.weight|bias``), so the scores stage reads them all the same way.
"""
from __future__ import annotations

import zlib

import torch
import torch.nn as nn

from klas.errors import KlasError

LENSES = ("tuned", "logit", "lowrank")


def _frozen(module: nn.Module, *args):
    """``module(*args)`` with its parameters detached: gradients reach the lens's input, never the anchor."""
    return torch.func.functional_call(module, {n: p.detach() for n, p in module.named_parameters()}, args)


class LensProbes(nn.Module):
    """The lenses of ONE anchor; ``forward(feats)`` maps every layer's stream [..., d] to logits [depth, ..., V]."""

    def __init__(self, view, kind: str = "tuned", rank: int = 16, seed: int = 0):
        super().__init__()
        if kind not in LENSES:
            raise KlasError(f"probes.lens = {kind!r}: expected one of {', '.join(LENSES)}")
        self.anchor, self.kind, self.depth = view.name, kind, view.depth
        self._view = (view,)  # NOTE: a tuple, not a submodule: the anchor stays out of the probes' state and optimizer
        d = view.widths
        self.widths = list(d)
        if kind == "tuned":
            self.maps = nn.ModuleList(nn.Linear(c, c) for c in d)
            for m in self.maps:
                nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)
        elif kind == "lowrank":
            self.down = nn.ModuleList(nn.Linear(c, rank, bias=False) for c in d)
            self.up = nn.ModuleList(nn.Linear(rank, c) for c in d)
            for k, (dn, up) in enumerate(zip(self.down, self.up)):
                g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{view.name}:{k}".encode()))
                with torch.no_grad():
                    dn.weight.normal_(0.0, dn.in_features ** -0.5, generator=g)
                nn.init.zeros_(up.weight), nn.init.zeros_(up.bias)

    def delta(self, k: int, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "tuned":
            return self.maps[k](h)
        if self.kind == "lowrank":
            return self.up[k](self.down[k](h))
        return torch.zeros_like(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        v = self._view[0]
        return _frozen(v.model.lm_head, _frozen(v.model.model.norm, h))

    def layer_logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.head(h + self.delta(k, h))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.layer_logits(k, h) for k, h in enumerate(feats)])

    def target(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The anchor's own final logits (its last layer through its head): what the lenses are trained towards."""
        return self.head(feats[-1])

    @torch.no_grad()
    def folded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(W, b) per layer with ``lens_k(h) = head(W h + b)``."""
        out = []
        for k, c in enumerate(self.widths):
            eye = torch.eye(c, dtype=next(self.parameters(), torch.empty(0)).dtype)
            if self.kind == "tuned":
                out.append((eye + self.maps[k].weight, self.maps[k].bias.clone()))
            elif self.kind == "lowrank":
                out.append((eye + self.up[k].weight @ self.down[k].weight, self.up[k].bias.clone()))
            else:
                out.append((eye, torch.zeros(c)))
        return out


class FoldedLens(nn.Module):
    """Trained lenses read back from a probes file: ``head(W_k h + b_k)`` per layer."""

    def __init__(self, view, maps: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.anchor, self.depth = view.name, view.depth
        self._view = (view,)
        self.maps = nn.ModuleList()
        for w, b in maps:
            lin = nn.Linear(w.shape[1], w.shape[0], dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w), lin.bias.copy_(b)
            self.maps.append(lin)

    head = LensProbes.head
    target = LensProbes.target
    forward = LensProbes.forward

    def layer_logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.maps[k](h))


def new_lenses(family, cfg, seed: int) -> dict[str, LensProbes]:
    return {v.name: LensProbes(v, cfg.lens, cfg.lens_rank, seed) for v in family}


def lens_from_tensors(view, tensors: dict, where: str) -> FoldedLens:
    maps = []
    for k in range(view.depth):
        w, b = tensors.get(f"{view.name}/{k}.weight"), tensors.get(f"{view.name}/{k}.bias")
        if w is None or b is None:
            raise KlasError(f"{where}: no lens {view.name}/{k} for anchor {view.name!r}; rerun `klas probe`")
        if tuple(w.shape) != (view.widths[k], view.widths[k]):
            raise KlasError(f"{where}: lens {view.name}/{k} is {tuple(w.shape)}, the anchor's stream is "
                            f"{view.widths[k]} wide; rerun `klas probe`")
        maps.append((w, b))
    return FoldedLens(view, maps)


def rows_per_chunk(family, memory_mb: int) -> int:
    """Token rows whose logits fit ``memory_mb``, per row: every anchor's lens and head logits (float32), the heads
    stacked once more for the anchors' KL, and four [V] temporaries (one layer's logits being made, the entropy's
    log-softmax, its exp and their product), x 1.5 for what the allocator keeps of freed temporaries (measured by
    ``benchmarks/lm_scores_memory.py``)."""
    v_size = max(v.vocab_size for v in family)
    per_row = 6 * v_size * (sum(v.depth + 1 for v in family) + len(family) + 4)
    return max(1, int(memory_mb * 2 ** 20) // per_row)


@torch.no_grad()
def score_chunks(family, nets: dict, x: torch.Tensor, memory_mb: int):
    """Per chunk of token rows of batch ``x``: per anchor [depth + 1, rows, V] (its lenses, then its head).

    The chunks are views of one buffer per anchor, kept on its lens and reused by every chunk of every batch (so a
    consumer still holding the previous chunk never doubles the memory): use a chunk before taking the next."""
    streams = {}
    for v in family:
        h = v.forward_stem(x)
        outs = []
        for blk in v.blocks:
            h = blk(h)
            outs.append(h.reshape(-1, h.shape[-1]))  # [B * T, d]: every token is one sample of the KL means
        streams[v.name] = outs
    n_rows = next(iter(streams.values()))[0].shape[0]
    step = rows_per_chunk(family, memory_mb)
    for s in range(0, n_rows, step):
        logits = {}
        for v in family:
            outs = [o[s:s + step] for o in streams[v.name]]
            net = nets[v.name]
            ws = getattr(net, "_score_buffer", None)
            if ws is None or ws.shape[1] < len(outs[0]) or ws.shape[2] != v.vocab_size:
                net._score_buffer = ws = torch.empty(v.depth + 1, min(step, n_rows), v.vocab_size)
            buf = ws[:, :len(outs[0])]  # filled layer by layer: no stacked copies
            for k, h in enumerate(outs):
                buf[k] = net.layer_logits(k, h)
            buf[-1] = v.forward_head(outs[-1])
            logits[v.name] = buf
        yield logits, None
