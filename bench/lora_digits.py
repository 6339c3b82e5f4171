"""A LoRA on dit-digits (a class shift: class c draws the digit c + 1), and W8A8 with it fused or as a branch.

    python bench/lora_digits.py --train          # trains the adapter (rank 4, ~2 minutes on one thread), then measures
    python bench/lora_digits.py                  # measures with the shipped adapter

Training: the diffusion loss on the digits training split with every label moved down by one
(``y' = (y - 1) mod 10``), so asking for class ``c`` gives a ``c + 1``; only the rank-4 factors of every
block's q, k, v, out, fc1 and fc2 learn (``W + B A``, ``B`` starts at zero). The adapter is written to
``ditq_compiler/zoo/weights/dit-digits-lora-shift/adapter.safetensors``.

Measurement: FP with the adapter fused is the reference. ``fused``: W8A8 compiled on the adapted model,
calibrated on its own sampler; ``branch``: the base model compiled and calibrated once (no adapter),
the adapter put in as a float branch. Output SQNR against the reference on held-out inputs (the
reference's sampler trajectories with another seed, 25 steps x 10 inputs), and the class accuracy of
100 samples of the shifted classes (the digit classifier must read c + 1 for class c).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ditq_compiler as dq
from ditq_compiler import lora, quality, zoo
from ditq_compiler.calibration import from_sampler
from ditq_compiler.sampling import sample
from ditq_compiler.zoo.data import digits

ADAPTER = Path(__file__).resolve().parents[1] / "ditq_compiler/zoo/weights/dit-digits-lora-shift/adapter.safetensors"
MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
NULL_CLASS, LABEL_DROPOUT = 10, 0.1


class LoraLinear(torch.nn.Module):
    """``W x + B (A x)`` with ``W`` frozen: the layer being trained."""

    def __init__(self, base: torch.nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        scale = base.in_features ** -0.5
        self.down = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=generator) * scale)
        self.up = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.down), self.up)


def train(steps: int, rank: int, seed: int) -> lora.LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    model = zoo.load("dit-digits").train()
    model.requires_grad_(False)
    names = [f"transformer_blocks.{b}.{m}" for b in range(len(model.transformer_blocks)) for m in MODULES]
    wrapped = {}
    for name in names:
        parent, attr = name.rsplit(".", 1)
        wrapped[name] = LoraLinear(model.get_submodule(name), rank, generator)
        setattr(model.get_submodule(parent), attr, wrapped[name])
    images, labels = digits("train")
    abar = zoo.scheduler("dit-digits").alphas_cumprod
    optimiser = torch.optim.AdamW([p for w in wrapped.values() for p in (w.down, w.up)], lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        index = torch.randint(0, len(images), (64,), generator=generator)
        x0, y = images[index], (labels[index] - 1) % 10                # the class shift
        y[torch.rand(64, generator=generator) < LABEL_DROPOUT] = NULL_CLASS
        t = torch.randint(0, len(abar), (64,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, y).sample, eps)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % 100 == 0:
            print(f"step {step}: loss {float(loss):.4f}", flush=True)
    return lora.LoraAdapter({name: lora.LoraLayer(w.down.detach().clone(), w.up.detach().clone(), 1.0)
                             for name, w in wrapped.items()}, "dit-digits-lora-shift")


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - other).pow(2).sum()))


def measure(adapter: lora.LoraAdapter, steps: int, samples: int) -> dict:
    base, scheduler = zoo.load("dit-digits"), zoo.scheduler("dit-digits")
    reference = lora.fuse(base, adapter)
    calib = dict(num_inference_steps=steps, guidance_scale=2.0, num_trajectories=16, steps=min(25, steps),
                 progress=False)
    started = time.perf_counter()
    fused = dq.compile(base, "w8a8", calibration=from_sampler(reference, scheduler, seed=0, **calib), lora=adapter,
                       progress=False)
    branch = dq.compile(base, "w8a8", calibration=from_sampler(base, scheduler, seed=0, **calib), lora=adapter,
                        lora_mode="branch", progress=False)
    compile_s = time.perf_counter() - started
    held_out = from_sampler(reference, scheduler, seed=7, **calib)
    labels = torch.arange(samples) % 10
    rows = {}
    with torch.no_grad():
        for name, model in (("fp + lora", reference), ("w8a8 fused", fused), ("w8a8 branch", branch),
                            ("fp, no lora", base)):
            outputs = [(model(*a, **k).sample, reference(*a, **k).sample) for a, k in held_out]
            got, want = torch.cat([o for o, _ in outputs]), torch.cat([r for _, r in outputs])
            x = sample(model, scheduler, labels, num_inference_steps=steps, guidance_scale=2.0, seed=0, progress=False)
            rows[name] = {"sqnr_db": None if name == "fp + lora" else sqnr_db(want, got),
                          "shifted_accuracy": quality.class_accuracy(x, (labels + 1) % 10)}
    return {"rows": rows, "held_out_inputs": held_out.num_samples, "samples": samples, "sampler_steps": steps,
            "compile_seconds_both": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", action="store_true", help="train the adapter first (and overwrite the shipped one)")
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results/lora-digits.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.train:
        started = time.perf_counter()
        adapter = train(args.train_steps, args.rank, seed=0)
        ADAPTER.parent.mkdir(parents=True, exist_ok=True)
        adapter.save(ADAPTER)
        print(f"trained in {time.perf_counter() - started:.0f} s: {ADAPTER} ({ADAPTER.stat().st_size / 1024:.0f} KiB)")
    result = measure(lora.load(ADAPTER), args.steps, args.samples)
    print("| model | output SQNR vs FP + LoRA, dB (held out) | shifted-class accuracy |\n|---|---|---|")
    for name, row in result["rows"].items():
        sqnr = "-" if row["sqnr_db"] is None else f"{row['sqnr_db']:.1f}"
        print(f"| {name} | {sqnr} | {100 * row['shifted_accuracy']:.0f}% |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
