"""Outlier channels at the fc2 inputs (post-GELU) of a zoo model: what TaQ-DiT's transformations act on.

For every fc2 (found by graph role, not by name), the per-channel range max - min of its input
over a sampler-drawn calibration set, and how far the widest channels stand out:

    ratio = max_j range_j / median_j range_j        top-2% ratio = mean of the top 2% / median

    python bench/channel_ranges.py --model dit-digits     # writes bench/results/channel-ranges-<model>.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ditq_compiler import zoo
from ditq_compiler.atomic import write_text
from ditq_compiler.calibration import from_sampler
from ditq_compiler.calibration.observe import InputObservingInterpreter
from ditq_compiler.capture import capture
from ditq_compiler.graph import analyse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-digits", choices=["dit-digits", "unet-digits"])
    parser.add_argument("--trajectories", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, scheduler = zoo.load(args.model), zoo.scheduler(args.model)
    calibration = from_sampler(model, scheduler, num_inference_steps=100, guidance_scale=2.0,
                               num_trajectories=args.trajectories, steps=25, seed=123, progress=False)
    captured = capture(model, next(iter(calibration)))
    analysis = analyse(captured.graph_module, captured.sample_input, captured.timestep_input)
    fc2 = {node: info.name for node, info in analysis.layers.items() if info.role == "fc2"}
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def observer(node: str):
        def update(x: torch.Tensor) -> None:
            flat = x.reshape(-1, x.shape[-1])
            lo[node] = torch.minimum(lo[node], flat.amin(0)) if node in lo else flat.amin(0)
            hi[node] = torch.maximum(hi[node], flat.amax(0)) if node in hi else flat.amax(0)
        return update

    with torch.no_grad():
        for i, (call_args, call_kwargs) in enumerate(calibration):
            inputs = torch.utils._pytree.tree_leaves(((), captured.bind(call_args, call_kwargs)))
            InputObservingInterpreter(captured.graph_module, {n: observer(n) for n in fc2}, i).run(*inputs)
    rows = []
    for node, name in fc2.items():
        ranges = hi[node] - lo[node]
        median = float(ranges.median())
        top = ranges.topk(max(1, round(0.02 * len(ranges)))).values
        rows.append({"layer": name, "channels": len(ranges), "max_range": float(ranges.max()),
                     "median_range": median, "ratio": float(ranges.max()) / median,
                     "top2pct_ratio": float(top.mean()) / median})
        print(f"{name}: {len(ranges)} channels, range max {rows[-1]['max_range']:.2f} / median {median:.2f} "
              f"= {rows[-1]['ratio']:.1f}x, top 2% {rows[-1]['top2pct_ratio']:.1f}x")
    write_text(args.out / f"channel-ranges-{args.model}.json",
               json.dumps({"model": args.model, "trajectories": args.trajectories, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
