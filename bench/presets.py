"""Output SQNR of every preset recipe on the small random diffusers models, and compile time.

Until the trained reference models exist (issue 3), this is the quality table the README
quotes: SQNR of the compiled model's output against FP on held-out random inputs (not the
calibration batches), medians over the held-out batches.

    python bench/presets.py [--models dit unet] [--recipes w8a8 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import ditq_compiler as dq
from ditq_compiler.atomic import write_text
from ditq_compiler.quant import sqnr_db
from ditq_compiler.toy import random_dit_batches, random_unet_batches, small_dit, small_unet

MODELS = {
    "dit": (small_dit, random_dit_batches),
    "unet": (small_unet, random_unet_batches),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--recipes", nargs="+", default=list(dq.Recipe.presets()))
    parser.add_argument("--json", default="bench/results/presets.json")
    args = parser.parse_args()
    rows = []
    for model_name in args.models:
        factory, batches_for = MODELS[model_name]
        model = factory()
        calibration = batches_for(count=8, seed=1)
        held_out = batches_for(count=4, seed=2)
        with torch.no_grad():
            references = [model(*a, **k).sample for a, k in held_out]
        for recipe in args.recipes:
            start = time.perf_counter()
            compiled = dq.compile(model, recipe, calibration=calibration, progress=False)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                outputs = [compiled(*a, **k).sample for a, k in held_out]
            sqnrs = [sqnr_db(ref, out) for ref, out in zip(references, outputs, strict=True)]
            measured = [layer for layer in compiled.layers if layer.sqnr_db is not None]
            worst = min(measured, key=lambda layer: layer.sqnr_db) if measured else None   # hadamard-only: none
            rows.append({"model": model_name, "recipe": recipe, "layers": len(compiled.layers),
                         "output_sqnr_db": statistics.median(sqnrs), "worst_layer": worst and worst.name,
                         "worst_layer_sqnr_db": worst and worst.sqnr_db, "compile_s": seconds})
            r = rows[-1]
            worst_text = "-" if worst is None else f"{worst.sqnr_db:5.1f} dB ({worst.name})"
            print(f"{model_name:5s} {recipe:20s} layers {r['layers']:3d}  output SQNR {r['output_sqnr_db']:5.1f} dB  "
                  f"worst layer {worst_text}  compile {seconds:5.1f} s", flush=True)
    path = write_text(args.json, json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                             "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
