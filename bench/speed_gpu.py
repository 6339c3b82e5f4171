"""Per-denoising-step latency on a GPU: bf16, our ``cuda`` backend (Triton W8A8, FP8) and torchao, at DiT-XL/2 and
PixArt-alpha shape (random weights).

Models (diffusers, built locally, nothing downloaded):

    dit-xl        DiTTransformer2DModel, DiT-XL/2: 28 blocks, 16 heads x 72 (hidden 1152), patch 2, 32x32x4
                  latents (256 tokens), 1000 classes, learned sigma (8 output channels)
    pixart-1024   PixArtTransformer2DModel, PixArt-alpha XL/2 at 512 px: 28 blocks, 16 heads x 72, patch 2,
                  64x64x4 latents (1024 tokens), cross-attention to 120 caption tokens of width 4096 (the T5
                  encoder is left out: random encoder_hidden_states), adaLN-single

at batch 2, 16 and 64 (one denoising step = one forward pass). Configurations:

    bf16 eager             the diffusers model in bf16
    bf16 compile           torch.compile of it
    ours W8A8              dq.compile(model, --recipe) on the CPU (--calibration random calls at batch 2), moved to
                           the GPU, lower_cuda (int8 Triton kernel, activation quantized in the producer, float
                           parts bf16), torch.compile(fullgraph=True)
    ours FP8               the same graph lowered with precision="fp8" (e4m3, per-token activations, _scaled_mm)
    torchao int8 dyn       torchao.quantization.quantize_(bf16 model, Int8DynamicActivationInt8WeightConfig())
    torchao fp8 dyn        ... Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    ours W8A8 prologue     lower_cuda(act_quant="prologue"), the activation quantized in the GEMM's prologue
                           (opt-in: --configs; the GEMM section compares the two at kernel level)

Compiled rows use torch.compile's default mode with the batch marked dynamic: one compile per
configuration serves every batch size. The largest batch runs first, so a kernel Inductor autotunes
once (at its first call) is tuned at the largest M. torchao quantizes every nn.Linear (its default),
ours the recipe's layers; the row says how many. torchao rows read "not installed" without torchao.
Our graphs take the fp32 inputs and return fp32 (the casts to and from bf16 are in the graph).

Each row: median ms per step over interleaved rounds (every round runs each configuration once, in
turn, after warm-up calls), output SQNR against the fp32 model on the same input (the smallest
batch), the bytes of its weights (int8 codes + fp32 scales + bf16 float parts for ours; torchao's
tensor subclasses counted by their inner tensors), the number of linears on a quantized kernel, and
the seconds of its first call (the compile). A GEMM section first times one linear at DiT-XL/2
shapes (M = 512 and 16384 rows): bf16 mm, torch._int_mm (no quantization, no epilogue), our kernel
quantizing bf16 x in its prologue and reading int8 codes, and FP8 per-token quantization + _scaled_mm.

Time: the run stops cleanly after --time-budget seconds (default 420, so the whole script stays
under 8 minutes): a configuration whose compile (the longest seen so far, 60 s before any) would
not fit is skipped with that reason, ditq_compiler.compile likewise (90 s before any, then twice
the longest seen), and the files say "complete": false. Measured on one CPU thread,
ditq_compiler.compile of DiT-XL/2 with w8a8 takes 313 s with two calibration calls (capture 19 s,
calibration 29 s, MSE weight ranges 103 s, measuring the graph 91 + 71 s) and 150 s with
w8a8-minmax; PixArt at 1024 tokens takes 812 s (capture 17 s, calibration 160 s, MSE 148 s, measuring
487 s: one fp32 forward at batch 2 is 40 s there). The GPU machine's 16 cores and one calibration call
(the default) should cut each to about a minute (not measured). With torch.compile at about a
minute per configuration, one 420 s run covers the GEMMs and DiT-XL/2; PixArt then gets what is
left, so run it again with --models pixart-1024 --no-gemm for its rows: a later run on the same GPU
keeps the other models' rows (and the GEMMs) of the file.

    python bench/speed_gpu.py                                    # on an H100: GEMMs, dit-xl, then pixart-1024
    python bench/speed_gpu.py --models pixart-1024 --no-gemm     # the second run
    python bench/speed_gpu.py --models dit-xl --batches 2 16 --configs "bf16 compile" "ours W8A8"
    python bench/speed_gpu.py --smoke --out /tmp/smoke           # CPU: toy models, Triton's interpreter

Writes <out>/speed-gpu-<gpu>.json and .md (atomically, after the GEMMs and after each model).
"""

