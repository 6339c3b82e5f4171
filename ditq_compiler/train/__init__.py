"""Training of the quantized graph: quantization-aware distillation and AMPN mixed precision (RobuQ)."""

from ditq_compiler.train.distill import DistillationResult, Distiller, distill
from ditq_compiler.train.mixed_precision import Allocation, allocate, choose_activation_bits

__all__ = ["Allocation", "DistillationResult", "Distiller", "allocate", "choose_activation_bits", "distill"]
