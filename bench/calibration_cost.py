"""What calibration costs: compile wall time, CPU time and peak memory (RSS) per recipe, one process each.

TQ-DiT claims a much cheaper calibration than reconstruction-based methods (its Table IV: 89% less
GPU time, 45% less GPU memory than PTQ4DiT). This measures it on our CPU: every recipe compiles the
zoo model in a fresh process (so the peak RSS is its own), on the calibration set its paper uses,
drawn once from the FP sampler and saved:

    uniform       TaQ-DiT: 25 steps x 10 samples = 250 inputs          (taq-dit-* recipes)
    time_groups   TQ-DiT: 10 groups x 32 samples = 320 inputs          (every other recipe)

Per recipe: the compile's wall and CPU seconds (CPU time is what the load of other processes does
not inflate), the seconds per stage as ``compiled.summary()`` prints them, and the process's peak
RSS before and after the compile (``ru_maxrss``; the difference is what the compile added on top of
the model, the data and torch). Writes bench/results/calibration-cost-<model>.{json,md}.

    python bench/calibration_cost.py --threads 1 [--recipes tq-dit-w6a6 taq-dit-w4a8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_RECIPES = ["tq-dit-w6a6", "taq-dit-w4a8"]


def selection_for(recipe: str) -> str:
    return "uniform" if recipe.startswith("taq-dit") else "time_groups"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def worker(recipe: str, calibration_path: str, model_name: str, threads: int) -> None:
    """Compile once and print one JSON line (runs in its own process)."""
    import ditq_compiler as dq
    from ditq_compiler import zoo
    from ditq_compiler.calibration import CalibrationSet

    torch.set_num_threads(threads)
    model, calibration = zoo.load(model_name), CalibrationSet.load(calibration_path)
    before = peak_rss_mib()
    wall, cpu = time.perf_counter(), time.process_time()
    compiled = dq.compile(model, recipe, calibration=calibration, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"recipe": recipe, "calibration_inputs": calibration.num_samples,
                      "selection": calibration.selection["selection"], "compile_seconds": round(wall, 1),
                      "compile_cpu_seconds": round(cpu, 1),
                      "stage_seconds": {k: round(v, 1) for k, v in compiled.stage_seconds.items()},
                      "peak_rss_before_mib": round(before), "peak_rss_mib": round(peak_rss_mib()),
                      "output_sqnr_db": round(compiled.output_sqnr_db, 2)}))


def markdown(rows: list[dict]) -> str:
    lines = ["| recipe | calibration inputs | compile s (wall) | compile s (CPU) | calibration + reconstruction s "
             "| peak RSS MiB | RSS added by compile MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        stages = r["stage_seconds"]
        fitting = stages.get("calibration", 0) + stages.get("reconstruction", 0)
        lines.append(f"| {r['recipe']} | {r['calibration_inputs']} ({r['selection']}) | {r['compile_seconds']:.0f} | "
                     f"{r['compile_cpu_seconds']:.0f} | {fitting:.0f} | {r['peak_rss_mib']} | "
                     f"{r['peak_rss_mib'] - r['peak_rss_before_mib']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-digits", choices=["dit-digits", "unet-digits"])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    parser.add_argument("--steps", type=int, default=100, help="DDPM steps of the calibration sampler")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--worker", nargs=2, metavar=("RECIPE", "CALIBRATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.model, args.threads)
        return

    import ditq_compiler as dq
    from ditq_compiler import zoo
    from ditq_compiler.calibration import from_sampler

    for recipe in args.recipes:
        dq.Recipe.load(recipe)
    torch.set_num_threads(args.threads)
    model, scheduler = zoo.load(args.model), zoo.scheduler(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for selection in sorted({selection_for(r) for r in args.recipes}):
            options = (dict(selection="time_groups", groups=10, samples_per_group=32) if selection == "time_groups"
                       else dict(steps=25, samples_per_step=10))
            paths[selection] = Path(tmp) / f"{selection}.safetensors"
            from_sampler(model, scheduler, num_inference_steps=args.steps, guidance_scale=2.0, num_trajectories=32,
                         seed=123, progress=False, **options).save(paths[selection])
        for recipe in args.recipes:
            done = subprocess.run([sys.executable, __file__, "--model", args.model, "--threads", str(args.threads),
                                   "--worker", recipe, str(paths[selection_for(recipe)])],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{recipe}: the worker failed:\n{done.stderr}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    from ditq_compiler.atomic import write_text   # here: the parent process measures nothing itself, but stays light

    result = {"model": args.model, "threads": args.threads, "steps": args.steps, "torch": torch.__version__,
              "rows": rows}
    for suffix, text in ((".json", json.dumps(result, indent=2)), (".md", markdown(rows))):
        write_text(args.out / f"calibration-cost-{args.model}{suffix}", text)
    print(markdown(rows))


if __name__ == "__main__":
    main()
