"""Compute kernels that back quantized layers at run time, built from C on first use (see ``build``).

``binary_cpu``: 1-bit XNOR-popcount linear and conv2d for W1A1 layers, with their torch reference.
Importing this package registers the ``ditq_kernels::`` custom ops; nothing is compiled until a
kernel first runs.
"""

from ditq_compiler.kernels.binary_cpu import (
    binary_conv2d,
    binary_linear,
    kernel_info,
    pack_conv_weight,
    pack_signs,
    reference_binary_conv2d,
    reference_binary_linear,
    reference_signs,
)

__all__ = ["binary_conv2d", "binary_linear", "kernel_info", "pack_conv_weight", "pack_signs",
           "reference_binary_conv2d", "reference_binary_linear", "reference_signs"]
