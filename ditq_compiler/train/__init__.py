"""Training of the quantized graph: quantization-aware distillation and AMPN mixed precision (RobuQ)."""

from ditq_compiler.train.distill import Distiller, distill
from ditq_compiler.train.mixed_precision import Allocation, allocate, choose_activation_bits

__all__ = ["Allocation", "Distiller", "allocate", "choose_activation_bits", "distill"]
