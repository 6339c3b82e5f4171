"""1-bit XNOR-popcount kernels (W1A1) against fp32 and int8 FBGEMM on this CPU, at DiT and U-Net shapes.

Shapes:
  fc1   DiT-XL/2's MLP fc1: 512 tokens x 1152 -> 4608.
  conv  unet-digits' widest block (up_blocks.0, 64 channels; zoo/specs.py: block_out_channels (32, 64))
        and its widest 3x3 conv, resnets.0.conv1: 128 -> 64 channels on 4x4 maps, padding 1, batch 200
        (100 samples with classifier-free guidance, which doubles the batch).

Kernels, each on 1 and 2 threads:
  fp32          F.linear / F.conv2d.
  int8 fbgemm   linear: the torch backend's Int8Linear (per-channel int8 weights, static per-tensor u8
                activations: quantize x, u8s8 GEMM, fp32 out). conv: quantized::conv2d with per-channel
                int8 weights (quantize x, conv, requantize to u8, dequantize).
  binary        binary_linear / binary_conv2d from float x: pack x's signs, XNOR-popcount, fp32 epilogue
                (per-row scale, per-column scale, bias): what a W1A1 layer runs (its scales precomputed).
  binary gemm   packed input -> int32 accumulators (the GEMM alone; conv: im2col + GEMM).

Timing: all kernels run interleaved, round after round, in one process (this machine is shared and
noisy: a slow spell hits every kernel, not one); each sample repeats a kernel until it has run
>= --sample-ms; the table gives the median over --rounds rounds. Speed-ups are against fp32 on the
same number of threads.

Popcount peak: a register-only loop of 12 independent popcount chains (`ditq_popcount_probe`: nothing
but vpopcntq on zmm registers, 512 bits each), run 20 times for ~2 ms on 1 and on 2 threads before
and after the rounds; the fastest run is the peak (on a shared machine the fastest run is the one
nobody interrupted). A kernel's rate is M N K (bits of XNOR-popcount work, the real K) per second,
as a fraction of that peak, for its median and its fastest sample. The clock is measured too (a
chain of dependent one-cycle adds), to give the probe's instructions per cycle.

    python bench/binary_gemm.py [--rounds 15 --sample-ms 30 --threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ditq_compiler.atomic import write_text
from ditq_compiler.backends.torch import Int8Linear
from ditq_compiler.kernels import binary_cpu as bc

FC1 = (512, 1152, 4608)
CONV = dict(batch=200, c_in=128, c_out=64, hw=4, kernel=3, padding=1,
            layer="unet-digits up_blocks.0.resnets.0.conv1")


def cpu_summary() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = text.splitlines()

    def field(name):
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(name)), None)

    flags = set((field("flags") or "").split())
    wanted = ("popcnt", "avx2", "avx512f", "avx512_vpopcntdq", "avx512_vnni", "avx512_bitalg")
    return {"model": field("model name") or platform.processor(), "cpus": os.cpu_count(),
            "mhz_cpuinfo": float(field("cpu MHz") or "nan"), "flags": [f for f in wanted if f in flags]}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def quantize_weight_per_channel(w):
    qmax = 127
    scale = w.abs().flatten(1).amax(1).clamp_min(1e-8) / qmax
    codes = torch.clamp(torch.round(w / scale.reshape(-1, *[1] * (w.dim() - 1))), -qmax - 1, qmax)
    return codes.to(torch.int8), scale


def fc1_kernels(gen):
    m, k, n = FC1
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    codes, w_scale = quantize_weight_per_channel(w)
    a_scale = float(x.abs().max()) / 127
    int8 = Int8Linear(codes, w_scale, bias, torch.tensor(a_scale), torch.tensor(0), 8)
    w_packed, _ = bc.pack_signs(w)
    x_packed, _ = bc.pack_signs(x)
    row_scale, col_scale = x.abs().mean(1), w.abs().mean(1)
    work = m * n * k
    return work, {
        "fp32": lambda t: F.linear(x, w, bias),
        "int8 fbgemm": lambda t: int8(x),
        "binary": lambda t: bc.binary_linear(x, w_packed, k, row_scale=row_scale, col_scale=col_scale, bias=bias,
                                             threads=t),
        "binary gemm": lambda t: bc.binary_linear(x_packed, w_packed, k, threads=t),
    }


def conv_kernels(gen):
    b, c, o, hw, kk, p = (CONV[key] for key in ("batch", "c_in", "c_out", "hw", "kernel", "padding"))
    x, w = torch.randn(b, c, hw, hw, generator=gen), torch.randn(o, c, kk, kk, generator=gen)
    bias = torch.randn(o, generator=gen)
    codes, w_scale = quantize_weight_per_channel(w)
    a_scale = float(x.abs().max()) / 127
    y_ref = F.conv2d(x, w, bias, 1, p)
    out_scale = float(y_ref.abs().max()) / 127
    torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wq = torch._make_per_channel_quantized_tensor(codes, w_scale.double(), torch.zeros(o, dtype=torch.long), 0)
        packed = torch.ops.quantized.conv2d_prepack(wq, bias, [1, 1], [p, p], [1, 1], 1)

    def int8(t):
        xq = torch.quantize_per_tensor(x, a_scale, 128, torch.quint8)
        return torch.ops.quantized.conv2d(xq, packed, out_scale, 128).dequantize()

    w_packed = bc.pack_conv_weight(w)
    row_scale, col_scale = torch.rand(b, hw, hw, generator=gen), w.abs().mean((1, 2, 3))
    rows = b * hw * hw
    a, _ = bc.pack_signs(x.permute(0, 2, 3, 1))
    words = kk * kk * a.shape[-1]
    lib = bc._library()

    def gemm_only(t):   # im2col of packed channel words + masked GEMM to int32
        cols, mask = torch.empty(rows, words, dtype=torch.int64), torch.empty(rows, words, dtype=torch.int64)
        valid, out = torch.empty(rows, dtype=torch.int32), torch.empty(rows, o, dtype=torch.int32)
        lib.ditq_binary_im2col(a.data_ptr(), b, hw, hw, a.shape[-1], c, kk, kk, 1, 1, p, p, 1, 1, hw, hw,
                               cols.data_ptr(), mask.data_ptr(), valid.data_ptr(), t)
        w2 = w_packed.reshape(o, -1)
        lib.ditq_binary_gemm(cols.data_ptr(), mask.data_ptr(), valid.data_ptr(), w2.data_ptr(), rows, o, words,
                             kk * kk * c, out.data_ptr(), None, None, None, None, 0, t)
        return out

    assert torch.equal(gemm_only(1).reshape(b, hw, hw, o).permute(0, 3, 1, 2),
                       bc.reference_binary_conv2d(x, w, padding=p))
    work = rows * o * kk * kk * c
    return work, {
        "fp32": lambda t: F.conv2d(x, w, bias, 1, p),
        "int8 fbgemm": int8,
        "binary": lambda t: bc.binary_conv2d(x, w_packed, padding=p, row_scale=row_scale, col_scale=col_scale,
                                             bias=bias, threads=t),
        "binary gemm": gemm_only,
    }


PROBE_ITERS = 500_000   # x 12 chains: 6M popcount instructions, ~2 ms on one core


def popcount_peak(threads: int, repeats: int = 20) -> tuple[float, int]:
    """(fastest popcount instructions per second, bits per instruction) of the probe on ``threads`` threads."""
    path = bc.AVX512 if bc.kernel_info()["cpu_has_avx512_vpopcntdq"] else bc.POPCOUNT
    best, bits = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        count, bits = bc.popcount_probe(PROBE_ITERS, threads, path)
        best = min(best, time.perf_counter() - start)
    return count * threads / best, bits


def calibrate(fn, threads: int, sample_ms: float) -> int:
    torch.set_num_threads(threads)
    fn(threads)
    start = time.perf_counter()
    fn(threads)
    once = time.perf_counter() - start
    return max(1, round(sample_ms / 1e3 / max(once, 1e-6)))


def run_rounds(cases: dict, threads: list[int], rounds: int, sample_ms: float, seed: int) -> dict:
    """cases: name -> fn(threads). Returns name -> threads -> list of seconds per call."""
    order = [(name, t) for name in cases for t in threads]
    reps = {key: calibrate(cases[key[0]], key[1], sample_ms) for key in order}
    times = {key: [] for key in order}
    shuffle = random.Random(seed)
    for r in range(rounds):
        shuffle.shuffle(order)   # no kernel always runs right after the same neighbour
        for name, t in order:
            torch.set_num_threads(t)
            fn, n = cases[name], reps[(name, t)]
            start = time.perf_counter()
            for _ in range(n):
                fn(t)
            times[(name, t)].append((time.perf_counter() - start) / n)
        print(f"\rround {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sample-ms", type=float, default=30.0, help="each timed sample repeats a kernel this long")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/binary_gemm", help="writes OUT.json and OUT.md")
    args = parser.parse_args()

    info = bc.kernel_info()
    if info["path"] == bc.TORCH:
        sys.exit(f"the binary kernels did not build ({info['build_failure']}); nothing to benchmark")
    gen = torch.Generator().manual_seed(args.seed)
    fc1_work, fc1 = fc1_kernels(gen)
    conv_work, conv = conv_kernels(gen)
    cases = {**{("fc1", k): v for k, v in fc1.items()}, **{("conv", k): v for k, v in conv.items()}}
    clock_before = bc.measure_clock_ghz()
    peak_before = {t: popcount_peak(t) for t in args.threads}
    load_before = uptime()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    times = run_rounds(cases, args.threads, args.rounds, args.sample_ms, args.seed)
    load_after = uptime()
    peak_after = {t: popcount_peak(t) for t in args.threads}
    clock_ghz = max(clock_before, bc.measure_clock_ghz())

    med = {key: statistics.median(v) for key, v in times.items()}
    bits_per_instr = peak_before[args.threads[0]][1]
    instr_per_s = {t: max(peak_before[t][0], peak_after[t][0]) for t in args.threads}
    peak = {t: instr_per_s[t] * bits_per_instr for t in args.threads}   # bits per second
    work = {"fc1": fc1_work, "conv": conv_work}
    rows = []
    for shape, kernel in cases:
        for t in args.threads:
            ms = med[((shape, kernel), t)] * 1e3
            row = {"shape": shape, "kernel": kernel, "threads": t, "median_ms": ms,
                   "min_ms": min(times[((shape, kernel), t)]) * 1e3,
                   "speedup_vs_fp32": med[((shape, "fp32"), t)] * 1e3 / ms}
            if kernel.startswith("binary"):
                rate = work[shape] / (ms / 1e3)
                row["gbit_per_s"] = rate / 1e9
                row["fraction_of_popcount_peak"] = rate / peak[t]
                row["fraction_of_popcount_peak_fastest"] = work[shape] / (row["min_ms"] / 1e3) / peak[t]
            rows.append(row)

    m, k, n = FC1
    shapes = {"fc1": f"DiT-XL/2 fc1: {m} tokens x {k} -> {n}",
              "conv": f"{CONV['layer']}: batch {CONV['batch']}, {CONV['c_in']} -> {CONV['c_out']} channels, "
                      f"{CONV['hw']}x{CONV['hw']}, 3x3, padding {CONV['padding']}"}
    target = next((r for r in rows if r["shape"] == "fc1" and r["kernel"] == "binary" and r["threads"] == 2), None)
    cpu = cpu_summary()
    lines = [
        "# Binary (W1A1) kernels vs fp32 and int8 on this CPU",
        "",
        f"`python bench/binary_gemm.py --rounds {args.rounds} --sample-ms {args.sample_ms:g} --threads "
        f"{' '.join(map(str, args.threads))}`, started {started}.",
        "",
        f"CPU: {cpu['model']}, {cpu['cpus']} cores, flags {', '.join(cpu['flags'])}; torch {torch.__version__}; "
        f"kernel path `{info['path']}` ({info['threading']}).",
        f"Load before: `{load_before}`; after: `{load_after}`.",
        "",
        *[f"- **{s}**: {d}" for s, d in shapes.items()],
        "",
        "| shape | kernel | threads | median ms | min ms | vs fp32 | Gbit/s | of popcount peak | fastest sample |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rate = f"{r['gbit_per_s']:.0f}" if "gbit_per_s" in r else ""
        frac = f"{100 * r['fraction_of_popcount_peak']:.0f}%" if "fraction_of_popcount_peak" in r else ""
        best = f"{100 * r['fraction_of_popcount_peak_fastest']:.0f}%" if "fraction_of_popcount_peak" in r else ""
        lines.append(f"| {r['shape']} | {r['kernel']} | {r['threads']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | "
                     f"{r['speedup_vs_fp32']:.1f}x | {rate} | {frac} | {best} |")
    lines += [
        "",
        "Popcount peak, measured: a loop of nothing but popcount instructions on registers (12 independent "
        f"chains of {'`vpopcntq` on zmm, 512 bits each' if bits_per_instr == 512 else '`popcnt`, 64 bits each'}), "
        "the fastest of 20 runs of ~2 ms before and after the rounds: " + "; ".join(
            f"{t} thread{'s' if t > 1 else ''}: {instr_per_s[t] / 1e9:.2f} instructions/ns = "
            f"{peak[t] / 1e9:.0f} Gbit/s ({instr_per_s[t] / 1e9 / t / clock_ghz:.2f} per cycle per core)"
            for t in args.threads) + ". "
        f"Clock {clock_ghz:.2f} GHz, measured (a chain of dependent one-cycle adds, fastest of 20 runs of ~5 ms "
        f"before and after; /proc/cpuinfo says {cpu['mhz_cpuinfo']:.0f} MHz, the nominal clock). "
        "A kernel's rate is M N K / time (bit products of the XNOR-popcount, the real K; for the conv "
        "rows x C_out x 9 C_in, positions in the padding included), from its median and from its fastest "
        "sample. The binary row also packs the activations, runs the epilogue and (conv) im2col, which do "
        "no popcounts. The XNOR-popcount inner loop needs an xor and an add beside each popcount, and they "
        "share the vector pipes, so 100% is out of reach.",
    ]
    if target is not None:
        verdict = "met" if target["speedup_vs_fp32"] >= 8 else "NOT met"
        lines += ["", f"Target (fc1, binary with packing, 2 threads, >= 8x fp32): {target['speedup_vs_fp32']:.1f}x, "
                      f"{verdict}."]
    text = "\n".join(lines) + "\n"
    print(text)
    result = {"command": " ".join(sys.argv), "started": started, "load_before": load_before, "load_after": load_after,
              "cpu": cpu, "torch": torch.__version__, "kernel_info": info, "shapes": shapes, "rounds": args.rounds,
              "sample_ms": args.sample_ms, "popcount_peak_gbit_per_s": {str(t): peak[t] / 1e9 for t in args.threads},
              "popcount_instructions_per_ns": {str(t): v / 1e9 for t, v in instr_per_s.items()},
              "clock_ghz_measured": clock_ghz,
              "bits_per_popcount_instruction": bits_per_instr, "rows": rows,
              "samples_ms": {f"{s}/{kn}/{t}": [v * 1e3 for v in vals] for ((s, kn), t), vals in times.items()}}
    write_text(f"{args.out}.json", json.dumps(result, indent=2))
    write_text(f"{args.out}.md", text)
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
