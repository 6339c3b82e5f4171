"""Which activation quantizers limit each recipe on a zoo model (``ditq_compiler.inspection.error_budget``).

Every recipe is compiled on TQ-DiT's calibration set (``from_sampler(..., selection="time_groups")``,
10 groups x 32 samples, the same set as ``bench/quality.py --tq-ablation``) and its output SQNR
against FP is measured on that set with all quantizers, with the weights alone, and with one class
of activation quantizers at a time. Writes

    bench/results/error-budget-<model>.json     all numbers
    bench/results/error-budget-<model>.md       one table per recipe

    python bench/error_budget.py --model dit-digits --recipes w6a6-minmax tq-dit-w6a6 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import ditq_compiler as dq
from ditq_compiler import zoo
from ditq_compiler.atomic import write_text
from ditq_compiler.calibration import from_sampler
from ditq_compiler.inspection.error_budget import error_budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-digits", choices=["dit-digits", "unet-digits"])
    parser.add_argument("--recipes", nargs="+", default=["w6a6-minmax", "tq-dit-w6a6"],
                        help="presets or recipe files (bench/recipes/*.yaml)")
    parser.add_argument("--steps", type=int, default=100, help="DDPM steps of the calibration trajectories")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    recipes = [dq.Recipe.load(name) for name in args.recipes]   # a typo fails before the calibration set is drawn
    if args.threads:
        torch.set_num_threads(args.threads)
    model, scheduler = zoo.load(args.model), zoo.scheduler(args.model)
    calibration = from_sampler(model, scheduler, num_inference_steps=args.steps, guidance_scale=2.0,
                               num_trajectories=32, seed=123, selection="time_groups", groups=min(10, args.steps),
                               samples_per_group=32, progress=False)
    results, tables = [], []
    for recipe in recipes:   # a recipe file (bench/recipes/*.yaml) is named by its `name:`
        name = recipe.name
        compiled = dq.compile(model, recipe, calibration=calibration, progress=False, cache_dir=False)
        budget = error_budget(compiled, model, calibration, progress=False)
        results.append({"recipe": name, **dataclasses.asdict(budget)})
        tables += [f"### {name}", "", budget.markdown()]
        print(f"{name}:\n{budget.markdown()}", flush=True)
    stem = args.out / f"error-budget-{args.model}"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_text(stem.with_suffix(".json"), json.dumps({"settings": settings, "torch": torch.__version__,
                                                      "budgets": results}, indent=2))
    write_text(stem.with_suffix(".md"), "\n".join(tables))


if __name__ == "__main__":
    main()