from __future__ import annotations

import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:   # before triton is first imported: its kernels then run in the interpreter, on the CPU
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

import ditq_compiler as dq  # noqa: E402
from ditq_compiler.atomic import write_text  # noqa: E402
from ditq_compiler.backends.cuda import lower_cuda  # noqa: E402
from ditq_compiler.quant import sqnr_db  # noqa: E402

MODELS = {
    "dit-xl": dict(cls="DiTTransformer2DModel", config=dict(
        num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, sample_size=32,
        patch_size=2, num_embeds_ada_norm=1000)),
    "pixart-1024": dict(cls="PixArtTransformer2DModel", caption=(120, 4096), config=dict(
        num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, sample_size=64,
        patch_size=2, cross_attention_dim=1152, caption_channels=4096)),
}
SMOKE_MODELS = {    # the same classes at toy size (ditq_compiler.toy's)
    "dit-xl": dict(cls="DiTTransformer2DModel", config=dict(
        num_layers=2, num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10)),
    "pixart-1024": dict(cls="PixArtTransformer2DModel", caption=(5, 24), config=dict(
        num_layers=1, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, sample_size=8,
        patch_size=2, cross_attention_dim=32, caption_channels=24)),
}
CONFIGS = ("bf16 eager", "bf16 compile", "ours W8A8", "ours FP8", "torchao int8 dyn", "torchao fp8 dyn",
           "ours W8A8 prologue")
DEFAULT_CONFIGS = CONFIGS[:-1]    # the prologue variant is compared in the GEMM section; its model row is opt-in
# one linear of DiT-XL/2 per (N, K): attention projections, fc1, fc2; M = tokens at batch 2 and 64
GEMM_SHAPES = [(m, n, k) for m in (512, 16384) for n, k in ((1152, 1152), (4608, 1152), (1152, 4608))]
SMOKE_GEMM_SHAPES = [(16, 32, 48)]
FIRST_COMPILE_GUESS_S = 60.0
FIRST_DITQ_COMPILE_GUESS_S = 90.0


class Skip(Exception):
    """A configuration that cannot run here (the reason becomes its row's status)."""


# ---- time -----------------------------------------------------------------------------------------

class Budget:
    """Seconds left of --time-budget, the longest compile seen (the estimate for the next one), and whether
    anything had to be skipped for lack of time."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds
        self.compiles: list[float] = []
        self.ditq_compiles: list[float] = []
        self.ran_out = False

    def left(self) -> float:
        return self.end - time.perf_counter()

    @property
    def longest_compile(self) -> float:
        return max(self.compiles, default=FIRST_COMPILE_GUESS_S)

    @property
    def ditq_compile_estimate(self) -> float:
        """ditq_compiler.compile on the CPU: twice the longest seen (the next model may be larger), else a guess."""
        return 2 * max(self.ditq_compiles) if self.ditq_compiles else FIRST_DITQ_COMPILE_GUESS_S

    def allows(self, seconds: float) -> bool:
        if self.left() > seconds:
            return True
        self.ran_out = True
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable, device: torch.device, *args) -> tuple[object, float]:
    """``fn(*args)`` and its wall time in ms, the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn(*args)
    synchronize(device)
    return out, (time.perf_counter() - start) * 1e3


