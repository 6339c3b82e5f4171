"""Quality of quantized zoo models: FD-digits, class accuracy and noise-prediction SQNR per timestep.

For one zoo model and a list of recipes: FP is sampled with two seeds (their FD difference is
the noise floor of the measure); every recipe is compiled with a calibration set drawn from
the FP sampler (``dq.calibration.from_sampler``, shared by all recipes) and sampled with seed 0.
Per configuration: FD-digits of N class-conditional samples (classes 0..9 in turn) against the
held-out digits, the classifier's accuracy on them, and the SQNR of the noise prediction
against FP along the FP trajectory. Writes

    bench/results/quality-<model>.json      all numbers and settings
    bench/results/quality-<model>.md        the table the README quotes
    bench/results/quality-<model>-sqnr.png  SQNR vs timestep, one line per recipe
    bench/results/quality-<model>/<config>.png  a grid of samples per configuration

    python bench/quality.py --model dit-digits [--samples 2000 --steps 100 --guidance 2.0]
    python bench/quality.py --model dit-digits --ablation --fp-seeds 1     # TaQ-DiT Table IV layout
    python bench/quality.py --model dit-digits --tq-ablation --fp-seeds 1  # TQ-DiT Table III layout
    python bench/quality.py --model dit-digits --robuq --fp-seeds 1        # RobuQ recipes + AMPN table
    python bench/quality.py --model dit-digits --composed --seeds 2        # ditq-* presets vs each paper's
    python bench/quality.py --model unet-digits --bidm --fp-seeds 1        # BiDM+ ablation (FPB / TES / SBM)

``--robuq`` measures the RobuQ recipes and the AMPN variants (``ampn-a<B>``: robuq-w1.58a3 with an
average budget of B activation bits; ``-ptq``: sensitivities measured before distillation), written
to quality-<model>-robuq.*; distillation draws its inputs from a larger calibration set (all
``--steps`` steps, 16 inputs each) unless ``--calibration-steps`` / ``--samples-per-step`` say otherwise.

``--composed`` measures the composed ``ditq-*`` presets next to the preset of the same bits each must beat
(``COMPOSED``), each calibrated as its baseline is: the default set (25 steps x 10), TQ-DiT's time-grouped
set, or RobuQ's (every step x 16), written to quality-<model>-composed.*; with ``--seeds K`` the gaps are
paired per seed.

``--bidm`` measures the W1A1 presets in the layout of BiDM+'s ablation (FPB / TES / SBM ticks over the XNOR
baseline, ReAct's learnable threshold as an extra row), calibrated as RobuQ's distillation is (every step x 16,
with the noise for L_DM and the schedule for TES), written to quality-<model>-bidm.*.

``--tq-ablation`` calibrates every recipe on a TQ-DiT calibration set (``selection="time_groups"``,
10 groups x 32 samples, the paper's) and writes quality-<model>-tq-ablation.*.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import statistics
import time
from pathlib import Path

import torch

import ditq_compiler as dq
from ditq_compiler import quality, zoo
from ditq_compiler.atomic import replacing, write_text
from ditq_compiler.calibration import from_sampler
from ditq_compiler.stages import CLOCKS as STAGES
from ditq_compiler.sampling import sample
from ditq_compiler.zoo.data import digits

DEFAULT_RECIPES = ["w8a8-minmax", "w8a8", "w4a8-minmax", "w4a8", "w6a6-minmax", "w6a6"]
# TaQ-DiT Table IV on our model: (joint reconstruction, static transformation) per recipe
ABLATION = {"w4a8-minmax": None, "taq-dit-w4a8-separate": (False, False), "taq-dit-w4a8-noshift": (True, False),
            "taq-dit-w4a8": (True, True)}
# TQ-DiT Table III on our model: (HO, MRQ, TGQ) per recipe; tq-dit-w8a8 is compared with FP seed to seed
TQ_ABLATION = {"w6a6-minmax": None, "tq-dit-w6a6-baseline": (False, False, False),
               "tq-dit-w6a6-ho": (True, False, False), "tq-dit-w6a6-ho-mrq": (True, True, False),
               "tq-dit-w6a6": (True, True, True), "tq-dit-w8a8": None}
ROBUQ = ["w1.58a4-minmax", "robuq-w1.58a4", "robuq-w1.58a3", "ampn-a3-ptq", "ampn-a2", "ampn-a4", "ampn-a4-ptq",
         "w4a4-minmax", "robuq-w4a4", "hadamard-only"]
# composed preset -> (the preset of the same bits it must beat, the calibration set both use); the targets
COMPOSED = {"ditq-w8a8": ("w8a8", "default"), "ditq-w6a6": ("tq-dit-w6a6", "time_groups"),
            "ditq-w4a8": ("taq-dit-w4a8", "default"), "ditq-w4a4": ("w4a4-minmax", "robuq")}
COMPOSED_FD_RATIO = {"ditq-w8a8": 1.0}   # FD to FP samples at most this times the baseline's (others: half)
COMPOSED_EXTRA = {"robuq-w4a4": "robuq"}          # measured too: RobuQ's own W4A4 next to ditq-w4a4
# BiDM+'s ablation on our models: (FPB, TES, SBM) per recipe; w1a1-react is ReActNet's threshold, no BiDM+ part
BIDM = {"w1a1-xnor": (False, False, False), "bidm-w1a1-fpb": (True, False, False),
        "bidm-w1a1-fpb-tes": (True, True, False), "bidm-w1a1": (True, True, True)}
BIDM_EXTRA = ["w1a1-react"]
AMPN = re.compile(r"ampn-a(\d+(?:\.\d+)?)(-ptq)?")
# a TQ-DiT preset with time groups at the post-softmax sites only, as the paper does (the presets use every site)
TGQ_SOFTMAX = re.compile(r"(tq-dit-w\da\d)-tgq-softmax")


def recipe_for(name: str, iterations: int | None = None) -> dq.Recipe:
    """A preset, or an AMPN variant of robuq-w1.58a3: ``ampn-a<budget>[-ptq]``; ``iterations`` overrides the
    distillation's (and the AMPN search's) iteration counts, for smoke runs."""
    paper_sites = TGQ_SOFTMAX.fullmatch(name)
    if paper_sites is not None:
        recipe = dq.Recipe.load(paper_sites.group(1))
        sites = dataclasses.replace(recipe.time_groups, sites=("post_softmax",))
        return dataclasses.replace(recipe, name=name, time_groups=sites, description=f"{recipe.name} with time "
                                   "groups at the post-softmax sites only (the paper's TGQ)")
    match = AMPN.fullmatch(name)
    recipe = dq.Recipe.load(name if match is None else "robuq-w1.58a3")
    if match is not None:
        mixed = dataclasses.replace(recipe.mixed_precision, budget=float(match.group(1)),
                                    sensitivity="ptq" if match.group(2) else "distilled")
        recipe = dataclasses.replace(recipe, name=name, mixed_precision=mixed)
    if iterations is not None and recipe.distillation is not None:
        recipe = dataclasses.replace(recipe, distillation=dataclasses.replace(recipe.distillation,
                                                                              iterations=iterations))
    if iterations is not None and recipe.mixed_precision is not None:
        recipe = dataclasses.replace(recipe, mixed_precision=dataclasses.replace(recipe.mixed_precision,
                                                                                 search_iterations=iterations))
    return recipe


def ampn_budget(row: dict) -> tuple[float, str] | None:
    """(budget, sensitivity) of an AMPN row, None for others."""
    ampn = row.get("ampn")
    return None if ampn is None else (ampn["budget"], ampn["sensitivity_from"])


def measure(name: str, denoiser, fp_model, scheduler, args, seed: int, out_dir: Path,
            fp_samples: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    labels = torch.arange(args.samples) % 10
    start = time.perf_counter()
    samples = sample_on_cpu(denoiser, scheduler, args, labels, seed, progress=not args.quiet)
    seconds = time.perf_counter() - start
    quality.save_grid(samples[:40], out_dir / f"{name}.png")
    row = {"config": name, "seed": seed, "fd_digits": quality.fd_digits(samples),
           "class_accuracy": quality.class_accuracy(samples, labels), "sample_seconds": round(seconds, 1)}
    if fp_samples is not None:
        row["fd_to_fp"] = quality.fd_between(samples, fp_samples)
    if denoiser is not fp_model:
        steps, sqnr = quality.noise_sqnr_by_step(fp_model, denoiser, scheduler, labels[: args.sqnr_samples],
                                                 num_inference_steps=args.steps, guidance_scale=args.guidance)
        row.update(timesteps=steps, noise_sqnr_db=sqnr, noise_sqnr_median_db=statistics.median(sqnr))
    return row, samples


def sample_on_cpu(denoiser, scheduler, args, labels: torch.Tensor, seed: int, progress: bool) -> torch.Tensor:
    """The bench's sampler settings, for one noise seed; the samples come back to the CPU for scoring."""
    return sample(denoiser, scheduler, labels, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  seed=seed, batch_size=args.batch_size, progress=progress).cpu()


