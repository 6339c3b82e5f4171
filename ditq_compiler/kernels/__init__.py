"""GPU kernels of the ``cuda`` backend (``ditq_compiler.backends.cuda`` lowers graphs onto them).

* ``triton_w8a8``: int8 W8A8 linear in Triton (``ditq_cuda::w8a8_linear``, ``ditq_cuda::w8a8_linear_codes``).
* ``fp8``: FP8 (e4m3) linear through ``torch._scaled_mm``, with a pure-torch emulation for the CPU.
* ``device``: where they may run, and the error when they may not.

Importing this package imports neither triton nor the kernels; import the submodules.
"""