# ---- sizes ----------------------------------------------------------------------------------------

def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized weights) by its inner tensors."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, name)) for name in names)


def weight_bytes(module: torch.nn.Module) -> int:
    """Parameters and buffers, each distinct tensor once (tied weights)."""
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def sample_of(out) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out[0]


# ---- models and inputs ----------------------------------------------------------------------------

def build_model(spec: dict, seed: int = 0) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(seed)
    return getattr(diffusers, spec["cls"])(**spec["config"]).eval()


def make_inputs(spec: dict, batch: int, seed: int) -> dict:
    """fp32 CPU inputs of one step (DiT: a class label per sample; PixArt: random caption embeddings)."""
    g = torch.Generator().manual_seed(seed)
    cfg = spec["config"]
    size = cfg["sample_size"]
    inputs = {"hidden_states": torch.randn(batch, cfg["in_channels"], size, size, generator=g),
              "timestep": torch.randint(0, 1000, (batch,), generator=g)}
    if "caption" in spec:
        inputs["encoder_hidden_states"] = torch.randn(batch, *spec["caption"], generator=g)
        inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    else:
        inputs["class_labels"] = torch.randint(0, cfg["num_embeds_ada_norm"], (batch,), generator=g)
    return inputs


def to_device(inputs, device: torch.device, float_dtype: torch.dtype | None = None, dynamic: bool = False):
    """Move (and cast floats to ``float_dtype``); with ``dynamic`` mark each tensor's batch dim dynamic."""
    def move(v):
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if not isinstance(v, torch.Tensor):
            return v
        v = v.to(device, float_dtype if float_dtype is not None and v.is_floating_point() else None)
        if dynamic and v.dim() and v.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(v, 0)
        return v
    return move(inputs)


# ---- configurations -------------------------------------------------------------------------------

@dataclass
class Config:
    """One row: ``run(batch)`` computes a step on the prepared inputs of that batch size."""

    name: str
    make_run: Callable[[], Callable[[int], torch.Tensor]]   # built lazily: compiling happens at the first call
    compiles: bool
    run: Callable[[int], torch.Tensor] | None = None
    weight_bytes: int | None = None
    linears_quantized: int | None = None
    status: str = "ok"
    compile_s: float | None = None
    times: dict[int, list[float]] = field(default_factory=dict)
    sqnr_db: float | None = None