def measure_seeds(denoiser, scheduler, args, row: dict, samples: torch.Tensor,
                  fp_by_seed: dict[int, torch.Tensor] | None) -> dict[int, torch.Tensor]:
    """Sample seeds 1..K-1 as well (seed 0 is ``samples``); per-seed FD, accuracy and FD to the FP samples of the
    same seed go into ``row["seeds"]``. Returns the samples by seed (FP's are the reference of the others)."""
    labels = torch.arange(args.samples) % 10
    by_seed = {0: samples}
    for seed in range(1, args.seeds):
        by_seed[seed] = sample_on_cpu(denoiser, scheduler, args, labels, seed, progress=False)
    row["seeds"] = {"fd_digits": [quality.fd_digits(x) for x in by_seed.values()],
                    "class_accuracy": [quality.class_accuracy(x, labels) for x in by_seed.values()]}
    if fp_by_seed is not None:
        row["seeds"]["fd_to_fp"] = [quality.fd_between(x, fp_by_seed[k]) for k, x in by_seed.items()]
    return by_seed


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)); error nan for one value."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def seeds_markdown(rows: list[dict]) -> list[str]:
    """The table over K paired seeds: each configuration's FD minus FP's FD for the same noise, averaged."""
    k = len(rows[0]["seeds"]["fd_digits"])
    lines = ["", f"Over {k} noise seeds (0..{k - 1}, the same for every row; the gap is paired: a configuration's "
                 "FD minus FP's FD for the same seed, mean +- standard error):", "",
             "| config | FD-digits mean +- sd | FD gap vs FP, paired mean +- s.e. | FD to FP samples mean | "
             "class accuracy mean |", "|---|---|---|---|---|"]
    for r in rows:
        seeds = r.get("seeds")
        if seeds is None or r["config"].startswith("fp-seed"):
            continue
        fd = seeds["fd_digits"]
        gap, error = mean_and_error(seed_gaps(r, rows[0]))
        to_fp = f"{statistics.fmean(max(v, 0.0) for v in seeds['fd_to_fp']):.2f}" if "fd_to_fp" in seeds else "-"
        lines.append(f"| {r['config']} | {statistics.fmean(fd):.2f} +- {statistics.stdev(fd):.2f} | "
                     f"{gap:+.2f} +- {error:.2f} | {to_fp} | {100 * statistics.fmean(seeds['class_accuracy']):.1f}% |")
    return lines


