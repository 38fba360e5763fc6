"""Triton kernels of klas, installed as ``klas.kernels`` (setup.py maps this top-level folder into klas's
namespace; there is no top-level ``kernels`` module). Nothing imports them with klas: importing klas never imports
Triton. ``klas.ops`` imports ``klas.kernels.pairwise_kl`` lazily, only for CUDA tensors or under
``TRITON_INTERPRET=1`` (CPU interpreter).
"""