class ModelBench:
    """Everything one model's rows need: the fp32 reference, the bf16 model, our compiled graph, the inputs."""

    def __init__(self, name: str, spec: dict, args, device: torch.device, budget: Budget):
        self.name, self.spec, self.args, self.device, self.budget = name, spec, args, device, budget
        self.seconds: dict[str, float] = {}
        self.kernels: dict[str, dict[str, int]] = {}
        start = time.perf_counter()
        self.cpu_model = build_model(spec)
        self.params = sum(p.numel() for p in self.cpu_model.parameters())
        self.batches = sorted(args.batches, reverse=True)   # largest first: see the module doc
        self.cpu_inputs = {b: make_inputs(spec, b, seed=b) for b in self.batches}
        self.sqnr_batch = min(self.batches)
        with torch.no_grad():
            fp32 = copy.deepcopy(self.cpu_model).to(device)
            self.reference = sample_of(fp32(**to_device(self.cpu_inputs[self.sqnr_batch], device))).float()
            del fp32
        self.bf16 = copy.deepcopy(self.cpu_model).to(device, torch.bfloat16)
        self.bf16_inputs = {b: to_device(x, device, torch.bfloat16, dynamic=True) for b, x in self.cpu_inputs.items()}
        self.seconds["build"] = round(time.perf_counter() - start, 1)
        self.ours_status: str | None = None

    # -- ours --
    def prepare_ours(self) -> str:
        """Compile the model with ditq_compiler on the CPU and move it to the device, once; "ok" or why not."""
        if self.ours_status is None:
            if not self.budget.allows(self.budget.ditq_compile_estimate + self.budget.longest_compile):
                self.ours_status = "skipped: time budget"
                return self.ours_status
            try:
                start = time.perf_counter()
                calibration = [((), make_inputs(self.spec, 2, seed=100 + i)) for i in range(self.args.calibration)]
                compiled = dq.compile(self.cpu_model, self.args.recipe, calibration=calibration, progress=False)
                self.seconds["ditq compile"] = round(time.perf_counter() - start, 1)
                self.seconds.update({f"ditq {k}": round(v, 1) for k, v in compiled.stage_seconds.items()})
                self.budget.ditq_compiles.append(self.seconds["ditq compile"])
                self.compiled = compiled.to(self.device)
                self.ours_inputs = {b: to_device(compiled.captured.bind((), x), self.device, dynamic=True)
                                    for b, x in self.cpu_inputs.items()}
                self.ours_status = "ok"
            except Exception as e:  # noqa: BLE001
                self.ours_status = _error(e)
            print(f"[{self.name}] ditq_compiler.compile: {self.ours_status}, {self.seconds.get('ditq compile')} s",
                  flush=True)
        return self.ours_status

    def ours(self, name: str, **options) -> Callable[[], Callable[[int], torch.Tensor]]:
        def make():
            gm, kernels = lower_cuda(copy.deepcopy(self.compiled.graph_module), **options)
            counts = {k: list(kernels.values()).count(k) for k in sorted(set(kernels.values()))}
            self.kernels[name] = counts
            compiled = torch.compile(gm, fullgraph=True, **self.compile_options())
            run = lambda b: sample_of(compiled(**self.ours_inputs[b]))  # noqa: E731
            return run, weight_bytes(gm), sum(n for k, n in counts.items() if not k.startswith("reference"))
        return make

    # -- bf16 and torchao --
    def compile_options(self) -> dict:
        return {"backend": "eager"} if self.args.smoke else {}

    def bf16_run(self, compile_it: bool):
        def make():
            model = torch.compile(self.bf16, **self.compile_options()) if compile_it else self.bf16
            run = lambda b: sample_of(model(**self.bf16_inputs[b]))  # noqa: E731
            return run, weight_bytes(self.bf16), 0
        return make

    def torchao_run(self, kind: str):
        def make():
            try:
                from torchao.quantization import quantize_
            except ImportError:
                raise Skip("not installed") from None
            model = copy.deepcopy(self.bf16)
            quantize_(model, torchao_config(kind))
            compiled = torch.compile(model, **self.compile_options())
            run = lambda b: sample_of(compiled(**self.bf16_inputs[b]))  # noqa: E731
            quantized = sum(type(m.weight) is not torch.nn.Parameter and type(m.weight) is not torch.Tensor
                            for m in model.modules() if isinstance(m, torch.nn.Linear))
            return run, weight_bytes(model), quantized
        return make

    def configs(self) -> list[Config]:
        makers = {"bf16 eager": (self.bf16_run(False), False), "bf16 compile": (self.bf16_run(True), True),
                  "ours W8A8": (self.ours("ours W8A8", precision="int8", act_quant="producer"), True),
                  "ours FP8": (self.ours("ours FP8", precision="fp8"), True),
                  "torchao int8 dyn": (self.torchao_run("int8"), True),
                  "torchao fp8 dyn": (self.torchao_run("fp8"), True),
                  "ours W8A8 prologue": (self.ours("ours W8A8 prologue", precision="int8", act_quant="prologue"),
                                         True)}
        return [Config(name, *makers[name]) for name in CONFIGS if name in self.args.configs]


def torchao_config(kind: str):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8DynamicActivationInt8WeightConfig

    if kind == "int8":
        return Int8DynamicActivationInt8WeightConfig()
    try:
        from torchao.quantization import PerRow
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    except ImportError:
        return Float8DynamicActivationFloat8WeightConfig()


