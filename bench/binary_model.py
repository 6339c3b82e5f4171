"""Whole-model denoiser steps of BiDM+ W1A1 (``bidm-w1a1``) models on the XNOR-popcount CPU kernels, and their size.

Models:
  DiT-B/2 shape  diffusers ``DiTTransformer2DModel``, random weights: 12 blocks (``--dit-layers``), 12 heads x 64,
                 patch 2, 32x32x4 latents, 1000 classes; one step = batch 2 (one sample, classifier-free guidance).
  unet-digits    the zoo U-Net (``ditq_compiler.zoo``); one step = batch ``--unet-batch`` (default 20 and 60: 10 and
                 30 samples with guidance; the compiled U-Net runs at most 63 rows per graph call).

Each is compiled once with ``bidm-w1a1`` and ``backend="cpu-binary"``, calibrated on a few FP sampler calls
(``from_sampler``; BiDM+'s timestep connections need their noise), with distillation cut to
``--distill-iterations`` (default 2, batch 2) for the zoo models and to ``--dit-distill-iterations`` for
DiT-B/2 (default 0: left out, the binarizers keep their initial parameters; two iterations of DiT-B/2 take
minutes on two busy cores). Distillation changes the learned values, not the ops, so the timings hold for a
fully trained model; the output quality does not (nobody should sample from these).

Configurations, each timed on every ``--threads`` count, interleaved in shuffled rounds (median reported):
  fp32 eager   the float model.
  torch        backend "torch", the fake-quant reference: the same compile's reference graph (what backend
               "torch" runs; its lowering is the identity), W1A1 layers as float matmuls / convs on +-1 values.
  cpu-binary   the lowered graph: W1A1 layers on ``ditq_kernels::binary_linear`` / ``binary_conv2d``.
The cpu-binary output is checked bit-equal to the torch one. BiDM+'s models carry state across sampler steps;
every timed call starts a new trajectory (a first step: the same ops as any other).

Where the time goes: the cpu-binary graph run node by node (``torch.fx.Interpreter``), each node's time summed
by kind: binary layers (the kernel and its activation scale), float linear / conv layers (what the recipe keeps
in float: embedders, adaLN, patch embedding, final layer, conv_in / conv_out), other ops (attention matmuls and
softmax, norms, elementwise). Median of ``--profile-runs`` runs.

Size: ``dit-digits`` compiled the same way (``bidm-w1a1``, short distillation) and saved; per binarized layer,
the bytes its tensors take in the artifact (1-bit weight codes, fp32 sigma, tau, mu_min, mu_max, bias) against
its FP32 weight and bias bytes (the issue's bar: <= 0.1x); the layers left in float are listed.

OpenMP waits passively (``OMP_WAIT_POLICY=PASSIVE`` unless set), as in ``bench/speed.py``: on a machine whose
cores other jobs share, spinning pool threads (the default) made every 2-thread parallel region wait for a
time slice (median of a 512 x 768 layer norm: 8 ms on 2 threads, 0.2 ms on 1; passive: 0.6 ms and 0.3 ms).

    python bench/binary_model.py [--rounds 3 --threads 1 2 --dit-layers 12]
Writes bench/results/binary-model.{md,json}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch starts its OpenMP pool (see the docstring)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import fx  # noqa: E402

import ditq_compiler as dq  # noqa: E402
from ditq_compiler import meta, zoo  # noqa: E402
from ditq_compiler.artifact import read_manifest  # noqa: E402
from ditq_compiler.atomic import write_text  # noqa: E402
from ditq_compiler.backends.cpu_binary import xnor_conv2d, xnor_linear  # noqa: E402
from ditq_compiler.calibration import from_sampler  # noqa: E402
from ditq_compiler.compiled import CompiledModel  # noqa: E402
from ditq_compiler.kernels import binary_cpu  # noqa: E402
from ditq_compiler.trajectory import stateless_inputs  # noqa: E402

BINARY_OPS = (torch.ops.ditq.binary_linear.default, torch.ops.ditq.binary_conv2d.default)
FLOAT_LAYERS = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)
DTYPE_BYTES = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8}
MIN_SAMPLE_S = 0.05    # a timed sample repeats a call at least this long
STARTED = time.perf_counter()


def recipe(iterations: int) -> dq.Recipe:
    """``bidm-w1a1`` with distillation cut to ``iterations`` (batch 2), or left out for 0."""
    base = dq.Recipe.load("bidm-w1a1")
    distillation = dataclasses.replace(base.distillation, iterations=iterations, batch_size=2) if iterations else None
    return dataclasses.replace(base, distillation=distillation)


def dit_b2(layers: int):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=12, attention_head_dim=64, in_channels=4, out_channels=8,
                                 num_layers=layers, sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()


def compile_w1a1(model, scheduler, iterations: int, calls: int) -> dq.CompiledModel:
    """``bidm-w1a1`` on ``backend="cpu-binary"``, calibrated on ``calls`` rows of a 2-step FP sampler run."""
    calibration = from_sampler(model, scheduler, num_inference_steps=2, num_trajectories=max(1, calls // 4),
                               guidance_scale=2.0, steps=2, samples_per_step=calls // 2, batch_size=2, progress=False)
    compiled = dq.compile(model, recipe(iterations), calibration=calibration, backend="cpu-binary", progress=False,
                          cache_dir=False)
    log(f"compiled ({', '.join(f'{k} {v:.0f} s' for k, v in compiled.stage_seconds.items())})")
    return compiled


def step_inputs(kind: str, batch: int) -> dict:
    """One guided sampler call: half the rows with a class, half with the null class, at timestep 500."""
    g = torch.Generator().manual_seed(0)
    if kind == "dit":
        sample, null = {"hidden_states": torch.randn(batch, 4, 32, 32, generator=g)}, 1000
    else:
        sample, null = {"sample": torch.randn(batch, 1, 8, 8, generator=g)}, 10
    labels = torch.cat([torch.arange(batch // 2) % 10, torch.full((batch - batch // 2,), null)])
    return {**sample, "timestep": torch.full((batch,), 500), "class_labels": labels}


def configurations(model, compiled: dq.CompiledModel, inputs: dict) -> dict:
    reference = CompiledModel(dataclasses.replace(compiled.record, graph_module=compiled.reference_graph_module,
                                                  backend="torch", reference_graph=None))

    def run(quantized):
        def call():
            quantized.reset_trajectory()
            return quantized(**inputs).sample
        return call
    return {"fp32 eager": lambda: model(**inputs).sample, "torch": run(reference), "cpu-binary": run(compiled)}


def time_rounds(configs: dict, threads: list[int], rounds: int, seed: int) -> dict:
    """(config, threads) -> seconds per call in each round; each sample repeats a call >= MIN_SAMPLE_S."""
    order = [(name, t) for name in configs for t in threads]
    reps = {}
    for name, t in order:                       # warm up, and size each sample
        torch.set_num_threads(t)
        start = time.perf_counter()
        configs[name]()
        reps[name, t] = max(1, math.ceil(MIN_SAMPLE_S / (time.perf_counter() - start)))
    times = {key: [] for key in order}
    shuffle = random.Random(seed)
    for r in range(rounds):
        shuffle.shuffle(order)
        for name, t in order:
            torch.set_num_threads(t)
            start = time.perf_counter()
            for _ in range(reps[name, t]):
                configs[name]()
            times[name, t].append((time.perf_counter() - start) / reps[name, t])
        print(f"\r  round {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return times


class NodeTimer(fx.Interpreter):
    """Seconds spent per kind of node in one run of a lowered graph."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.seconds = {"binary layers": 0.0, "float linear/conv": 0.0, "other ops": 0.0}

    def run_node(self, node: fx.Node):
        start = time.perf_counter()
        out = super().run_node(node)
        kind = ("binary layers" if node.target in (xnor_linear, xnor_conv2d)
                else "float linear/conv" if node.target in FLOAT_LAYERS else "other ops")
        self.seconds[kind] += time.perf_counter() - start
        return out


