"""Output SQNR of recipes on held-out FP-trajectory inputs of dit-digits, and their compile time.

Calibration: ``from_sampler`` on the FP model (100 DDPM steps, guidance 2.0, 16 trajectories, 25 steps x
10 samples, seed 0). Held out: the same sampler with seed 1 (other noise, other trajectories), 25 steps x 10
samples. For each recipe: compile on the calibration set (one thread unless ``--threads``), then the SQNR of
the compiled model's noise prediction against FP's over all held-out inputs,

    SQNR = 10 log10( sum eps_fp^2 / sum (eps_fp - eps_q)^2 ),

with the layers each recipe quantizes listed (count and roles), so recipes are compared on the same layers.

    python bench/heldout_sqnr.py --recipes w8a8 tq-dit-w8a8 ditq-w8a8 [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch

import ditq_compiler as dq
from ditq_compiler import zoo
from ditq_compiler.atomic import write_text
from ditq_compiler.calibration import from_sampler


def heldout_sqnr(model, compiled, calls) -> float:
    signal = noise = 0.0
    with torch.no_grad():
        for args, kwargs in calls:
            ref = model(*args, **kwargs).sample.double()
            out = compiled(*args, **kwargs).sample.double()
            signal += float(ref.square().sum())
            noise += float((ref - out).square().sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["w8a8", "tq-dit-w8a8", "ditq-w8a8"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/heldout-sqnr-dit-digits")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, scheduler = zoo.load("dit-digits"), zoo.scheduler("dit-digits")
    sampled = dict(num_inference_steps=100, guidance_scale=2.0, num_trajectories=16, steps=25, samples_per_step=10,
                   progress=False)
    calibration = from_sampler(model, scheduler, seed=0, **sampled)
    held_out = from_sampler(model, scheduler, seed=1, **sampled)
    rows = []
    for name in args.recipes:
        start = time.perf_counter()
        compiled = dq.compile(model, name, calibration=calibration, progress=False, cache_dir=False)
        seconds = time.perf_counter() - start
        roles = sorted({layer.role for layer in compiled.layers})
        rows.append({"recipe": name, "layers": len(compiled.layers), "roles": roles,
                     "heldout_sqnr_db": heldout_sqnr(model, compiled, held_out), "compile_s": seconds,
                     "stage_seconds": {k: round(v, 2) for k, v in compiled.stage_seconds.items()}})
        r = rows[-1]
        print(f"{name:16s} layers {r['layers']:3d}  held-out SQNR {r['heldout_sqnr_db']:6.2f} dB  "
              f"compile {seconds:6.1f} s", flush=True)
    machine = platform.processor() or platform.machine()
    result = {"torch": torch.__version__, "threads": args.threads, "machine": machine,
              "load_average": list(os.getloadavg()), "calibration": "from_sampler seed 0, 25 steps x 10",
              "held_out": "from_sampler seed 1, 25 steps x 10", "rows": rows}
    write_text(f"{args.out}.json", json.dumps(result, indent=2))
    lines = ["| recipe | layers | held-out output SQNR (dB) | compile (s, "
             f"{args.threads} thread{'s' if args.threads > 1 else ''}) |", "|---|---|---|---|"]
    lines += [f"| `{r['recipe']}` | {r['layers']} ({', '.join(r['roles'])}) | {r['heldout_sqnr_db']:.2f} | "
              f"{r['compile_s']:.1f} |" for r in rows]
    write_text(f"{args.out}.md", "`python bench/heldout_sqnr.py --recipes " + " ".join(args.recipes) +
               f" --threads {args.threads}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