def _error(e: BaseException) -> str:
    traceback.print_exc()
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def warm_up(config: Config, bench: ModelBench) -> None:
    """Build the configuration and call it on every batch (its first call compiles); set its status on failure."""
    budget = bench.budget
    if config.name.startswith("ours"):
        config.status = bench.prepare_ours()
    if config.status == "ok" and config.compiles and not budget.allows(budget.longest_compile + 10):
        config.status = "skipped: time budget"
    if config.status != "ok":
        print(f"[{bench.name}] {config.name}: {config.status}", flush=True)
        return
    try:
        start = time.perf_counter()
        config.run, config.weight_bytes, config.linears_quantized = config.make_run()
        with torch.no_grad():
            for i, b in enumerate(bench.batches):
                for _ in range(bench.args.warmup):
                    timed_call(config.run, bench.device, b)
                    if i == 0 and config.compile_s is None:
                        config.compile_s = round(time.perf_counter() - start, 1)
        if config.compiles:
            budget.compiles.append(config.compile_s)
        with torch.no_grad():
            config.sqnr_db = round(sqnr_db(bench.reference, config.run(bench.sqnr_batch).float()), 2)
    except Skip as e:
        config.status = str(e)
    except Exception as e:  # noqa: BLE001  (a failing configuration is a row, not the end of the run)
        config.status = _error(e)
    finally:
        print(f"[{bench.name}] {config.name}: {config.status}"
              + (f", first call {config.compile_s} s" if config.compile_s is not None else ""), flush=True)
    if config.status != "ok":
        config.run = None


def interleaved(configs: list[Config], bench: ModelBench, batch: int) -> None:
    live = [c for c in configs if c.run is not None]
    for c in live:
        c.times[batch] = []
    with torch.no_grad():
        for _ in range(bench.args.rounds):
            if not bench.budget.allows(5):
                return
            for c in live:
                try:
                    c.times[batch].append(round(timed_call(c.run, bench.device, batch)[1], 3))
                except Exception as e:  # noqa: BLE001
                    c.status, c.run = _error(e), None
            live = [c for c in live if c.run is not None]


def run_model(name: str, args, device: torch.device, budget: Budget) -> dict:
    spec = (SMOKE_MODELS if args.smoke else MODELS)[name]
    if not budget.allows(30):
        return {"status": "skipped: time budget"}
    bench = ModelBench(name, spec, args, device, budget)
    configs = bench.configs()
    for config in configs:
        warm_up(config, bench)
        gc.collect()
    for batch in bench.batches:
        interleaved(configs, bench, batch)
    rows = {b: [] for b in sorted(bench.batches)}
    for b in rows:
        base = {c.name: statistics.median(c.times[b]) for c in configs if c.times.get(b)}
        for c in configs:
            ms = statistics.median(c.times[b]) if c.times.get(b) else None
            row = {"config": c.name, "status": c.status, "median_ms": None if ms is None else round(ms, 3),
                   "times_ms": c.times.get(b, []), "sqnr_vs_fp32_db": c.sqnr_db, "weight_mb":
                   None if c.weight_bytes is None else round(c.weight_bytes / 2 ** 20, 1),
                   "linears_quantized": c.linears_quantized, "first_call_s": c.compile_s}
            for ref in ("bf16 eager", "bf16 compile"):
                if ms and ref in base:
                    row[f"speedup_vs_{ref.replace(' ', '_')}"] = round(base[ref] / ms, 3)
            rows[b].append(row)
    result = {"class": spec["cls"], "config": spec["config"], "params": bench.params, "sqnr_batch": bench.sqnr_batch,
              "run": {k: getattr(args, k) for k in ("recipe", "calibration", "rounds", "warmup", "time_budget")},
              "seconds": bench.seconds, "kernels": bench.kernels, "batches": {str(b): r for b, r in rows.items()}}
    del bench, configs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---- GEMMs ----------------------------------------------------------------------------------------

