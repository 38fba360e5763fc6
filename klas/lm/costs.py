"""Per-token costs of a language model beyond FLOPs: the KV cache a decoder keeps for every token of its context."""
from __future__ import annotations


def kv_bytes_per_token(net, dtype_bytes: int = 4) -> int:
    """KV-cache bytes per token of an anchor view, or of a stitched network: its source's layers 0..i and its
    target's layers j+1.. (each layer with its own KV-head count and head dim)."""
    src = getattr(net, "src", None)
    if src is None:  # a block view
        return net.kv_bytes_per_token(dtype_bytes)
    if net.layer is None:
        return src.kv_bytes_per_token(dtype_bytes)
    return (sum(src.layer_kv_bytes(k, dtype_bytes) for k in range(net.i + 1))
            + sum(net.tgt.layer_kv_bytes(k, dtype_bytes) for k in range(net.j + 1, net.tgt.depth)))
