"""Peak memory and time per block of calibration and reconstruction at DiT-XL/2 size, on the CPU.

Builds a DiT-XL/2-shaped diffusers ``DiTTransformer2DModel`` with random weights (28 blocks,
hidden 1152 = 16 heads x 72, patch 2, 32x32x4 latents, 1000 classes) and compiles it with a
TaQ-DiT recipe (shift + migration + joint reconstruction) on random calibration latents. As
diffusers builds it the model has 750M parameters, not the paper's 675M: every block has its own
``ada_norm_zero`` timestep/class embedder where the original DiT shares one. Reconstruction caches
one block's inputs and targets at a time and carries the values live at a block boundary on to
the next block (one block of forward per block, not the k blocks before it), so its memory is the
model's copies plus one block's activations, not the whole model's. Reports:

    peak RSS of the process (ru_maxrss), sampled RSS after each stage
    seconds per stage, and per reconstructed block (median, min, max; recording vs learning)
    the FP32 checkpoint size, for scale

Iterations per block are few by default (the point is memory and the time per iteration; the
quality recipe's 1000 iterations scale the training part linearly). Writes
bench/results/memory-scale.json and a markdown summary next to it (.md).

    python bench/memory_scale.py [--blocks 28 --samples 16 --iterations 10 --recon-batch 8 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import threading
import time
from pathlib import Path

import torch

import ditq_compiler as dq
from ditq_compiler.atomic import write_text


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 2**20


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class RssSampler(threading.Thread):
    """Samples RSS every ``period`` seconds: the peak within each stage, not only the process peak."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period, self.peak, self.running = period, 0.0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_gib())
            time.sleep(self.period)


def dit_xl(blocks: int):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                 num_layers=blocks, sample_size=32, patch_size=2,
                                 num_embeds_ada_norm=1000).eval()


def calibration(samples: int, batch: int):
    g = torch.Generator().manual_seed(1)
    batches = []
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        batches.append(((), {"hidden_states": torch.randn(n, 4, 32, 32, generator=g),
                             "timestep": torch.randint(0, 1000, (n,), generator=g),
                             "class_labels": torch.randint(0, 1000, (n,), generator=g)}))
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=28)
    parser.add_argument("--samples", type=int, default=16, help="calibration samples")
    parser.add_argument("--batch", type=int, default=8, help="calibration batch size")
    parser.add_argument("--iterations", type=int, default=10, help="reconstruction iterations per block")
    parser.add_argument("--recon-batch", type=int, default=8, help="reconstruction mini-batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory-scale.json"),
                        help="JSON results; the markdown summary goes next to it (.md)")
    parser.add_argument("--markdown", type=Path, help="only rewrite the .md summary of this results JSON")
    args = parser.parse_args()
    if args.markdown is not None:
        args.markdown.with_suffix(".md").write_text(markdown(json.loads(args.markdown.read_text())))
        return
    torch.set_num_threads(args.threads)

    sampler = RssSampler()
    sampler.start()
    stages: dict[str, float] = {"start": rss_gib()}
    model = dit_xl(args.blocks)
    params = sum(p.numel() for p in model.parameters())
    stages["model built"] = rss_gib()
    print(f"DiT-XL/2 shape, {args.blocks} blocks: {params / 1e6:.0f}M parameters, "
          f"{params * 4 / 2**30:.2f} GiB in fp32; RSS {stages['model built']:.2f} GiB", flush=True)
    recipe = dq.Recipe.load("taq-dit-w4a8").to_dict()
    recipe["name"] = "taq-dit-w4a8-memory"
    recipe["reconstruction"]["iterations"] = args.iterations
    recipe["reconstruction"]["batch_size"] = args.recon_batch
    batches = calibration(args.samples, args.batch)
    start, cpu_start = time.perf_counter(), time.process_time()
    compiled = dq.compile(model, dq.Recipe.from_dict(recipe), calibration=batches, cache_dir=False)
    total, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
    stages["compiled"] = rss_gib()
    sampler.running = False
    sampler.join()
    blocks = [s["total"] for s in compiled.unit_seconds.values() if s["total"] > 0]
    recording = [s["total"] - s["learning"] for s in compiled.unit_seconds.values() if s["total"] > 0]
    per_iteration = [s["learning"] / args.iterations for s in compiled.unit_seconds.values() if s["total"] > 0]
    result = {
        "model": f"DiTTransformer2DModel, DiT-XL/2 shape, {args.blocks} blocks, random weights",
        "parameters": params, "fp32_gib": params * 4 / 2**30, "settings": vars(args) | {"out": str(args.out)},
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "peak_rss_gib": peak_rss_gib(), "sampled_peak_rss_gib": sampler.peak, "rss_after_gib": stages,
        "compile_seconds": total, "compile_cpu_seconds": cpu_total,   # CPU: what other load does not inflate
        "load_average": list(os.getloadavg()), "stage_seconds": compiled.stage_seconds,
        "block_seconds": {"median": statistics.median(blocks), "min": min(blocks), "max": max(blocks),
                          "count": len(blocks)},
        "block_recording_seconds": {"median": statistics.median(recording), "min": min(recording),
                                    "max": max(recording)},
        "per_block_seconds": compiled.unit_seconds,
        "seconds_per_iteration": {"median": statistics.median(per_iteration), "batch_size": args.recon_batch},
        "extrapolated_block_seconds_1000_iterations": statistics.median(blocks) - statistics.median(per_iteration)
        * args.iterations + 1000 * statistics.median(per_iteration),
        "output_sqnr_db": compiled.output_sqnr_db,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))
    write_text(args.out, json.dumps(result, indent=2))
    write_text(args.out.with_suffix(".md"), markdown(result))


def markdown(result: dict) -> str:
    """The JSON's headline figures as a short table (``python bench/memory_scale.py --markdown JSON``)."""
    s = result["settings"]
    blocks, recording = result["block_seconds"], result["block_recording_seconds"]
    lines = [f"{result['model']}: {result['parameters'] / 1e6:.0f}M parameters ({result['fp32_gib']:.2f} GiB fp32; "
             "diffusers gives every block its own ada_norm_zero embedder, so not the paper's 675M), "
             f"taq-dit-w4a8 with {s['iterations']} reconstruction iterations per block, {s['samples']} calibration "
             f"samples in batches of {s['batch']}, reconstruction batch {s['recon_batch']}, {s['threads']} threads, "
             f"torch {result['torch']}, load average at the end {result['load_average'][0]:.1f} on 2 cores.",
             "", f"Peak RSS {result['peak_rss_gib']:.2f} GiB (sampled {result['sampled_peak_rss_gib']:.2f} GiB); "
             f"compile {result['compile_seconds']:.0f} s wall, {result['compile_cpu_seconds']:.0f} s CPU.", "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in result["stage_seconds"].items()]
    lines += ["", "| per reconstructed block | median s | min s | max s |", "|---|---|---|---|",
              f"| total | {blocks['median']:.1f} | {blocks['min']:.1f} | {blocks['max']:.1f} |",
              f"| recording inputs and targets | {recording['median']:.1f} | {recording['min']:.1f} | "
              f"{recording['max']:.1f} |",
              f"| one learning iteration | {result['seconds_per_iteration']['median']:.2f} | | |", "",
              f"Extrapolated to 1000 iterations: {result['extrapolated_block_seconds_1000_iterations'] / 60:.0f} min "
              "per block at these settings.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