def time_shares(compiled: dq.CompiledModel, inputs: dict, threads: list[int], runs: int) -> dict:
    """threads -> kind -> median ms of the cpu-binary graph's nodes of that kind."""
    captured = compiled.captured
    graph_inputs = captured.graph_inputs(captured.call_plan.arguments((), inputs))
    sample = graph_inputs[captured.sample_input]
    graph_inputs.update(stateless_inputs(compiled.state_inputs, sample.shape[0], sample))
    gm = compiled.graph_module
    args = [graph_inputs[n.name] for n in gm.graph.nodes if n.op == "placeholder"]
    shares = {}
    for t in threads:
        torch.set_num_threads(t)
        runs_ms = []
        for _ in range(runs + 1):                # the first run warms up
            timer = NodeTimer(gm)
            timer.run(*args)
            runs_ms.append({k: v * 1e3 for k, v in timer.seconds.items()})
        shares[t] = {k: statistics.median(r[k] for r in runs_ms[1:]) for k in runs_ms[0]}
    return shares


def log(text: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {text}", file=sys.stderr, flush=True)


def bench_model(name: str, model, compiled: dq.CompiledModel, inputs: dict, args) -> dict:
    configs = configurations(model, compiled, inputs)
    with torch.inference_mode():
        equal = torch.equal(configs["torch"](), configs["cpu-binary"]())
        log(f"{name}, batch {len(inputs['timestep'])}: cpu-binary output bit-equal to torch: {equal}; timing")
        times = time_rounds(configs, args.threads, args.rounds, args.seed)
        log(f"{name}: node times")
        shares = time_shares(compiled, inputs, args.threads, args.profile_runs)
    binary = sum(1 for layer in compiled.layers if layer.kernel.startswith("xnor-popcount"))
    return {"model": name, "batch": len(inputs["timestep"]), "bit_equal": equal, "binary_layers": binary,
            "float_layers": [layer.name for layer in compiled.reports.float_layers],
            "compile_seconds": compiled.stage_seconds,
            "median_ms": {f"{c}|{t}": statistics.median(v) * 1e3 for (c, t), v in times.items()},
            "shares_ms": {str(t): s for t, s in shares.items()}}


# ---- size ------------------------------------------------------------------------------------------

def stored_bytes(path: Path) -> dict[str, int]:
    """Bytes each tensor takes in the artifact's safetensors file (packed integer tensors at their bit width)."""
    from safetensors import safe_open

    with safe_open(str(path / "tensors.safetensors"), framework="pt") as f:
        return {name: math.prod(f.get_slice(name).get_shape()) * DTYPE_BYTES[f.get_slice(name).get_dtype()]
                for name in f.keys()}


def size_rows(model, compiled: dq.CompiledModel, path: Path) -> dict:
    compiled.save(path)
    stored = stored_bytes(path)
    packed = json.loads((path / "graph.json").read_text())["packed"]
    layers, total_stored, total_codes, total_fp32 = [], 0, 0, 0
    for node in compiled.reference_graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in BINARY_OPS:
            continue
        name = meta.get(node).annotation.name
        tensors = [a.target for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        codes = next(t for t in tensors if t.endswith("_w_bits"))
        layer = model.get_submodule(name)
        fp32 = 4 * (layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0))
        mine = sum(stored[t] for t in tensors)
        layers.append({"layer": name, "stored_bytes": mine, "code_bits": packed[codes]["bits"], "fp32_bytes": fp32})
        total_stored, total_codes, total_fp32 = total_stored + mine, total_codes + stored[codes], total_fp32 + fp32
    manifest = read_manifest(path)
    return {"layers": layers, "stored_bytes": total_stored, "code_bytes": total_codes, "fp32_bytes": total_fp32,
            "ratio": total_stored / total_fp32, "max_layer_ratio": max(r["stored_bytes"] / r["fp32_bytes"]
                                                                       for r in layers),
            "artifact_bytes": manifest["sizes"]["artifact_bytes"],
            "fp_checkpoint_bytes": manifest["sizes"]["fp_checkpoint_bytes"],
            "float_layers": [f"{layer.name} ({layer.role})" for layer in compiled.reports.float_layers]}


# ---- report ----------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "unknown (no lscpu)"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return (f"{fields.get('Model name', '?').strip()} ({fields.get('CPU(s)', '?').strip()} CPUs, "
            f"{'avx512_vpopcntdq' if 'avx512_vpopcntdq' in flags else 'no avx512_vpopcntdq'})")


