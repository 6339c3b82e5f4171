"""What torch.compile(compiled, fullgraph=True) gains on the CPU: dit-digits W8A8, eager vs Inductor.

    python bench/torch_compile.py --threads 2

Compiles dit-digits with w8a8 on 4 random batches, then times one denoiser call (batch 32, the demo's
guided batch of 16) with the torch and torch-int8 backends, eager and under torch.compile (Inductor,
fullgraph=True): median of ``--repeats`` after warm-up, and the first call's time (Inductor's compile).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ditq_compiler as dq
from ditq_compiler import zoo


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = zoo.load("dit-digits")
    g = torch.Generator().manual_seed(0)

    def call(b):
        return ((), {"hidden_states": torch.randn(b, 1, 8, 8, generator=g), "timestep": torch.randint(0, 1000, (b,),
                     generator=g), "class_labels": torch.randint(0, 11, (b,), generator=g)})

    calibration = [call(16) for _ in range(4)]
    kwargs = call(args.batch)[1]
    print("| backend | eager ms | torch.compile ms | speed-up | first compiled call s |\n|---|---|---|---|---|")
    with torch.no_grad():
        for backend in ("torch", "torch-int8"):
            compiled = dq.compile(model, "w8a8", calibration=calibration, backend=backend, progress=False)
            eager = timed(lambda m=compiled: m(**kwargs), args.repeats)
            torch._dynamo.reset()
            fast = torch.compile(compiled, fullgraph=True)
            started = time.perf_counter()
            fast(**kwargs)
            first = time.perf_counter() - started
            inductor = timed(lambda m=fast: m(**kwargs), args.repeats)
            print(f"| {backend} | {1e3 * eager:.2f} | {1e3 * inductor:.2f} | {eager / inductor:.2f}x | {first:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
