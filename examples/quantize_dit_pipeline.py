"""Quantize the denoiser of a diffusers pipeline in place and sample with it, FP and quantized side by side.

The pipeline is ``DigitsDiTPipeline`` (``ditq_compiler/zoo/dit_pipeline.py``): diffusers' ``DiTPipeline``
sampling loop around the bundled, trained ``dit-digits`` DiT, built locally (nothing is downloaded).
We use it instead of ``diffusers.DiTPipeline`` because that one needs a VAE and hard-codes the
ImageNet null class 1000, while ``dit-digits`` works on 8x8 pixels with null class 10; the
pipeline's own docstring says more. ``quantize_pipeline`` works the same on ``DiTPipeline``,
``DDPMPipeline`` and other pipelines with a ``transformer`` or ``unet`` (see ``tests/test_diffusers.py``).

    python examples/quantize_dit_pipeline.py                        # W8A8, 50 steps, writes pipeline-digits.png
    python examples/quantize_dit_pipeline.py --recipe w4a8 --save out/dit-w4a8   # and keep the artifact
"""

from __future__ import annotations

import argparse

import torch

import ditq_compiler as dq
from ditq_compiler import quality, zoo
from ditq_compiler.zoo.dit_pipeline import DigitsDiTPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="w8a8", help="preset name or recipe file")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (calibration records the same)")
    parser.add_argument("--grid", default="pipeline-digits.png", help="where to write FP (top) and quantized rows")
    parser.add_argument("--save", default=None, help="also save the compiled transformer as an artifact here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()

    pipe = DigitsDiTPipeline(transformer=zoo.load("dit-digits"), scheduler=zoo.scheduler("dit-digits"))
    pipe.set_progress_bar_config(disable=args.quiet)
    labels = list(range(10))

    def sample():
        generator = torch.Generator().manual_seed(0)
        return pipe(class_labels=labels, num_inference_steps=args.steps, generator=generator, output_type="pt").images

    fp = sample()
    # Calibration: one pipeline call with these arguments; 25 of its denoiser calls, spread over the trajectory.
    pipe = dq.diffusers.quantize_pipeline(pipe, args.recipe, calibration={"class_labels": labels,
                                                                          "num_inference_steps": args.steps},
                                          progress=not args.quiet)
    quantized = sample()                          # the same call as before: pipe(...) runs unchanged
    compiled = pipe.transformer.compiled
    print(compiled.summary())
    difference = (quantized - fp).abs()
    print(f"\npixels in [0, 1], same seed: max |quantized - FP| = {float(difference.max()):.4f}, "
          f"mean = {float(difference.mean()):.4f}")
    print(f"class accuracy (digit classifier): FP {quality.class_accuracy(fp * 2 - 1, torch.tensor(labels)):.0%}, "
          f"{args.recipe} {quality.class_accuracy(quantized * 2 - 1, torch.tensor(labels)):.0%}")
    grid = quality.save_grid(torch.cat([fp, quantized]) * 2 - 1, args.grid)
    print(f"samples (FP on top, {args.recipe} below): {grid}")
    if args.save:
        print(f"artifact: {compiled.save(args.save)}")


if __name__ == "__main__":
    main()
