"""Per-denoising-step latency and file size of a DiT at DiT-B/2 and DiT-XL/2 shape (random weights).

One denoising step is one forward pass at batch 2 (classifier-free guidance) on 32x32x4 latents:
diffusers ``DiTTransformer2DModel``, patch 2, 1000 classes; B/2: 12 blocks, 12 heads x 64 (hidden
768); XL/2: 28 blocks, 16 heads x 72 (hidden 1152). The per-block timestep/class embedders are tied
to block 0's, as in DiT checkpoints converted to diffusers, where every block holds a copy of the
one embedder (the FP32 file then holds it once, as the original does). Configurations:

    eager fp32         PyTorch eager
    torch-int8 W8A8    ditq_compiler's ``torch-int8`` backend (FBGEMM int8 GEMMs)
    ort fp32           ONNX Runtime, the same model exported without quantization (``export_float``)
    ort W8A8           ours: ``compiled.export_onnx(target="ort")`` (uint8 activations)
    ort W8A8 s8-act    ours with int8 activations instead (the int8-vs-uint8 measurement)
    ort W4A8           ours, 4-bit weights stored as INT4
    ort W8A8 preset    ours with the ``w8a8-minmax`` preset, which keeps adaLN modulation in FP32 (file size)
    quantize_static    ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, u8 activations,
                       s8 weights, MinMax) on the FP32 export, calibrated on the same batches

Our W8A8 / W4A8 recipes quantize every transformer linear, adaLN modulation included (per-channel
symmetric weights, per-tensor affine activations, min-max ranges: the speed does not depend on the
range search). Latency: every round runs each configuration once, in turn (interleaved), after
two warm-up calls; the median over rounds is reported. ONNX Runtime sessions do not spin and
OpenMP waits passively, so idle pools do not steal the cores from the configuration being timed.
Kernels: ONNX Runtime's profiler (time per op type; which kernel each quantized layer ran).

    python bench/speed.py --threads 2                       # DiT-B/2, 15 rounds
    python bench/speed.py --threads 2 --shapes XL --repeats 5
Writes bench/results/speed.json (all shapes run so far) and bench/results/speed.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch starts its OpenMP pool

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import ditq_compiler as dq  # noqa: E402
from ditq_compiler.atomic import write_text  # noqa: E402
from ditq_compiler.backends.onnx import export_float, file_size  # noqa: E402
from ditq_compiler.backends.ort import INTEGER_KERNELS, OrtModel, profile, session_options  # noqa: E402
from ditq_compiler.backends.torch import cpu_has_vnni, lower_int8  # noqa: E402
from ditq_compiler.quant import sqnr_db  # noqa: E402

SHAPES = {"B": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),
          "XL": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72),
          "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=32)}   # the smoke test's
ALL_LINEARS = ["qkv", "attn_out", "fc1", "fc2", "adaln"]


def dit(shape: str, seed: int = 0) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(in_channels=4, out_channels=8, sample_size=32, patch_size=2,
                                  num_embeds_ada_norm=1000, **SHAPES[shape]).eval()
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = shared
    return model


def recipe(weight_bits: int) -> dq.Recipe:
    return dq.Recipe.from_dict({
        "name": f"w{weight_bits}a8-all-linears",
        "description": "speed bench: every transformer linear incl. adaLN modulation, min-max ranges",
        "weights": {"bits": weight_bits, "symmetric": True, "granularity": "channel", "observer": "minmax"},
        "activations": {"bits": 8, "symmetric": False, "granularity": "tensor", "axis": -1, "observer": "minmax"},
        "quantize_roles": ALL_LINEARS})


def batch(gen: torch.Generator, size: int = 2) -> dict[str, torch.Tensor]:
    """A guidance batch: one sample with its class, one with the null class 1000."""
    return {"hidden_states": torch.randn(size, 4, 32, 32, generator=gen),
            "timestep": torch.randint(0, 1000, (1,), generator=gen).repeat(size),
            "class_labels": torch.tensor([int(torch.randint(0, 1000, (1,), generator=gen)), 1000])}


def quantize_static_export(fp32_path: Path, out: Path, calibration: list[dict[str, np.ndarray]]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(calibration)

        def get_next(self):
            return next(self._batches, None)

    quantize_static(str(fp32_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    use_external_data_format=file_size(fp32_path) > 1.8 * 2**30)
    return out


def interleaved(runs: dict[str, callable], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn(), fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def kernel_summary(prof) -> dict:
    integer_ms = sum(ms for op, ms in prof.op_ms.items() if op in INTEGER_KERNELS)
    return {"top_ops_ms": {op: round(ms, 2) for op, ms in list(prof.op_ms.items())[:6]},
            "integer_kernel_share": round(integer_ms / max(sum(prof.op_ms.values()), 1e-9), 3),
            "op_counts": {op: n for op, n in sorted(prof.op_counts.items()) if op in INTEGER_KERNELS
                          or op in ("MatMul", "Gemm", "DequantizeLinear", "QuantizeLinear", "MatMulNBits")},
            "quantized_layers": prof.kernel_counts()}


def run_shape(shape: str, args) -> dict:
    torch.set_num_threads(args.threads)
    work = Path(args.workdir) / shape
    work.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    model = dit(shape)
    calibration = [((), batch(gen)) for _ in range(args.calibration)]
    inputs = batch(gen)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    seconds: dict[str, float] = {}

    def timed(name, fn, *fn_args, **fn_kwargs):
        start = time.perf_counter()
        value = fn(*fn_args, **fn_kwargs)
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"[{shape}] {name}: {seconds[name]} s", flush=True)
        return value

    with torch.no_grad():
        fp_out = model(**inputs).sample
    w8 = timed("compile W8A8", dq.compile, model, recipe(8), calibration=calibration, progress=False)
    with torch.no_grad():
        reference_out = w8(**inputs).sample
    int8_gm, int8_kernels = lower_int8(copy.deepcopy(w8.graph_module))
    int8_inputs = w8.captured.bind((), inputs)
    paths = {"ort W8A8": timed("export W8A8", w8.export_onnx, work / "w8a8.onnx"),
             "ort W8A8 s8-act": timed("export W8A8 s8-act", w8.export_onnx, work / "w8a8-s8.onnx",
                                      activation_dtype="int8")}
    del w8  # each compiled model holds a float copy of the graph: free it before the next compile
    gc.collect()
    w4 = timed("compile W4A8", dq.compile, model, recipe(4), calibration=calibration, progress=False)
    paths["ort W4A8"] = timed("export W4A8", w4.export_onnx, work / "w4a8.onnx")
    del w4
    gc.collect()
    if args.preset_row:
        preset = timed("compile preset", dq.compile, model, "w8a8-minmax", calibration=calibration, progress=False)
        paths["ort W8A8 preset (adaLN fp32)"] = timed("export preset", preset.export_onnx, work / "preset.onnx")
        del preset
        gc.collect()
    paths["ort fp32"] = timed("export fp32", export_float, model, work / "fp32.onnx", example_inputs=inputs)
    calib_feeds = [{k: v.numpy() for k, v in kw.items()} for _, kw in calibration]
    paths["quantize_static"] = timed("quantize_static", quantize_static_export, paths["ort fp32"],
                                     work / "quantize-static.onnx", calib_feeds)
    gc.collect()

    options = lambda: session_options(args.threads, spinning=False)  # noqa: E731
    sessions = {name: OrtModel(path, options=options()) if name != "quantize_static" else
                ort.InferenceSession(str(path), options(), providers=["CPUExecutionProvider"])
                for name, path in paths.items()}
    runs = {"eager fp32": lambda: model(**inputs).sample,
            "torch-int8 W8A8": lambda: int8_gm(**int8_inputs).sample}
    for name, session in sessions.items():
        if isinstance(session, OrtModel):
            runs[name] = lambda s=session: s(**inputs).sample
        else:
            runs[name] = lambda s=session: torch.from_numpy(s.run(None, feeds)[0])
    with torch.no_grad():
        outputs = {name: fn() for name, fn in runs.items()}
        times = interleaved(runs, args.repeats)
    profiles = {name: profile(path, threads=args.threads, feeds=feeds) for name, path in paths.items()}

    fp32_ms = statistics.median(times["ort fp32"])
    eager_ms = statistics.median(times["eager fp32"])
    fp32_bytes = file_size(paths["ort fp32"])
    rows = []
    for name in runs:
        ms = statistics.median(times[name])
        row = {"config": name, "median_ms": round(ms, 2), "times_ms": [round(t, 2) for t in times[name]],
               "speedup_vs_ort_fp32": round(fp32_ms / ms, 3), "speedup_vs_eager": round(eager_ms / ms, 3),
               "sqnr_vs_fp32_db": round(sqnr_db(fp_out, outputs[name]), 2)}
        if name in paths:
            size = file_size(paths[name])
            row.update(file_mb=round(size / 2**20, 1), size_vs_fp32=round(size / fp32_bytes, 3),
                       kernels=kernel_summary(profiles[name]))
        if name.startswith("ort W8A8") and "preset" not in name:
            row["sqnr_vs_reference_db"] = round(sqnr_db(reference_out, outputs[name]), 2)
        if name == "torch-int8 W8A8":
            row["kernels"] = {"quantized_layers": {k: sum(v == k for v in int8_kernels.values())
                                                   for k in sorted(set(int8_kernels.values()))}}
            row["sqnr_vs_reference_db"] = round(sqnr_db(reference_out, outputs[name]), 2)
        rows.append(row)
    params = sum(p.numel() for p in model.parameters())
    return {"shape": shape, "model": {"class": "DiTTransformer2DModel", **SHAPES[shape], "sample_size": 32,
                                      "patch_size": 2, "batch": 2, "params": params},
            "repeats": args.repeats, "build_seconds": seconds, "rows": rows}


def markdown(results: dict) -> str:
    lines = []
    for shape, result in results["shapes"].items():
        lines += [f"DiT-{shape}/2 shape, batch 2, {results['threads']} threads, median of {result['repeats']} "
                  "interleaved rounds:", "",
                  "| config | kernels of the quantized layers | ms / step | vs ORT FP32 | vs eager | file MB "
                  "| size vs FP32 | SQNR vs FP32 dB |", "|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            kernels = r.get("kernels", {})
            counts = kernels.get("quantized_layers") or {op: n for op, n in kernels.get("op_counts", {}).items()
                                                         if op in INTEGER_KERNELS or op in ("MatMul", "Gemm")}
            size = f"{r['file_mb']} | {r['size_vs_fp32']:.3f}x" if "file_mb" in r else "- | -"
            lines.append(f"| {r['config']} | {', '.join(f'{n} {op}' for op, n in counts.items()) or '-'} | "
                         f"{r['median_ms']:.1f} | {r['speedup_vs_ort_fp32']:.2f}x | {r['speedup_vs_eager']:.2f}x | "
                         f"{size} | {r['sqnr_vs_fp32_db']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=["B"], choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calibration", type=int, default=4, help="calibration batches (of 2)")
    parser.add_argument("--no-preset-row", dest="preset_row", action="store_false")
    parser.add_argument("--workdir", default="/tmp/ditq-speed", help="where the ONNX files go (large)")
    parser.add_argument("--json", default="bench/results/speed.json")
    args = parser.parse_args()
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {"shapes": {}}
    results.update(threads=args.threads, torch=torch.__version__, onnxruntime=ort.__version__,
                   cpu=platform.processor() or platform.machine(), vnni=cpu_has_vnni())
    for shape in args.shapes:
        results["shapes"][shape] = run_shape(shape, args)
        gc.collect()
        write_text(path, json.dumps(results, indent=1))
        table = markdown(results)
        write_text(path.with_suffix(".md"), table)
        print(table, flush=True)


if __name__ == "__main__":
    main()
