"""Int8 GEMM kernels available to the torch backend on this machine, against fp32.

Times one DiT-XL-sized linear (tokens x 1152 -> 4608 by default) with:
  fp32            torch.nn.functional.linear
  torch._int_mm   int8 x int8 -> int32 (the kernel the torch backend uses on CUDA)
  fbgemm u8s8     quantized::linear_with_input_q_dq_qweight_dq_output_fp32 (the CPU kernel)
and checks each integer kernel against exact integer arithmetic for W8A8 and W7A8 codes, in
units of one product step s_a * max(s_w), on inputs kept off rounding ties (the kernel rounds
x * (1/s_a), the reference x / s_a; at an exact tie they may differ by one activation step).
The "pair bound" column is the largest int16 pair sum AVX2 FBGEMM could reach (limit 32767).
Prints a table and writes JSON.

    python bench/int8_gemm.py [--tokens 512 --in-features 1152 --out-features 4608 --repeats 9]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ditq_compiler.atomic import write_text
from ditq_compiler.backends.torch import Int8Linear, pair_sum_bound


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    return [f for f in wanted if f in flags]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--in-features", type=int, default=1152)
    parser.add_argument("--out-features", type=int, default=4608)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", default="bench/results/int8_gemm.json")
    args = parser.parse_args()
    m, k, n = args.tokens, args.in_features, args.out_features
    gen = torch.Generator().manual_seed(0)

    weight = torch.randn(n, k, generator=gen)
    a_scale = 4.0 / 127
    jitter = torch.rand(m, k, generator=gen) * 0.8 - 0.4  # keeps x / s_a off rounding ties
    x = (torch.clamp(torch.round(torch.randn(m, k, generator=gen) / a_scale), -128, 127) + jitter) * a_scale
    rows = []
    for w_bits in (8, 7):
        qmax = 2 ** (w_bits - 1) - 1
        w_scale = weight.abs().amax(1) / qmax
        codes = torch.clamp(torch.round(weight / w_scale[:, None]), -qmax - 1, qmax).to(torch.int8)
        module = Int8Linear(codes, w_scale, None, torch.tensor(a_scale), torch.tensor(0), 8)
        x_codes = torch.clamp(torch.round(x / a_scale), -128, 127)
        exact = (x_codes.double() @ codes.double().t()) * a_scale * w_scale.double()
        step = a_scale * float(w_scale.max())
        error = float((module(x).double() - exact).abs().max()) / step
        ms = median_ms(lambda m_=module: m_(x), args.repeats)
        rows.append({"kernel": "fbgemm u8s8", "weights": f"int{w_bits}", "ms": ms, "max_error_steps": error,
                     "pair_bound": pair_sum_bound(codes, 127)})
    a8 = torch.clamp(torch.round(x / a_scale), -128, 127).to(torch.int8)
    b8 = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8)
    int_mm_ms = median_ms(lambda: torch._int_mm(a8, b8), max(1, args.repeats // 3))
    int_mm_exact = bool(torch.equal(torch._int_mm(a8, b8), (a8.int() @ b8.int())))
    rows.append({"kernel": "torch._int_mm", "weights": "int8", "ms": int_mm_ms,
                 "max_error_steps": 0.0 if int_mm_exact else float("nan")})
    fp32_ms = median_ms(lambda: torch.nn.functional.linear(x, weight), args.repeats)
    rows.insert(0, {"kernel": "fp32 linear", "weights": "fp32", "ms": fp32_ms, "max_error_steps": 0.0})

    print(f"GEMM {m}x{k} -> {n}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU flags {cpu_flags()}")
    print(f"{'kernel':16s} {'weights':8s} {'median ms':>10s} {'vs fp32':>8s} {'max err (steps)':>16s} "
          f"{'pair bound':>10s}")
    for row in rows:
        row["speedup_vs_fp32"] = fp32_ms / row["ms"]
        print(f"{row['kernel']:16s} {row['weights']:8s} {row['ms']:10.2f} {row['speedup_vs_fp32']:7.2f}x "
              f"{row['max_error_steps']:16.3g} {row.get('pair_bound', '-'):>10}")
    result = {"shape": [m, k, n], "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(), "rows": rows}
    path = write_text(args.json, json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