def gemm_kernels(m: int, n: int, k: int, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """One (M, N, K) linear per kernel, on random operands (int8 codes over the whole range)."""
    from ditq_compiler.kernels import fp8, triton_w8a8  # noqa: F401  (registers the ditq_cuda ops)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    weight = torch.randn(n, k, generator=g).to(device) / k ** 0.5
    w_bf16 = weight.to(torch.bfloat16)
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    w_scale, colsum = torch.full((n,), 1e-3, device=device), codes.int().sum(1, dtype=torch.int32)
    a_scale, a_zero = torch.full((1,), 0.02, device=device), torch.zeros(1, device=device)
    x_codes = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8).to(device)
    w8, w8_scale = fp8.quantize_weight(weight)
    ops = torch.ops.ditq_cuda
    return {
        "bf16 mm": lambda: x @ w_bf16.t(),
        "torch._int_mm": lambda: torch._int_mm(x_codes, codes.t()),
        "ours prologue (bf16 x)": lambda: ops.w8a8_linear(x, codes, w_scale, colsum, None, a_scale, a_zero, None, 8,
                                                          "gemm"),
        "ours codes (int8 x)": lambda: ops.w8a8_linear_codes(x_codes, codes, w_scale, colsum, None, a_scale, a_zero,
                                                             None, 8, torch.bfloat16, "gemm"),
        "fp8 per-token quant + _scaled_mm": lambda: fp8.fp8_linear(x, w8, w8_scale, None, None, None, "gemm"),
    }


def repeat(fn: Callable[[], torch.Tensor], times: int) -> None:
    for _ in range(times):
        fn()


def gemm_rows(args, device: torch.device, budget: Budget) -> list[dict]:
    """One linear per shape: bf16 mm, torch._int_mm, ours (prologue / codes), FP8 _scaled_mm; median ms (eager:
    our kernels autotune at their first call, which the warm-up absorbs)."""
    rows = []
    reps, rounds = (2, 1) if args.smoke else (20, 5)
    for m, n, k in (SMOKE_GEMM_SHAPES if args.smoke else GEMM_SHAPES):
        if not budget.allows(30):
            break
        kernels = gemm_kernels(m, n, k, device)
        times: dict[str, list[float] | str] = {}
        for name, fn in kernels.items():
            try:
                repeat(fn, 3)
                times[name] = []
            except Exception as e:  # noqa: BLE001
                times[name] = _error(e)
        live = {name: fn for name, fn in kernels.items() if isinstance(times[name], list)}
        for _ in range(rounds):
            for name, fn in live.items():
                times[name].append(timed_call(repeat, device, fn, reps)[1] / reps)
        for name, t in times.items():
            row = {"m": m, "n": n, "k": k, "kernel": name}
            if isinstance(t, str):
                row["status"] = t
            else:
                ms = statistics.median(t)
                row.update(status="ok", median_ms=round(ms, 4), tops=round(2 * m * n * k / ms / 1e9, 1))
            rows.append(row)
        print(f"[gemm] {m}x{n}x{k}: " + ", ".join(f"{r['kernel']} {r.get('median_ms', r['status'])}"
                                                   for r in rows[-len(times):]), flush=True)
    return rows


