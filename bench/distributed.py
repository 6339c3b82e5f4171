"""One compile spread over 1, 2 and 4 processes (torch.distributed, gloo, one thread each): time and memory.

For each recipe the zoo model is compiled on the calibration set its paper uses (drawn once from the
FP sampler and saved, as ``bench/calibration_cost.py`` does), by one plain process and by ``torchrun
--standalone --nproc-per-node N`` for the other counts, every process on one thread. Per run and rank:
the compile's wall and CPU seconds, the seconds per stage as ``compiled.summary()`` prints them (the
reconstruction stage is TaQ-DiT's block reconstruction, the calibration stage TQ-DiT's scale search),
and the process's peak RSS (``ru_maxrss``) before and after the compile. Each run saves its artifact;
the N-process model's outputs on the calibration inputs are compared with the one-process model's
(bitwise equal, or the SQNR between them).

The ratio the README quotes is the N-process stage time over the one-process one, both from the same
invocation. With more processes than cores (4 on a 2-core machine) the processes share cores: that
row shows the per-rank memory and that the result holds, not a speed-up.

    python bench/distributed.py [--processes 1 2 4] [--recipes taq-dit-w4a8 tq-dit-w6a6]
    python bench/distributed.py --iterations 20 --steps 20 --out /tmp/smoke     # a quick smoke run

Writes <out>/distributed-<model>.json and .md (default bench/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))        # the package of this checkout, in this process and (PYTHONPATH) its workers
DEFAULT_RECIPES = ["taq-dit-w4a8", "tq-dit-w6a6"]


def selection_for(recipe: str) -> str:
    return "uniform" if recipe.startswith("taq-dit") else "time_groups"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def recipe_for(name: str, iterations: int | None):
    import ditq_compiler as dq

    recipe = dq.Recipe.load(name)
    if iterations is not None and recipe.reconstruction is not None:
        recipe = dataclasses.replace(recipe, reconstruction=dataclasses.replace(recipe.reconstruction,
                                                                                iterations=iterations))
    return recipe


def worker(recipe_name: str, calibration_path: str, model_name: str, iterations: int | None, out: Path) -> None:
    """Compile once in this process (one rank of a torchrun job, or alone); write this rank's figures."""
    import ditq_compiler as dq
    from ditq_compiler import zoo
    from ditq_compiler.calibration import CalibrationSet

    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    model, calibration = zoo.load(model_name), CalibrationSet.load(calibration_path)
    recipe = recipe_for(recipe_name, iterations)
    before = peak_rss_mib()
    wall, cpu = time.perf_counter(), time.process_time()
    compiled = dq.compile(model, recipe, calibration=calibration, progress=False, cache_dir=False,
                          distributed=world > 1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    compiled.save(out / "artifact")                 # every rank calls it; rank 0 writes
    figures = {"rank": rank, "world_size": world, "compile_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
               "stage_seconds": {k: round(v, 2) for k, v in compiled.stage_seconds.items()},
               "peak_rss_before_mib": round(before), "peak_rss_mib": round(peak_rss_mib()),
               "output_sqnr_db": round(compiled.output_sqnr_db, 2)}
    (out / f"rank{rank}.json").write_text(json.dumps(figures))


def launch(processes: int, recipe: str, calibration: Path, args: argparse.Namespace, out: Path) -> list[dict]:
    """Run the workers of one row; returns each rank's figures."""
    out.mkdir(parents=True, exist_ok=True)
    script = [str(Path(__file__).resolve()), "--model", args.model, "--worker", recipe, str(calibration), str(out)]
    if args.iterations is not None:
        script += ["--iterations", str(args.iterations)]
    command = [sys.executable, *script] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        errors = "\n".join(f"{p.name}:\n{p.read_text()}" for p in sorted(out.glob("rank*.error")))
        raise SystemExit(f"{recipe} on {processes} process(es) failed:\n{errors or done.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def agreement(reference: Path, other: Path, calibration: Path) -> str:
    """'bitwise' when the two artifacts' models give the same outputs on the calibration inputs, else the SQNR
    of one against the other."""
    import ditq_compiler as dq
    from ditq_compiler.calibration import CalibrationSet

    torch.set_num_threads(1)
    one, many = dq.load(reference), dq.load(other)
    with torch.no_grad():
        a = torch.cat([one(*args, **kwargs).sample for args, kwargs in CalibrationSet.load(calibration)])
        b = torch.cat([many(*args, **kwargs).sample for args, kwargs in CalibrationSet.load(calibration)])
    if torch.equal(a, b):
        return "bitwise"
    return f"{float(10 * torch.log10(a.square().sum() / (a - b).square().sum())):.1f} dB"


def stage_of(recipe: str) -> str:
    """The stage the processes share the most work of: reconstruction (TaQ-DiT) or the scale search."""
    return "reconstruction" if selection_for(recipe) == "uniform" else "calibration"


def markdown(result: dict) -> str:
    lines = ["| recipe | processes | compile s (wall, rank 0) | stage | stage s (slowest rank) | stage vs 1 process "
             "| peak RSS MiB per rank | RSS added by compile MiB per rank | output SQNR vs FP dB "
             "| vs 1 process |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ranks, stage = row["ranks"], row["stage"]
        seconds = max(r["stage_seconds"].get(stage, 0.0) for r in ranks)
        single = row["single_stage_seconds"]
        lines.append(f"| {row['recipe']} | {row['processes']} | {ranks[0]['compile_seconds']:.0f} | {stage} "
                     f"| {seconds:.1f} | {seconds / single:.2f}x | "
                     f"{' / '.join(str(r['peak_rss_mib']) for r in ranks)} | "
                     f"{' / '.join(str(r['peak_rss_mib'] - r['peak_rss_before_mib']) for r in ranks)} | "
                     f"{ranks[0]['output_sqnr_db']:.2f} | {row['agreement']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-digits", choices=["dit-digits", "unet-digits"])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=100, help="DDPM steps of the calibration sampler")
    parser.add_argument("--iterations", type=int, help="reconstruction iterations per block (default: the recipe's)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--worker", nargs=3, metavar=("RECIPE", "CALIBRATION", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        try:
            worker(args.worker[0], args.worker[1], args.model, args.iterations, Path(args.worker[2]))
        except BaseException:
            rank = os.environ.get("RANK", "0")
            (Path(args.worker[2]) / f"rank{rank}.error").write_text(traceback.format_exc())
            raise
        return

    from ditq_compiler import zoo
    from ditq_compiler.atomic import write_text
    from ditq_compiler.calibration import from_sampler

    if 1 not in args.processes:
        parser.error("--processes must include 1: every row is compared with one process")
    for recipe in args.recipes:
        recipe_for(recipe, args.iterations)               # unknown names fail before any work
    torch.set_num_threads(1)
    model, scheduler = zoo.load(args.model), zoo.scheduler(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calibrations = {}
        for selection in sorted({selection_for(r) for r in args.recipes}):
            options = (dict(selection="time_groups", groups=10, samples_per_group=32) if selection == "time_groups"
                       else dict(steps=min(25, args.steps), samples_per_step=10))
            calibrations[selection] = Path(tmp) / f"{selection}.safetensors"
            from_sampler(model, scheduler, num_inference_steps=args.steps, guidance_scale=2.0, num_trajectories=32,
                         seed=123, progress=False, **options).save(calibrations[selection])
        for recipe in args.recipes:
            calibration, single = calibrations[selection_for(recipe)], None
            for processes in sorted(args.processes):
                out = Path(tmp) / f"{recipe}-{processes}"
                ranks = launch(processes, recipe, calibration, args, out)
                stage_seconds = max(r["stage_seconds"].get(stage_of(recipe), 0.0) for r in ranks)
                single = single if single is not None else stage_seconds
                row = {"recipe": recipe, "processes": processes, "stage": stage_of(recipe),
                       "single_stage_seconds": single, "ranks": ranks,
                       "agreement": "-" if processes == 1 else agreement(
                           Path(tmp) / f"{recipe}-1" / "artifact", out / "artifact", calibration)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"model": args.model, "threads_per_process": 1, "steps": args.steps, "iterations": args.iterations,
              "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rows": rows}
    for suffix, text in ((".json", json.dumps(result, indent=2)), (".md", markdown(result))):
        write_text(args.out / f"distributed-{args.model}{suffix}", text)
    print(markdown(result))


if __name__ == "__main__":
    main()
