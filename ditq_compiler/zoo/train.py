"""Train a zoo model on the digits: ``python -m ditq_compiler.zoo.train NAME [--threads N]``.

Diffusion models (``dit-digits``, ``unet-digits``) learn epsilon-prediction under the zoo's
DDPM schedule (1000 steps, cosine betas): sample x0 and t, x_t = sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps, minimise |eps_theta(x_t, t, y) - eps|^2 with AdamW (warm-up, then
cosine decay), gradient clipping at 1, and an EMA of the weights (the EMA is what ships).
Labels are replaced by the null class 10 with probability 0.1 (one decision per sample, for
the whole network), so classifier-free guidance works.

The classifier (``digit-classifier``) learns cross-entropy on the train split with random
one-pixel shifts, and must reach 97% accuracy on the held-out split or the script fails.

Runs are seeded and deterministic for a given thread count. Wall time and final metrics are
written next to the weights in ``train_log.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ditq_compiler.zoo import weights_dir
from ditq_compiler.zoo.data import NULL_CLASS, digits
from ditq_compiler.zoo.specs import MODELS, build_model, build_scheduler

LABEL_DROPOUT = 0.1
WARMUP_STEPS = 200
MIN_CLASSIFIER_ACCURACY = 0.97


def learning_rate(step: int, total: int, peak: float) -> float:
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _disable_internal_label_dropout(model: torch.nn.Module) -> None:
    """diffusers' DiT drops labels inside every block independently; we drop them once per sample."""
    for module in model.modules():
        if hasattr(module, "dropout_prob") and type(module).__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def train_diffusion(name: str, out: Path, generator: torch.Generator) -> dict:
    spec = MODELS[name]
    images, labels = digits("train")
    model = build_model(name).train()
    _disable_internal_label_dropout(model)
    ema = copy.deepcopy(model).eval()
    scheduler = build_scheduler()
    abar = scheduler.alphas_cumprod
    optimiser = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    running = None
    bar = tqdm(range(spec.steps), desc=f"train {name}", unit="step")
    for step in bar:
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, spec.steps, spec.lr)
        index = torch.randint(0, len(images), (spec.batch_size,), generator=generator)
        x0, y = images[index], labels[index].clone()
        y[torch.rand(spec.batch_size, generator=generator) < LABEL_DROPOUT] = NULL_CLASS
        t = torch.randint(0, scheduler.config.num_train_timesteps, (spec.batch_size,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(model(x_t, t, y).sample, eps)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        _ema_update(ema, model, spec.ema_decay)
        running = float(loss) if running is None else 0.99 * running + 0.01 * float(loss)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
    ema.save_pretrained(out, safe_serialization=True)
    return {"final_loss_ema": running}


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (background value -1 fills the border)."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + 8, dx:dx + 8]


def train_classifier(name: str, out: Path, generator: torch.Generator) -> dict:
    from safetensors.torch import save_file

    spec = MODELS[name]
    images, labels = digits("train")
    model = build_model(name).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-4)
    bar = tqdm(range(spec.steps), desc=f"train {name}", unit="step")
    for step in bar:
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, spec.steps, spec.lr)
        index = torch.randint(0, len(images), (spec.batch_size,), generator=generator)
        loss = F.cross_entropy(model(_shift(images[index], generator)), labels[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    model.eval()
    held_images, held_labels = digits("held_out")
    with torch.no_grad():
        accuracy = float((model(held_images).argmax(1) == held_labels).float().mean())
    if accuracy < MIN_CLASSIFIER_ACCURACY:
        raise SystemExit(f"{name}: held-out accuracy {accuracy:.4f} < {MIN_CLASSIFIER_ACCURACY}")
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(out / "model.safetensors"))
    return {"held_out_accuracy": accuracy, "held_out_size": len(held_labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: the package's weights folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(args.seed)
    out = args.out or weights_dir(args.name)
    start = time.perf_counter()
    train = train_classifier if MODELS[args.name].kind == "classifier" else train_diffusion
    metrics = train(args.name, out, generator)
    log = {"model": args.name, "seed": args.seed, "threads": args.threads, "steps": MODELS[args.name].steps,
           "batch_size": MODELS[args.name].batch_size, "wall_seconds": round(time.perf_counter() - start, 1),
           "torch": torch.__version__, **metrics}
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
