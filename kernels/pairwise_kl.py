"""Triton kernel: all-pairs softmax KL, mean_n KL(softmax(a[i, n] / T) || softmax(b[j, n] / T)), summed over n.

Inputs are logits a [nA, N, C] and b [nB, N, C] (float32, float16 or bfloat16; classes contiguous, rows and samples
strided). One program owns a tile of BLOCK_I x BLOCK_J (a row, b row) pairs and a contiguous run of samples; for
each sample it

  1. streams the classes in tiles of BLOCK_C, keeping an online row max ``m`` and sum ``z = sum exp((x - m) / T)``
     for its a rows and its b rows (log-softmax of both sides, fused, stable for large logits);
  2. streams the classes again (from L2) and accumulates, in float32, the direct form
     ``sum_c p_ic * (la_ic - lb_jc)`` with ``la = (x - m) / T - log z`` and ``p = exp(la)``.

The max is subtracted before dividing by T so that (x - m) is exact for the classes that carry the probability mass:
that is what keeps KL values of 1e-7 (near-identical distributions, logits of magnitude 50) accurate in float32.
The product form ``sum p log p - p @ log q^T`` would use tensor cores but cancels catastrophically there.
Partial sums go to ``out[chunk, i, j]`` (float32) and are added in float64 by the launcher.

The ``@triton.jit`` is applied lazily (``_kernel``), so importing this module needs no GPU and the interpreter
(``TRITON_INTERPRET=1``, CPU tensors) is honoured even when it is switched on after import.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl


def _pairwise_kl_body(a_ptr, b_ptr, out_ptr, n_a, n_b, n_samples, n_classes,
                      a_stride_row, a_stride_sample, b_stride_row, b_stride_sample, inv_t,
                      samples_per_program, tiles_j, pair_tiles,
                      BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    chunk = pid // pair_tiles  # pair tiles vary fastest: programs running together share samples (L2 reuse)
    tile = pid % pair_tiles
    rows_i = (tile // tiles_j) * BLOCK_I + tl.arange(0, BLOCK_I)
    rows_j = (tile % tiles_j) * BLOCK_J + tl.arange(0, BLOCK_J)
    valid_i = rows_i < n_a
    valid_j = rows_j < n_b
    a_rows = a_ptr + rows_i.to(tl.int64)[:, None] * a_stride_row
    b_rows = b_ptr + rows_j.to(tl.int64)[:, None] * b_stride_row
    offs_c = tl.arange(0, BLOCK_C)

    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    n_start = chunk * samples_per_program
    n_end = tl.minimum(n_start + samples_per_program, n_samples)
    a_n = a_rows + n_start.to(tl.int64) * a_stride_sample  # pointers advance by one sample per iteration
    b_n = b_rows + n_start.to(tl.int64) * b_stride_sample
    for _ in range(n_start, n_end):
        # Pass 1: online max and sum of exp per row, both sides.
        # Rows past the end start at max 0 instead of -inf: they stay finite (no nan) and are never stored.
        m_a = tl.where(valid_i, float("-inf"), 0.0)
        z_a = tl.zeros([BLOCK_I], dtype=tl.float32)
        m_b = tl.where(valid_j, float("-inf"), 0.0)
        z_b = tl.zeros([BLOCK_J], dtype=tl.float32)
        for c0 in range(0, n_classes, BLOCK_C):
            cols = c0 + offs_c
            mask_a = valid_i[:, None] & (cols < n_classes)[None, :]
            mask_b = valid_j[:, None] & (cols < n_classes)[None, :]
            xa = tl.load(a_n + cols[None, :], mask=mask_a, other=float("-inf")).to(tl.float32)
            xb = tl.load(b_n + cols[None, :], mask=mask_b, other=float("-inf")).to(tl.float32)
            new_a = tl.maximum(m_a, tl.max(xa, axis=1))
            new_b = tl.maximum(m_b, tl.max(xb, axis=1))
            z_a = z_a * tl.exp((m_a - new_a) * inv_t) + tl.sum(tl.exp((xa - new_a[:, None]) * inv_t), axis=1)
            z_b = z_b * tl.exp((m_b - new_b) * inv_t) + tl.sum(tl.exp((xb - new_b[:, None]) * inv_t), axis=1)
            m_a = new_a
            m_b = new_b
        log_z_a = tl.log(tl.where(valid_i, z_a, 1.0))
        log_z_b = tl.log(tl.where(valid_j, z_b, 1.0))
        # Pass 2: direct-form pairwise reduction. Padding (missing rows or classes) gets p = 0 (its la, lb are finite).
        for c0 in range(0, n_classes, BLOCK_C):
            cols = c0 + offs_c
            mask_a = valid_i[:, None] & (cols < n_classes)[None, :]
            mask_b = valid_j[:, None] & (cols < n_classes)[None, :]
            xa = tl.load(a_n + cols[None, :], mask=mask_a, other=0.0).to(tl.float32)
            xb = tl.load(b_n + cols[None, :], mask=mask_b, other=0.0).to(tl.float32)
            la = (xa - m_a[:, None]) * inv_t - log_z_a[:, None]
            lb = (xb - m_b[:, None]) * inv_t - log_z_b[:, None]
            pa = tl.where(mask_a, tl.exp(la), 0.0)
            acc += tl.sum(pa[:, None, :] * (la[:, None, :] - lb[None, :, :]), axis=2)
        a_n += a_stride_sample
        b_n += b_stride_sample

    out = out_ptr + chunk.to(tl.int64) * n_a * n_b + rows_i[:, None] * n_b + rows_j[None, :]
    tl.store(out, acc, mask=valid_i[:, None] & valid_j[None, :])


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel; ``interpret`` keys the cache because triton.jit reads TRITON_INTERPRET when applied."""
    del interpret
    return triton.jit(_pairwise_kl_body)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