def seed_gaps(row: dict, fp_row: dict) -> list[float]:
    """The row's FD minus FP's for the same seed, per seed (seed 0 alone without --seeds)."""
    if "seeds" in row and "seeds" in fp_row:
        pairs = zip(row["seeds"]["fd_digits"], fp_row["seeds"]["fd_digits"], strict=True)
        return [q - f for q, f in pairs]
    return [row["fd_digits"] - fp_row["fd_digits"]]


def paired_gap(row: dict, fp_row: dict) -> float:
    """Mean over seeds of the row's FD minus FP's for the same seed."""
    return statistics.fmean(seed_gaps(row, fp_row))


def robuq_markdown(rows: list[dict]) -> list[str]:
    """The RobuQ summary: the issue's FD-gap criterion, compile times, and the AMPN tables."""
    by_name = {r["config"]: r for r in rows}
    lines = []
    if "robuq-w1.58a4" in by_name and "w1.58a4-minmax" in by_name:
        ours, base = (paired_gap(by_name[n], rows[0]) for n in ("robuq-w1.58a4", "w1.58a4-minmax"))
        lines += ["", f"FD-digits gap: robuq-w1.58a4 {ours:+.2f} vs w1.58a4-minmax {base:+.2f}: |ratio| "
                      f"{abs(ours) / abs(base):.3f} (must be <= 0.5); class accuracy "
                      f"{100 * by_name['robuq-w1.58a4']['class_accuracy']:.1f}% (must be >= 80%)."]
    timed = [r for r in rows if "compile_seconds" in r]
    if timed:
        stages = [k for k in STAGES if any(k in r["stage_seconds"] for r in timed)]   # the order compile runs them
        lines += ["", "Compile time, one thread (wall seconds; CPU seconds of the process in brackets):", "",
                  "| config | compile s (CPU s) | " + " | ".join(stages) + " |", "|---|---|" + "---|" * len(stages)]
        for r in timed:
            lines.append(f"| {r['config']} | {r['compile_seconds']:.0f} ({r['compile_cpu_seconds']:.0f}) | "
                         + " | ".join(f"{r['stage_seconds'].get(k, 0):.1f}" for k in stages) + " |")
    ampn = [r for r in rows if ampn_budget(r)]
    if ampn:
        lines += ["", "AMPN (ternary weights everywhere; activation bits per layer from {2, 3, 4, 6, 8} under an "
                      "average budget weighted by multiply-adds):", "",
                  "| budget | sensitivity | average bits (by MACs / by layer) | FD-digits | FD to FP samples | "
                  "class accuracy | median noise SQNR dB |", "|---|---|---|---|---|---|---|"]
        if "robuq-w1.58a4" in by_name:
            r = by_name["robuq-w1.58a4"]
            lines.append(f"| 4 (uniform, robuq-w1.58a4) | - | 4.00 / 4.00 | {r['fd_digits']:.2f} | "
                         f"{r.get('fd_to_fp', float('nan')):.2f} | {100 * r['class_accuracy']:.1f}% | "
                         f"{r['noise_sqnr_median_db']:.1f} |")
        for r in sorted(ampn, key=lambda r: (ampn_budget(r)[0], ampn_budget(r)[1])):
            a = r["ampn"]
            lines.append(f"| {a['budget']:g} | {a['sensitivity_from']} | {a['average_bits']:.2f} / "
                         f"{a['layer_average_bits']:.2f} | {r['fd_digits']:.2f} | "
                         f"{r.get('fd_to_fp', float('nan')):.2f} "
                         f"| {100 * r['class_accuracy']:.1f}% | {r['noise_sqnr_median_db']:.1f} |")
        columns = sorted(ampn, key=lambda r: (ampn_budget(r)[1] != "distilled", ampn_budget(r)[0]))
        layers = list(columns[0]["ampn"]["bits"])
        lines += ["", "Activation bits chosen per layer:", "",
                  "| layer | " + " | ".join(f"A{ampn_budget(r)[0]:g} {ampn_budget(r)[1]}" for r in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for layer in layers:
            lines.append(f"| {layer} | " + " | ".join(str(r["ampn"]["bits"].get(layer, "-")) for r in columns) + " |")
        measured = {a["sensitivity_from"]: a["sensitivity"] for a in (r["ampn"] for r in ampn) if "sensitivity" in a}
        if {"ptq", "distilled"} <= set(measured):
            rho = {bits: spearman([measured["ptq"][n][str(bits)] for n in layers],
                                  [measured["distilled"][n][str(bits)] for n in layers]) for bits in (2, 3)}
            lines += ["", "Rank correlation (Spearman) of the layers' sensitivity measured before vs after "
                                  "distillation: "
                          + ", ".join(f"{rho[b]:.2f} at {b} bits" for b in rho) + "."]
    return lines


def bidm_markdown(rows: list[dict]) -> list[str]:
    """BiDM+'s ablation table (FPB / TES / SBM), the extra rows, compile times and the targets."""
    lines = ["", "BiDM+ ablation (the layout of the paper's ablation table; W1A1, first and last layers in float):",
             ""] + _ablation_rows(rows, BIDM, ["FPB", "TES", "SBM"])
    by_name = {r["config"]: r for r in rows}
    for name in BIDM_EXTRA:
        if name in by_name:
            r = by_name[name]
            lines.append(f"| {name} (ReAct threshold) | | | {r['fd_digits']:.2f} | "
                         f"{r['fd_digits'] - rows[0]['fd_digits']:+.2f} | {r.get('fd_to_fp', float('nan')):.2f} | "
                         f"{100 * r['class_accuracy']:.1f}% | {r['noise_sqnr_median_db']:.1f} |")
    timed = [r for r in rows if "compile_seconds" in r]
    if timed:
        lines += ["", "| config | compile s (CPU s) |", "|---|---|"] + [
            f"| {r['config']} | {r['compile_seconds']:.0f} ({r['compile_cpu_seconds']:.0f}) |" for r in timed]
    if "bidm-w1a1" in by_name and "w1a1-xnor" in by_name:
        ours, base = (paired_gap(by_name[n], rows[0]) for n in ("bidm-w1a1", "w1a1-xnor"))
        accuracy = 100 * by_name["bidm-w1a1"]["class_accuracy"]
        lines += ["", f"FD-digits gap: bidm-w1a1 {ours:+.2f} vs w1a1-xnor {base:+.2f} (|ratio| "
                      f"{abs(ours) / abs(base):.2f}); class accuracy {accuracy:.1f}%."]
    order = [n for n in BIDM if n in by_name]
    steps = [f"{b} -> {a}: FD to FP {by_name[b].get('fd_to_fp', float('nan')):.2f} -> "
             f"{by_name[a].get('fd_to_fp', float('nan')):.2f}" for b, a in zip(order, order[1:], strict=False)]
    if steps:
        lines += ["", "Each component against the row before it: " + "; ".join(steps) + "."]
    return lines


def composed_markdown(rows: list[dict]) -> list[str]:
    """Each composed preset next to the preset of the same bits it must beat: paired FD gap, FD to FP samples
    (mean over the seeds), accuracy, noise SQNR, compile time, and what the composed preset must reach."""
    by_name = {r["config"]: r for r in rows}
    fp = rows[0]
    lines = ["", "Composed presets against the preset of the same bits (paired over the seeds; FD to FP samples is "
                 "the mean over seeds):", "",
             "| config | FD gap vs FP, paired mean +- s.e. | FD to FP samples | class accuracy | "
             "median noise SQNR dB | compile s (1 thread) |", "|---|---|---|---|---|---|"]
    for composed, (baseline, _) in COMPOSED.items():
        for name in (baseline, composed):
            r = by_name.get(name)
            if r is None:
                continue
            gap, error = mean_and_error(seed_gaps(r, fp))
            lines.append(f"| {name} | {gap:+.2f} +- {error:.2f} | {fd_to_fp(r):.3f} | "
                         f"{100 * statistics.fmean(seed_values(r, 'class_accuracy')):.1f}% | "
                         f"{r['noise_sqnr_median_db']:.1f} | {r.get('compile_seconds', float('nan')):.0f} |")
    checks = []
    for composed, (baseline, _) in COMPOSED.items():
        if composed in by_name and baseline in by_name:
            ours, theirs = fd_to_fp(by_name[composed]), fd_to_fp(by_name[baseline])
            ratio = COMPOSED_FD_RATIO.get(composed, 0.5)
            verdict = "met" if ours <= ratio * theirs else "NOT met"
            checks.append(f"- {composed}: FD to FP samples {ours:.3f} vs {baseline} {theirs:.3f} (target: at most "
                          f"{'half' if ratio == 0.5 else 'the same'}, {ratio * theirs:.3f}): {verdict}")
    if "ditq-w8a8" in by_name:
        gap, error = mean_and_error(seed_gaps(by_name["ditq-w8a8"], fp))
        checks.append(f"- ditq-w8a8: paired FD gap {gap:+.2f} +- {error:.2f} (target: within two standard errors of "
                      f"0): {'met' if abs(gap) <= 2 * error else 'NOT met'}")
    if "ditq-w4a4" in by_name:
        accuracy = statistics.fmean(seed_values(by_name["ditq-w4a4"], "class_accuracy"))
        checks.append(f"- ditq-w4a4: class accuracy {100 * accuracy:.1f}% (target: at least 99%): "
                      f"{'met' if accuracy >= 0.99 else 'NOT met'}")
    return lines + (["", "Targets:", ""] + checks if checks else [])


def seed_values(row: dict, key: str) -> list[float]:
    """A figure per seed (seed 0 alone without --seeds)."""
    return row["seeds"][key] if "seeds" in row and key in row["seeds"] else [row[key]]


def fd_to_fp(row: dict) -> float:
    """FD between the row's samples and FP's of the same seed, mean over seeds (>= 0: -1e-5 is sqrtm noise)."""
    return statistics.fmean(max(v, 0.0) for v in seed_values(row, "fd_to_fp"))


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties broken by order)."""
    ranks = [torch.tensor(v).argsort().argsort().double() for v in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def markdown(rows: list[dict], fp_gap: float, floor: float, floor_images: int, where: str = "") -> str:
    lines = ["| config | FD-digits | FD gap vs FP seed 0 | FD to FP samples | class accuracy | median noise SQNR dB |",
             "|---|---|---|---|---|---|"]
    fp_fd = rows[0]["fd_digits"]
    for r in rows:
        sqnr = f"{r['noise_sqnr_median_db']:.1f}" if "noise_sqnr_median_db" in r else "-"
        to_fp = f"{max(r['fd_to_fp'], 0.0):.2f}" if "fd_to_fp" in r else "-"   # FD >= 0; -1e-5 is sqrtm noise
        lines.append(f"| {r['config']} | {r['fd_digits']:.2f} | {r['fd_digits'] - fp_fd:+.2f} | {to_fp} | "
                     f"{100 * r['class_accuracy']:.1f}% | {sqnr} |")
    for table, title, columns in ((ABLATION, "TaQ-DiT ablation (the layout of the paper's Table IV; W4A8):",
                                   ["joint reconstruction", "static transformation"]),
                                  (TQ_ABLATION, "TQ-DiT ablation (the layout of the paper's Table III; W6A6):",
                                   ["HO", "MRQ", "TGQ"])):
        if any(table.get(r["config"]) for r in rows):
            lines += ["", title, ""] + _ablation_rows(rows, table, columns)
    if "seeds" in rows[0] and len(rows[0]["seeds"]["fd_digits"]) > 1:
        lines += seeds_markdown(rows)
    by_name = {r["config"]: r for r in rows}
    if "tq-dit-w6a6" in by_name and "w6a6-minmax" in by_name:
        base = paired_gap(by_name["w6a6-minmax"], rows[0])
        ours = [n for n in ("tq-dit-w6a6", "tq-dit-w6a6-tgq-softmax") if n in by_name]
        lines += ["", "FD-digits gap" + (" (paired over seeds)" if "seeds" in rows[0] else "") + ": " + ", ".join(
            f"{n} {paired_gap(by_name[n], rows[0]):+.2f} (|ratio| {abs(paired_gap(by_name[n], rows[0]) / base):.2f})"
            for n in ours) + f" vs w6a6-minmax {base:+.2f} (target: |ratio| <= 0.5)."]
    if any(r["config"] in ROBUQ or ampn_budget(r) for r in rows):
        lines += robuq_markdown(rows)
    if any(r["config"] in COMPOSED for r in rows):
        lines += composed_markdown(rows)
    if any(r["config"] in BIDM for r in rows):
        lines += bidm_markdown(rows)
    lines.append("")
    seed_gap = "" if math.isnan(fp_gap) else f"FP seed-to-seed FD difference (noise floor of the gap): {fp_gap:.2f}. "
    lines.append(f"{seed_gap}Real-vs-real FD floor ({floor_images} training digits vs the held-out set): {floor:.2f}.")
    if where:
        lines += ["", where]
    return "\n".join(lines) + "\n"


def _ablation_rows(rows: list[dict], flags_by_config: dict, columns: list[str]) -> list[str]:
    """An ablation table: one check mark column per component, FP first, then the configs that have flags."""
    fp_fd = rows[0]["fd_digits"]
    mark = {True: "✓", False: "✗"}
    lines = ["| " + " | ".join(columns) + " | FD-digits | FD gap | FD to FP samples | class accuracy "
             "| median noise SQNR dB |", "|" + "---|" * (len(columns) + 5),
             "| " + " | ".join("-" * len(columns)) + f" | {fp_fd:.2f} | +0.00 | - | "
             f"{100 * rows[0]['class_accuracy']:.1f}% | - |"]
    for r in rows:
        flags = flags_by_config.get(r["config"])
        if flags:
            to_fp = f"{r['fd_to_fp']:.2f}" if "fd_to_fp" in r else "-"
            lines.append("| " + " | ".join(mark[f] for f in flags) + f" | {r['fd_digits']:.2f} | "
                         f"{r['fd_digits'] - fp_fd:+.2f} | {to_fp} | {100 * r['class_accuracy']:.1f}% | "
                         f"{r['noise_sqnr_median_db']:.1f} |")
    return lines


def plot_sqnr(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if "noise_sqnr_db" in r:
            ax.plot(r["timesteps"], r["noise_sqnr_db"], label=r["config"])
    ax.set_xlabel("timestep (1000 = pure noise)")
    ax.set_ylabel("noise-prediction SQNR vs FP (dB)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-digits", choices=["dit-digits", "unet-digits"])
    parser.add_argument("--recipes", nargs="*", default=None,
                        help="presets, variant names or recipe files (bench/recipes/*.yaml; the row takes the "
                             f"file's name:); default: {' '.join(DEFAULT_RECIPES)}")
    parser.add_argument("--ablation", action="store_true",
                        help=f"TaQ-DiT ablation ({' '.join(ABLATION)}), written to quality-<model>-taq-ablation.*")
    parser.add_argument("--tq-ablation", action="store_true",
                        help=f"TQ-DiT ablation ({' '.join(TQ_ABLATION)}) on a time-grouped calibration set, written "
                             "to quality-<model>-tq-ablation.*")
    parser.add_argument("--robuq", action="store_true",
                        help=f"RobuQ recipes and AMPN variants ({' '.join(ROBUQ)}), written to quality-<model>-robuq.*")
    parser.add_argument("--composed", action="store_true",
                        help=f"composed presets and their baselines ({' '.join(composed_recipes())}), written to "
                             "quality-<model>-composed.*")
    parser.add_argument("--bidm", action="store_true",
                        help=f"BiDM+ ablation ({' '.join([*BIDM, *BIDM_EXTRA])}), written to quality-<model>-bidm.*")
    parser.add_argument("--fp-seeds", type=int, default=2, choices=[1, 2], help="FP runs (2 shows the noise floor)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="noise seeds 0..K-1 for every configuration, FP included; the gaps are paired by seed "
                             "and reported as mean +- standard error (cheap on a GPU)")
    parser.add_argument("--samples", type=int, default=2000, help="samples per configuration (FD and accuracy)")
    parser.add_argument("--steps", type=int, default=100, help="DDPM steps")
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--sqnr-samples", type=int, default=50, help="trajectories for the per-step SQNR")
    parser.add_argument("--calibration-trajectories", type=int, default=32)
    parser.add_argument("--calibration-steps", type=int, default=None,
                        help="sampler steps the calibration set draws from (default: 25; --robuq: all)")
    parser.add_argument("--samples-per-step", type=int, default=None,
                        help="calibration inputs per step (default: 10; --robuq: 16)")
    parser.add_argument("--distillation-iterations", type=int, default=None,
                        help="override the recipes' distillation and AMPN search iterations (smoke runs)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--device", default="cpu",
                        help="where sampling and the SQNR run (compile always runs on the CPU), e.g. cuda")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="keep each compiled model here (<recipe>.ditq + <recipe>.json with its compile "
                             "figures) and load it instead of compiling when it is already there")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the recipes into --artifacts and stop (sample them later, e.g. on a GPU)")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in the results file and add (or replace) these recipes; "
                             "FP is sampled again and must reproduce the stored FP row")
    args = parser.parse_args()
    if args.ablation + args.tq_ablation + args.robuq + args.composed + args.bidm > 1:
        parser.error("--ablation, --tq-ablation, --robuq, --composed and --bidm are separate runs")
    if args.recipes is None:  # `--recipes` with nothing after it measures FP only
        args.recipes = list(ROBUQ if args.robuq else ABLATION if args.ablation else TQ_ABLATION if args.tq_ablation
                            else composed_recipes() if args.composed else [*BIDM, *BIDM_EXTRA] if args.bidm
                            else DEFAULT_RECIPES)
    args.stem = f"quality-{args.model}" + ("-taq-ablation" if args.ablation else "-tq-ablation" if args.tq_ablation
                                           else "-robuq" if args.robuq else "-composed" if args.composed
                                           else "-bidm" if args.bidm else "")
    if args.calibration_steps is None:
        args.calibration_steps = args.steps if args.robuq or args.bidm else min(25, args.steps)
    if args.samples_per_step is None:
        args.samples_per_step = 16 if args.robuq or args.bidm else 10
    # row name -> recipe (from a preset, a variant name, or a recipe file such as bench/recipes/*.yaml, whose
    # row takes the file's `name:`); a typo fails now, not after an hour of FP sampling
    recipes = {r.name: r for r in (recipe_for(arg, args.distillation_iterations) for arg in args.recipes)}
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 on a GPU

    if args.compile_only and args.artifacts is None:
        parser.error("--compile-only needs --artifacts")
    cpu_model, scheduler = zoo.load(args.model), zoo.scheduler(args.model)  # compile runs on the CPU
    grids = args.out / args.stem
    calibrations: dict[str, object] = {}

    def calibration_for(name: str):
        """The calibration set of the recipe's kind (one per kind, drawn once): see ``calibration_kind``."""
        kind = calibration_kind(name, args)
        if kind not in calibrations:
            calibrations[kind] = from_sampler(cpu_model, scheduler, num_inference_steps=args.steps,
                                              guidance_scale=args.guidance,
                                              num_trajectories=args.calibration_trajectories, seed=123,
                                              progress=not args.quiet, **selection_of(kind, args))
        return calibrations[kind]

    def compiled_model(name: str) -> tuple[dq.CompiledModel, dict]:
        """The recipe's compiled model and its compile figures: from --artifacts, or compiled now."""
        base = None if args.artifacts is None else args.artifacts / f"{args.stem}-{name}"
        artifact, figures_file = (None, None) if base is None else (Path(f"{base}.ditq"), Path(f"{base}.json"))
        if figures_file is not None and figures_file.exists():
            return dq.load(artifact), json.loads(figures_file.read_text())
        calibration = calibration_for(name)
        start, cpu = time.perf_counter(), time.process_time()
        compiled = dq.compile(cpu_model, recipes[name], calibration=calibration, progress=not args.quiet)
        figures = {"compile_seconds": round(time.perf_counter() - start, 1),
                   "compile_cpu_seconds": round(time.process_time() - cpu, 1),
                   "compile_torch": torch.__version__, "compile_threads": torch.get_num_threads(),
                   "output_sqnr_db": compiled.output_sqnr_db,
                   "stage_seconds": {k: round(v, 1) for k, v in compiled.stage_seconds.items()}}
        if compiled.rotations:
            figures["rotations"] = {r_.layer: r_.placement for r_ in compiled.rotations}
        if compiled.allocation is not None:
            figures["ampn"] = ampn_row(compiled)
        if artifact is not None:  # the model first: a figures file means its artifact is complete
            artifact.parent.mkdir(parents=True, exist_ok=True)
            compiled.save(artifact)
            write_text(figures_file, json.dumps(figures, indent=2))
        return compiled, figures

    if args.compile_only:
        for name in recipes:
            figures = compiled_model(name)[1]
            print(f"{name}: compiled in {figures['compile_seconds']} s ({figures['compile_cpu_seconds']} CPU s)",
                  flush=True)
        return

    model = copy.deepcopy(cpu_model).to(args.device)  # sampling and SQNR there
    row, fp_samples = measure("fp", model, model, scheduler, args, 0, grids)
    fp_by_seed = measure_seeds(model, scheduler, args, row, fp_samples, None) if args.seeds > 1 else None
    rows = previous_rows(args, row) if args.append else [row]
    write_results(rows, args, final=False)
    if args.fp_seeds == 2 and not any(r["config"] == "fp-seed1" for r in rows):
        rows.append(measure("fp-seed1", model, model, scheduler, args, 1, grids, fp_samples)[0])
        write_results(rows, args, final=False)
    print("fp: FD " + " / ".join(f"{r['fd_digits']:.2f}" for r in rows) +
          f", accuracy {rows[0]['class_accuracy']:.3f}", flush=True)
    for name in recipes:
        compiled, figures = compiled_model(name)
        r, samples = measure(name, compiled.to(args.device), model, scheduler, args, 0, grids, fp_samples)
        if fp_by_seed is not None:
            measure_seeds(compiled, scheduler, args, r, samples, fp_by_seed)
        r.update(figures)
        rows = [old for old in rows if old["config"] != name] + [r]
        print(f"{name}: FD {r['fd_digits']:.2f}, accuracy {r['class_accuracy']:.3f}, "
              f"median noise SQNR {r['noise_sqnr_median_db']:.1f} dB", flush=True)
        write_results(rows, args, final=False)

    write_results(rows, args, final=True)
    print((args.out / f"{args.stem}.md").read_text())


def composed_recipes() -> list[str]:
    """Every composed preset after the preset it must beat, then the extra rows."""
    return [name for composed, (baseline, _) in COMPOSED.items() for name in (baseline, composed)] + \
        list(COMPOSED_EXTRA)


def calibration_kind(name: str, args) -> str:
    """Which calibration set a recipe gets: the run's, or under --composed the one its pair uses."""
    if args.composed:
        kinds = {**{c: kind for c, (_, kind) in COMPOSED.items()}, **{b: kind for b, kind in COMPOSED.values()},
                 **COMPOSED_EXTRA}
        return kinds.get(name, "default")
    return "time_groups" if args.tq_ablation else "robuq" if args.robuq else "default"


def selection_of(kind: str, args) -> dict:
    """``from_sampler``'s selection for a calibration kind: TQ-DiT's 10 groups x 32, RobuQ's every step x 16,
    or the run's ``--calibration-steps`` x ``--samples-per-step``."""
    if kind == "time_groups":
        return dict(selection="time_groups", groups=min(10, args.steps), samples_per_group=32)
    if kind == "robuq" and args.composed:
        return dict(steps=args.steps, samples_per_step=16)
    return dict(steps=args.calibration_steps, samples_per_step=args.samples_per_step)


def previous_rows(args, fp_row: dict) -> list[dict]:
    """The rows of an earlier run of the same stem, after checking that FP reproduces it exactly."""
    path = args.out / f"{args.stem}.json"
    if not path.exists():
        return [fp_row]
    old = json.loads(path.read_text())
    for key in ("samples", "steps", "guidance", "calibration_trajectories", "sqnr_samples"):
        if old["settings"].get(key) != getattr(args, key):
            raise SystemExit(f"--append: {path} was made with {key}={old['settings'].get(key)!r}, "
                             f"this run has {getattr(args, key)!r}")
    stored = next(r for r in old["rows"] if r["config"] == "fp")
    if not math.isclose(stored["fd_digits"], fp_row["fd_digits"], rel_tol=1e-6):
        raise SystemExit(f"--append: FP does not reproduce {path} (FD {fp_row['fd_digits']:.4f}, "
                         f"stored {stored['fd_digits']:.4f}); rerun without --append")
    return old["rows"]


def ampn_row(compiled) -> dict:
    """Per-layer bits (by layer name), the averages and the sensitivities of an AMPN compile."""
    allocation = compiled.allocation
    name = allocation.layer_names
    return {"budget": compiled.recipe.mixed_precision.budget, "sensitivity_from": allocation.sensitivity_from,
            "average_bits": allocation.average_bits,
            "layer_average_bits": sum(allocation.bits.values()) / len(allocation.bits),
            "bits": {name[n]: b for n, b in allocation.bits.items()},
            "sensitivity": {name[n]: {str(b): v for b, v in s.items()} for n, s in allocation.sensitivity.items()},
            "base_loss": allocation.base_loss}


def write_results(rows: list[dict], args, final: bool) -> None:
    """Atomically (re)write the JSON and table; called after every configuration so nothing is lost."""
    seeds = [r for r in rows if r["config"].startswith("fp")]
    fp_gap = abs(seeds[1]["fd_digits"] - seeds[0]["fd_digits"]) if len(seeds) > 1 else float("nan")
    floor = quality.real_fd_floor(args.samples)
    floor_images = min(args.samples, len(digits("train")[0]))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    device = torch.device(args.device)
    sampled_on = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    compiled_with = sorted({r["compile_torch"] for r in rows if "compile_torch" in r})
    precision = ", fp32 with TF32 off" if device.type == "cuda" else ""
    compiled_note = f"; compiled on the CPU with torch {', '.join(compiled_with)}" if compiled_with else ""
    where = f"Sampled on {sampled_on} (torch {torch.__version__}{precision}){compiled_note}."
    result = {"model": args.model, "settings": settings, "torch": torch.__version__, "sampled_on": sampled_on,
              "complete": final,
              "fp_seed_gap": fp_gap, "real_fd_floor": floor,
              "real_fd_floor_images": floor_images, "rows": rows}
    table = markdown(rows, fp_gap, floor, floor_images, where)
    for suffix, text in ((".json", json.dumps(result, indent=2)), (".md", table)):
        write_text(args.out / f"{args.stem}{suffix}", text)
    if final:
        plot_sqnr(rows, args.out / f"{args.stem}-sqnr.png")

if __name__ == "__main__":
    main()
