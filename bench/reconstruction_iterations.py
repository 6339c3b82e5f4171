"""How many reconstruction iterations TaQ-DiT needs on a zoo model: quality against compile time.

The paper runs 20k iterations per block on a GPU; on 2 CPU cores the recipe's default must
fit the 15-minute compile budget. For each iteration count, ``taq-dit-w4a8`` is compiled with
the same calibration set as ``bench/quality.py`` (100 DDPM steps, guidance 2.0, seed 123) and
measured by its output SQNR on the calibration data and the median SQNR of the noise
prediction against FP along 32 FP trajectories (100 steps). 0 iterations = the shift and
migration with round-to-nearest weights and observer scales (no learning).

    python bench/reconstruction_iterations.py [--iterations 0 250 1000 3000] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import ditq_compiler as dq
from ditq_compiler import quality, zoo
from ditq_compiler.atomic import write_text
from ditq_compiler.calibration import from_sampler
from ditq_compiler.report import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-digits", choices=["dit-digits", "unet-digits"])
    parser.add_argument("--recipe", default="taq-dit-w4a8")
    parser.add_argument("--iterations", type=int, nargs="+", default=[0, 250, 1000, 3000])
    parser.add_argument("--trajectories", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    base = dq.Recipe.load(args.recipe)
    if base.reconstruction is None:
        parser.error(f"recipe {args.recipe} has no reconstruction section")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, scheduler = zoo.load(args.model), zoo.scheduler(args.model)
    calibration = from_sampler(model, scheduler, num_inference_steps=100, guidance_scale=2.0,
                               num_trajectories=32, steps=25, seed=123, progress=False)
    labels = torch.arange(args.trajectories) % 10
    rows = []
    for iterations in args.iterations:
        recipe = dataclasses.replace(base, reconstruction=dataclasses.replace(base.reconstruction,
                                                                              iterations=iterations))
        start = time.perf_counter()
        compiled = dq.compile(model, recipe, calibration=calibration, progress=False)
        seconds = time.perf_counter() - start
        _, sqnr = quality.noise_sqnr_by_step(model, compiled, scheduler, labels, num_inference_steps=100,
                                             guidance_scale=2.0)
        rows.append({"iterations": iterations, "compile_seconds": round(seconds, 1),
                     "stage_seconds": {k: round(v, 1) for k, v in compiled.stage_seconds.items()},
                     "output_sqnr_db": compiled.output_sqnr_db, "noise_sqnr_median_db": statistics.median(sqnr)})
        print(f"{iterations} iterations: compile {seconds:.0f} s, output SQNR {compiled.output_sqnr_db:.2f} dB, "
              f"median noise SQNR {rows[-1]['noise_sqnr_median_db']:.2f} dB", flush=True)
        write(args, rows, complete=len(rows) == len(args.iterations))

    table = format_table([[r["iterations"], f"{r['compile_seconds']:.0f}", f"{r['output_sqnr_db']:.2f}",
                           f"{r['noise_sqnr_median_db']:.2f}"] for r in rows],
                         ["iterations per block", "compile s", "output SQNR dB", "median noise SQNR dB"])
    print(table)


def write(args, rows: list[dict], complete: bool) -> None:
    """Atomically (re)write the JSON after every row, so a long run loses nothing."""
    result = {"model": args.model, "recipe": args.recipe, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "complete": complete, "rows": rows}
    write_text(args.out / f"reconstruction-iterations-{args.model}.json", json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
