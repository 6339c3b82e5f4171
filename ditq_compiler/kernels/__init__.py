"""Compute kernels that back quantized layers at run time.

* ``binary_cpu``: 1-bit XNOR-popcount linear and conv2d for W1A1 layers (C, built on first use, see ``build``),
  with their torch reference; registers the ``ditq_kernels::`` custom ops.
* ``triton_w8a8``: int8 W8A8 linear in Triton for the ``cuda`` backend (``ditq_cuda::w8a8_linear``,
  ``ditq_cuda::w8a8_linear_codes``); ``fp8``: FP8 (e4m3) linear through ``torch._scaled_mm``, with a pure-torch
  emulation for the CPU; ``device``: where the GPU kernels may run, and the error when they may not.

Importing this package imports neither triton nor any kernel module, and compiles nothing: import the
submodule a backend needs.
"""