def load_average() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def markdown(results: list[dict], size: dict, args, meta_info: dict) -> str:
    lines = ["# W1A1 whole-model steps on the XNOR-popcount CPU kernels (`cpu-binary`)", "",
             f"`{meta_info['command']}`, started {meta_info['started']}.", "",
             f"CPU: {meta_info['cpu']}; torch {torch.__version__}; kernel path `{meta_info['path']}`; "
             f"`OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}`. "
             f"Load average before: {meta_info['load_before']}; after: {meta_info['load_after']} "
             "(a shared machine: other jobs held the cores).", "",
             f"Recipe `bidm-w1a1`, distillation shortened to {args.distill_iterations} iterations (batch 2) for "
             f"the zoo models and to {args.dit_distill_iterations} for DiT-B/2 (0: left out, initial binarizer "
             "parameters): the ops and their cost are those of a fully trained model, the quality is not. "
             "`torch` is the fake-quant reference (the same compile's reference graph), `cpu-binary` its lowering; "
             "medians of interleaved rounds, each call a new sampler trajectory.", "",
             "| model | batch | config | threads | median ms / step | vs fp32 eager | vs torch (fake-quant) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in results:
        med = r["median_ms"]
        for t in args.threads:
            for config in ("fp32 eager", "torch", "cpu-binary"):
                ms = med[f"{config}|{t}"]
                lines.append(f"| {r['model']} | {r['batch']} | {config} | {t} | {ms:.1f} | "
                             f"{med[f'fp32 eager|{t}'] / ms:.2f}x | {med[f'torch|{t}'] / ms:.2f}x |")
    lines += ["", "Where the cpu-binary step's time goes: the graph's nodes timed one by one (`torch.fx.Interpreter`, "
              f"median of {args.profile_runs} runs; the call's own work around the graph, argument checks and the "
              "trajectory state, is not in it):", "",
              "| model | batch | threads | binary layers ms | float linear/conv ms | other ops ms | "
              "outside binary layers |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for t in args.threads:
            s = r["shares_ms"][str(t)]
            outside = 1 - s["binary layers"] / sum(s.values())
            lines.append(f"| {r['model']} | {r['batch']} | {t} | {s['binary layers']:.1f} | "
                         f"{s['float linear/conv']:.1f} | {s['other ops']:.1f} | {outside:.0%} |")
    lines += [""]
    for r in {r["model"]: r for r in results}.values():
        lines.append(f"- {r['model']}: {r['binary_layers']} binarized layers on the kernels, output bit-equal to "
                     f"the torch backend: {'yes' if r['bit_equal'] else 'NO'}; float layers "
                     f"({len(r['float_layers'])}): {', '.join(r['float_layers'])}.")
    worst = size["max_layer_ratio"]
    code_bits = "/".join(str(b) for b in sorted({r["code_bits"] for r in size["layers"]}))
    lines += ["", "## Size (dit-digits, bidm-w1a1)", "",
              f"Binarized layers ({len(size['layers'])}): **{size['stored_bytes'] / 1024:.1f} KiB stored** "
              f"({size['code_bytes'] / 1024:.1f} KiB of 1-bit weight codes, the rest fp32 sigma, tau, mu_min, mu_max "
              f"and bias) vs {size['fp32_bytes'] / 1024:.1f} KiB of FP32 weights and biases: "
              f"**{size['ratio']:.3f}x** (largest single layer {worst:.3f}x; bar: <= 0.1x). Every binarized "
              f"layer's weight codes are stored at {code_bits} bit each.",
              f"Whole artifact: {size['artifact_bytes'] / 1024:.1f} KiB vs the FP32 checkpoint's "
              f"{size['fp_checkpoint_bytes'] / 1024:.1f} KiB.", "",
              f"Layers left in float ({len(size['float_layers'])}): {', '.join(size['float_layers'])}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dit-layers", type=int, default=12, help="DiT-B/2 has 12; fewer to compile faster")
    parser.add_argument("--unet-batch", type=int, nargs="+", default=[20, 60])
    parser.add_argument("--distill-iterations", type=int, default=2, help="for the zoo models; 0: none")
    parser.add_argument("--dit-distill-iterations", type=int, default=0, help="for DiT-B/2; 0: none")
    parser.add_argument("--calibration-rows", type=int, default=2, help="FP sampler rows to calibrate on")
    parser.add_argument("--profile-runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/binary-model", help="writes OUT.md and OUT.json")
    args = parser.parse_args()

    info = binary_cpu.kernel_info()
    if info["path"] == binary_cpu.TORCH and info["build_failure"]:
        sys.exit(f"the binary kernels did not build ({info['build_failure']}); nothing to benchmark")
    meta_info = {"command": " ".join(["python bench/binary_model.py", *sys.argv[1:]]),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu_name(), "path": info["path"],
                 "load_before": load_average()}
    from diffusers import DDPMScheduler

    results = []
    started = time.perf_counter()
    torch.set_num_threads(max(args.threads))
    dit = dit_b2(args.dit_layers)
    name = "DiT-B/2 shape" + ("" if args.dit_layers == 12 else f", {args.dit_layers} of 12 blocks")
    log(f"{name}: compiling")
    compiled = compile_w1a1(dit, DDPMScheduler(num_train_timesteps=1000), args.dit_distill_iterations,
                            args.calibration_rows)
    results.append(bench_model(name, dit, compiled, step_inputs("dit", 2), args))
    del dit, compiled

    torch.set_num_threads(max(args.threads))
    unet = zoo.load("unet-digits")
    log("unet-digits: compiling")
    compiled = compile_w1a1(unet, zoo.scheduler("unet-digits"), args.distill_iterations, args.calibration_rows)
    for batch in args.unet_batch:
        results.append(bench_model("unet-digits", unet, compiled, step_inputs("unet", batch), args))

    torch.set_num_threads(max(args.threads))
    log("dit-digits: compiling for the size")
    digits = zoo.load("dit-digits")
    compiled = compile_w1a1(digits, zoo.scheduler("dit-digits"), args.distill_iterations, args.calibration_rows)
    with tempfile.TemporaryDirectory() as tmp:
        size = size_rows(digits, compiled, Path(tmp) / "dit-digits")
    meta_info["load_after"] = load_average()
    meta_info["seconds"] = time.perf_counter() - started

    text = markdown(results, size, args, meta_info)
    print(text)
    out = Path(args.out)
    write_text(out.with_suffix(".md"), text)
    write_text(out.with_suffix(".json"), json.dumps({"meta": meta_info, "args": vars(args), "models": results,
                                                     "size": size}, indent=1))


if __name__ == "__main__":
    main()
