"""Where the ``cuda`` backend's kernels may run, and the error when they may not.

The kernels run on CUDA tensors. On the CPU they run only in Triton's interpreter, which
Triton selects once, when ``triton`` is first imported with ``TRITON_INTERPRET=1`` in the
environment (``@triton.jit`` then builds interpreted kernels, and Triton's own library
functions are interpreted too, for the rest of the process). Setting the variable later
changes nothing, so the test is "were our kernels built for the interpreter", not the
variable's current value. In that mode the FP8 layers run their pure-torch emulation
(``ditq_compiler.kernels.fp8``), so a whole lowered model runs on the CPU for tests.
"""

from __future__ import annotations

import os

from torch import Tensor


class CudaBackendError(RuntimeError):
    """A layer lowered for the ``cuda`` backend was called where its kernels cannot run."""


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now (Triton reads it when it is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def needs_cuda(layer: str, x: Tensor, reason: str = "") -> CudaBackendError:
    """The error for layer ``layer`` called with ``x`` where no kernel can run (returned, to raise)."""
    detail = f" ({reason})" if reason else ""
    return CudaBackendError(
        f"layer '{layer}' was compiled for the 'cuda' backend and needs a CUDA device: it was called with a "
        f"{x.device.type} tensor{detail}. Compile with backend='torch' (the reference) or 'torch-int8' to run on "
        "this machine, or re-lower the reference graph (CompiledModel.reference_graph_module) for another "
        "backend. For tests, Triton's interpreter runs these kernels on the CPU when TRITON_INTERPRET=1 is set "
        "before triton is first imported.")


__all__ = ["CudaBackendError", "interpreter_requested", "needs_cuda"]