# ---- output ---------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    lines = [f"GPU: {results['gpu']}; torch {results['torch']}, triton {results['triton']}, torchao "
             f"{results['torchao'] or 'not installed'}; recipe {results['settings']['recipe']}; median of "
             f"{results['settings']['rounds']} interleaved rounds" + ("" if results["complete"] else
                                                                       "; INCOMPLETE (time budget)"), ""]
    if results["gemm"]:
        lines += ["One linear (M x N x K), median ms (TOPS):", "", "| M x N x K | kernel | ms | TOPS |",
                  "|---|---|---|---|"]
        for r in results["gemm"]:
            value = f"{r['median_ms']} | {r['tops']}" if r["status"] == "ok" else f"{r['status']} | -"
            lines.append(f"| {r['m']}x{r['n']}x{r['k']} | {r['kernel']} | {value} |")
        lines.append("")
    for name, model in results["models"].items():
        if "batches" not in model:
            lines += [f"{name}: {model.get('status')}", ""]
            continue
        lines += [f"{name} ({model['class']}, {model['params'] / 1e6:.0f}M parameters); SQNR vs the fp32 model at "
                  f"batch {model['sqnr_batch']}; build {model['seconds']}", ""]
        for batch, rows in model["batches"].items():
            lines += [f"batch {batch}:", "", "| config | ms / step | vs bf16 eager | vs bf16 compile | SQNR vs FP32 dB "
                      "| weights MB | quantized linears | status |", "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                def fmt(v, spec):
                    return "-" if v is None else format(v, spec)
                lines.append(f"| {r['config']} | {fmt(r['median_ms'], '.2f')} | "
                             f"{fmt(r.get('speedup_vs_bf16_eager'), '.2f')} | "
                             f"{fmt(r.get('speedup_vs_bf16_compile'), '.2f')} | {fmt(r['sqnr_vs_fp32_db'], '.1f')} | "
                             f"{fmt(r['weight_mb'], '.1f')} | {fmt(r['linears_quantized'], 'd')} | {r['status']} |")
            lines.append("")
        for config, counts in model["kernels"].items():
            lines.append(f"{config} kernels: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
        lines.append("")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, smoke)"


def versions() -> dict:
    found = {}
    for package in ("triton", "torchao", "diffusers"):
        try:
            found[package] = __import__(package).__version__
        except ImportError:
            found[package] = None
    return {"torch": torch.__version__, **found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default 2 16 64 (smoke: 2)")
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                        help="default: all but 'ours W8A8 prologue' (smoke: all)")
    parser.add_argument("--recipe", default="w8a8", help="ditq_compiler recipe of our rows")
    parser.add_argument("--calibration", type=int, default=1, help="random calibration calls (batch 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 10; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="calls per batch before timing (default 3; smoke 1)")
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds; stops cleanly when spent")
    parser.add_argument("--no-gemm", dest="gemm", action="store_false", help="skip the GEMM section")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy models, Triton's interpreter: the plumbing")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    args.batches = args.batches or ([2] if args.smoke else [2, 16, 64])
    args.configs = args.configs or list(CONFIGS if args.smoke else DEFAULT_CONFIGS)
    args.rounds = args.rounds or (2 if args.smoke else 10)
    args.warmup = args.warmup or (1 if args.smoke else 3)
    budget = Budget(args.time_budget)
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --smoke to test the script on the CPU")
    else:
        device = torch.device("cuda")
    gpu = device_name(device)
    slug = "smoke" if args.smoke else re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    path = Path(args.out) / f"speed-gpu-{slug}.json"
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    results = {"gpu": gpu, **versions(), "settings": settings, "complete": False, "gemm": [], "models": {}}
    earlier = json.loads(path.read_text()) if path.exists() else {}
    if earlier.get("gpu") == gpu:     # a run of other models on the same GPU: keep its rows (see the module doc)
        results["gemm"] = earlier.get("gemm", [])
        results["models"] = {k: v for k, v in earlier.get("models", {}).items() if k not in args.models}

    def save():
        results["elapsed_s"] = round(args.time_budget - budget.left(), 1)
        write_text(path, json.dumps(results, indent=1))
        write_text(path.with_suffix(".md"), markdown(results))

    if args.gemm:
        results["gemm"] = gemm_rows(args, device, budget)
        save()
    for name in args.models:
        results["models"][name] = run_model(name, args, device, budget)
        save()
    results["complete"] = not budget.ran_out
    save()
    print(markdown(results), flush=True)
    print(f"wrote {path} and {path.with_suffix('.md')}", flush=True)


if __name__ == "__main__":
    main()
