"""Triton kernels of klas, kept outside the ``klas`` package so that importing klas never imports Triton.

``klas.ops`` imports these lazily, only for CUDA tensors or under ``TRITON_INTERPRET=1`` (CPU interpreter).
"""