# Tiles where ptxas (Triton 3.8's, for sm_90) spills a few bytes at the default warp count in fp32, fp16 or bf16,
# and the warp count that compiles spill-free in all three: measured by benchmarks/gpu_static.py, re-checked for
# every launcher configuration by tests/test_gpu_static.py (no pattern in tile size predicts them).
_SPILL_FREE_WARPS = {
    (2, 2, 2048): 2, (2, 4, 32): 2, (2, 4, 1024): 2, (2, 8, 16): 2, (2, 8, 64): 2, (2, 16, 8): 2, (2, 16, 64): 2,
    (2, 32, 4): 2, (2, 32, 32): 2, (4, 2, 32): 2, (4, 2, 512): 2, (4, 32, 16): 2, (8, 2, 16): 2, (8, 2, 256): 4,
    (8, 4, 64): 2, (8, 4, 128): 4, (16, 2, 128): 4, (16, 4, 32): 8, (16, 4, 128): 4, (32, 2, 32): 2,
    (32, 4, 32): 2, (32, 4, 64): 4, (16, 16, 32): 2,
}


def _launch_config(n_a: int, n_b: int, n: int, c: int, device: torch.device) -> dict:
    """Tile sizes and sample chunking: pair tiles up to 32 x 32, BLOCK_C so a [I, J, C] tile stays <= 8K values,
    and about four programs per SM (one program per pair tile in the interpreter, where programs run serially)."""
    block_i = min(32, max(2, triton.next_power_of_2(n_a)))
    block_j = min(32, max(2, triton.next_power_of_2(n_b)))
    block_c = max(4, min(triton.next_power_of_2(c), 8192 // (block_i * block_j)))
    tiles_j = triton.cdiv(n_b, block_j)
    pair_tiles = triton.cdiv(n_a, block_i) * tiles_j
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = pair_tiles
    chunks = max(1, min(n, target // pair_tiles))
    samples_per_program = triton.cdiv(n, chunks)
    chunks = triton.cdiv(n, samples_per_program)
    return dict(block_i=block_i, block_j=block_j, block_c=block_c, tiles_j=tiles_j, pair_tiles=pair_tiles,
                chunks=chunks, samples_per_program=samples_per_program,
                num_warps=_SPILL_FREE_WARPS.get((block_i, block_j, block_c),
                                                8 if block_i * block_j * block_c >= 4096 else 4))


def pairwise_kl_sum_triton(a: torch.Tensor, b: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Sum over samples of KL(softmax(a[i, n] / T) || softmax(b[j, n] / T)) as float64 [nA, nB].

    ``b=None`` scores a against itself. Inputs must be validated by the caller (klas.ops): same dtype and
    device, finite temperature > 0. Non-finite logits surface as inf/nan entries of the result.
    """
    if a.device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError("the Triton pairwise KL kernel needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    b_t = a if b is None else b
    a = a if a.shape[2] <= 1 or a.stride(2) == 1 else a.contiguous()
    b_t = a if b is None else (b_t if b_t.shape[2] <= 1 or b_t.stride(2) == 1 else b_t.contiguous())
    n_a, n, c = a.shape
    n_b = b_t.shape[0]
    if min(n_a, n_b, n, c) == 0:
        return torch.zeros(n_a, n_b, dtype=torch.float64, device=a.device)
    cfg = _launch_config(n_a, n_b, n, c, a.device)
    partial = torch.empty(cfg["chunks"], n_a, n_b, dtype=torch.float32, device=a.device)
    grid = (cfg["chunks"] * cfg["pair_tiles"],)
    with torch.cuda.device(a.device) if a.device.type == "cuda" else contextlib.nullcontext():
        _kernel(interpreter_enabled())[grid](
            a, b_t, partial, n_a, n_b, n, c, a.stride(0), a.stride(1), b_t.stride(0), b_t.stride(1),
            1.0 / temperature, cfg["samples_per_program"], cfg["tiles_j"], cfg["pair_tiles"],
            BLOCK_I=cfg["block_i"], BLOCK_J=cfg["block_j"], BLOCK_C=cfg["block_c"], num_warps=cfg["num_warps"])
    return partial.sum(0, dtype=torch.float64)

