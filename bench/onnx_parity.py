"""ONNX Runtime against the fake-quant reference, for every preset, on the small models and dit-digits.

For each (model, preset, flavour): compile on calibration batches, export, run the export in ONNX
Runtime on held-out batches, and report the SQNR of its output against the reference
(``compiled(...)``) next to the SQNR of the reference against FP (the quantization error itself),
with the kernels ONNX Runtime ran for the quantized layers. Learned parts are cut short (parity is
about the lowering, not about the learned values): 5 reconstruction iterations per block (TaQ-DiT),
5 distillation and AMPN-search iterations (RobuQ), and TQ-DiT's scale search with the output MSE,
4 candidates and 1 round (the held-out split makes lists of batches, which carry no noise targets for
its Hessian metric). ``--full NAME`` compiles a preset as published. A ``tensorrt`` flavour the recipe has no
symmetric int8 form for is listed as refused, with the reason the export gave.

    python bench/onnx_parity.py [--models dit unet dit-digits] [--presets ...] [--full ...] [--update] [--threads 1]
Writes bench/results/onnx-parity.json and bench/results/onnx-parity.md (``--update``: keeps the rows of
the file for the (model, preset, flavour) not run now).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import tempfile
import time
from pathlib import Path

import torch

import ditq_compiler as dq
from ditq_compiler.atomic import write_text
from ditq_compiler.backends.onnx import OnnxExportError
from ditq_compiler.backends.ort import OrtModel, profile

FLAVOURS = {"dit": ("ort", "tensorrt"), "unet": ("ort", "tensorrt"), "dit-digits": ("ort", "tensorrt")}


def models(name: str):
    """(model, calibration batches, held-out batches)."""
    from ditq_compiler import toy

    if name == "dit":
        batches = toy.random_dit_batches()
        return toy.small_dit(), batches[:6], batches[6:]
    if name == "unet":
        batches = toy.random_unet_batches()
        return toy.small_unet(), batches[:6], batches[6:]
    from ditq_compiler import zoo
    from ditq_compiler.calibration import from_sampler

    model, scheduler = zoo.load(name), zoo.scheduler(name)
    batches = list(from_sampler(model, scheduler, num_inference_steps=20, guidance_scale=2.0, num_trajectories=8,
                                steps=10, samples_per_step=4, batch_size=8, progress=False))
    return model, batches[:-2], batches[-2:]


def db(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def shortened(recipe: dq.Recipe) -> dq.Recipe:
    """The recipe with its learned parts cut short (see the module doc)."""
    fewer = {"reconstruction": {"iterations": 5}, "distillation": {"iterations": 5},
             "mixed_precision": {"search_iterations": 5}, "scale_search": {"metric": "mse", "eq_n": 4, "rounds": 1}}
    return dataclasses.replace(recipe, **{name: dataclasses.replace(getattr(recipe, name), **changes)
                                          for name, changes in fewer.items() if getattr(recipe, name) is not None})


def measure(model, compiled, held_out, target: str, workdir: Path, threads: int, compile_s: float) -> dict:
    recipe = compiled.recipe
    start = time.perf_counter()
    try:
        path = compiled.export_onnx(workdir / f"{recipe.name}-{target}.onnx", target=target)
    except OnnxExportError as e:
        reasons = sorted({m.strip() for m in re.findall(r"\): ([^\n]+)", str(e))})
        return {"preset": recipe.name, "flavour": target, "refused": reasons}
    seconds = compile_s + time.perf_counter() - start
    deployed = OrtModel(path, threads=threads)
    energy = dict(signal_q=0.0, noise_q=0.0, signal_fp=0.0, noise_fp=0.0)
    with torch.no_grad():
        for args, kwargs in held_out:
            fp, ref = model(*args, **kwargs).sample.double(), compiled(*args, **kwargs).sample.double()
            out = deployed(*args, **kwargs).sample.double()
            energy["signal_q"] += float(ref.square().sum())
            energy["noise_q"] += float((ref - out).square().sum())
            energy["signal_fp"] += float(fp.square().sum())
            energy["noise_fp"] += float((fp - ref).square().sum())
    kernels = profile(path, held_out[0][0], held_out[0][1], threads=threads).kernel_counts()
    return {"preset": recipe.name, "flavour": target, "ort_vs_reference_db": round(db(energy["signal_q"],
                                                                                      energy["noise_q"]), 1),
            "reference_vs_fp_db": round(db(energy["signal_fp"], energy["noise_fp"]), 1), "kernels": kernels,
            "compile_and_export_s": round(seconds, 1)}


def markdown(results: dict) -> str:
    lines = ["| model | preset | flavour | ORT vs reference dB | reference vs FP dB | kernels of quantized layers |",
             "|---|---|---|---|---|---|"]
    for model, rows in results["models"].items():
        for r in rows:
            preset = r["preset"] + (" (published schedule)" if r.get("schedule") == "published" else "")
            if "refused" in r:
                lines.append(f"| {model} | {preset} | {r['flavour']} | refused: {'; '.join(r['refused'])} | | |")
                continue
            kernels = ", ".join(f"{n} {op}" for op, n in r["kernels"].items())
            lines.append(f"| {model} | {preset} | {r['flavour']} | {r['ort_vs_reference_db']} | "
                         f"{r['reference_vs_fp_db']} | {kernels} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(FLAVOURS), choices=list(FLAVOURS))
    parser.add_argument("--presets", nargs="+", default=sorted(dq.Recipe.presets()))
    parser.add_argument("--full", nargs="*", default=[], help="presets compiled as published (no cuts)")
    parser.add_argument("--update", action="store_true", help="keep the existing file's other rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="bench/results/onnx-parity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.json)
    results = {"threads": args.threads, "held_out": "the last 2 batches of each model's set", "models": {}}
    if args.update and path.exists():
        results["models"] = json.loads(path.read_text())["models"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model, calibration, held_out = models(name)
            rows = results["models"].setdefault(name, [])
            for preset in args.presets:
                recipe = dq.Recipe.load(preset)
                if preset not in args.full:
                    recipe = shortened(recipe)
                start = time.perf_counter()
                compiled = dq.compile(model, recipe, calibration=calibration, progress=False)
                compile_s = time.perf_counter() - start
                for target in FLAVOURS[name]:
                    row = measure(model, compiled, held_out, target, Path(tmp), args.threads, compile_s)
                    row["schedule"] = "published" if preset in args.full else "shortened"
                    key = (preset, target, row["schedule"])
                    rows[:] = [r for r in rows if (r["preset"], r["flavour"], r.get("schedule", "shortened")) != key]
                    rows.append(row)
                    print(name, json.dumps(row), flush=True)
                    write_text(path, json.dumps(results, indent=1))
    write_text(path.with_suffix(".md"), markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
