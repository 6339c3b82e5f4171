"""The parts of a recipe: quantizer specs, overrides, and the method sections, each checking its own fields.

A method section is a frozen dataclass (``Section``); ``Section.parse(data, path)`` reads it from YAML /
JSON (absent or false: no section; true: the defaults; a mapping: its keys checked, lists made tuples)
and calls the section's ``check(path)``, which raises ``RecipeError`` naming the field path. Rules that
involve several sections, or the model and the calibration set, are the one table of
``ditq_compiler.recipe_rules``; ``ditq_compiler.recipe.Recipe`` puts the parts together.

``SECTIONS`` lists every section by its key in the recipe, in the order they are written out.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ditq_compiler.graph import ROLES, LayerInfo
from ditq_compiler.quant import QuantSpec

TIME_GROUP_SITES = ("post_softmax", "post_gelu", "linear_inputs", "attention_operands")


class RecipeError(ValueError):
    """A recipe is malformed; the message names the field path."""


class RecipeWarning(UserWarning):
    """A part of a recipe has no effect on the model compiled (an override that matches no layer)."""


def _check_keys(data: Any, allowed: set[str], path: str) -> None:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RecipeError(f"{path}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _spec(data: Any, path: str, base: QuantSpec | None = None) -> QuantSpec:
    fields = {f.name for f in dataclasses.fields(QuantSpec)}
    _check_keys(data, fields, path)
    merged = {**(base.to_dict() if base else {}), **data}
    try:
        spec = QuantSpec(**merged)
    except ValueError as e:
        field_name = re.match(r"QuantSpec\.(\w+)", str(e))
        raise RecipeError(f"{path}.{field_name.group(1) if field_name else ''}: {e}") from None
    return spec


def _check_weight_spec(spec: QuantSpec, path: str) -> None:
    if spec.granularity == "token":
        raise RecipeError(f"{path}.granularity: weights cannot be quantized per token (tokens are activations)")
    if spec.granularity == "channel" and spec.axis != 0:
        raise RecipeError(f"{path}.axis: per-channel weights use the output channel, axis 0 (got {spec.axis})")


def _activation_spec(data: Any, path: str, base: QuantSpec | None) -> QuantSpec:
    if isinstance(data, Mapping) and isinstance(data.get("bits"), float):
        raise RecipeError(f"{path}.bits: activations take an integer 2..8 bits (ternary, 1.58, is for weights), "
                          f"got {data['bits']!r}")
    spec = _spec(data, path, base)
    _check_activation_spec(spec, path)
    return spec


def _check_activation_spec(spec: QuantSpec, path: str) -> None:
    if spec.granularity in ("channel", "group"):
        raise RecipeError(f"{path}.granularity: per-{spec.granularity} activation scales vary along the "
                          "reduction dimension and cannot be factored out of the matmul; use 'tensor' or 'token'")


def _check_roles(roles: Any, path: str) -> tuple[str, ...]:
    if isinstance(roles, str) or not isinstance(roles, (list, tuple)):
        raise RecipeError(f"{path}: expected a list of roles, got {roles!r}")
    for i, role in enumerate(roles):
        if role not in ROLES:
            raise RecipeError(f"{path}[{i}]: unknown role {role!r} (roles: {', '.join(ROLES)})")
    return tuple(roles)


@dataclass(frozen=True)
class Override:
    """Changes for the layers that match ``role`` and/or ``name`` (both, when both are given)."""

    role: str | None = None
    name: str | None = None                                   # regex, full match on the layer name
    quantize: bool | None = None
    weights: tuple[tuple[str, Any], ...] | None = None        # partial QuantSpec fields
    activations: tuple[tuple[str, Any], ...] | bool | None = None   # False: weight-only

    def matches(self, layer: LayerInfo) -> bool:
        return ((self.role is None or layer.role == self.role)
                and (self.name is None or re.fullmatch(self.name, layer.name) is not None))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("role", "name", "quantize"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.weights is not None:
            out["weights"] = dict(self.weights)
        if self.activations is not None:
            out["activations"] = self.activations if isinstance(self.activations, bool) else dict(self.activations)
        return out


def _override(data: Any, path: str, recipe_weights: QuantSpec, recipe_acts: QuantSpec | None) -> Override:
    _check_keys(data, {"role", "name", "quantize", "weights", "activations"}, path)
    if data.get("role") is None and data.get("name") is None:
        raise RecipeError(f"{path}: an override needs a 'role' or a 'name' to select layers")
    if data.get("role") is not None and data["role"] not in ROLES:
        raise RecipeError(f"{path}.role: unknown role {data['role']!r} (roles: {', '.join(ROLES)})")
    if data.get("name") is not None:
        try:
            re.compile(data["name"])
        except re.error as e:
            raise RecipeError(f"{path}.name: not a valid regular expression: {e}") from None
    if data.get("quantize") is not None and not isinstance(data["quantize"], bool):
        raise RecipeError(f"{path}.quantize: expected true or false, got {data['quantize']!r}")
    weights = data.get("weights")
    if weights is not None:
        _check_weight_spec(_spec(weights, f"{path}.weights", recipe_weights), f"{path}.weights")
        weights = tuple(sorted(weights.items()))
    acts = data.get("activations")
    if acts is True:
        raise RecipeError(f"{path}.activations: use a mapping of fields, or false for weight-only")
    if isinstance(acts, Mapping):
        if recipe_acts is None and "bits" not in acts:
            raise RecipeError(f"{path}.activations: the recipe quantizes no activations, so an override "
                              "that enables them must give at least 'bits'")
        _activation_spec(acts, f"{path}.activations", recipe_acts)
        acts = tuple(sorted(acts.items()))
    return Override(role=data.get("role"), name=data.get("name"), quantize=data.get("quantize"),
                    weights=weights, activations=acts)


def _number(value: Any, path: str, lo: float, hi: float, integer: bool = False, open_lo: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if open_lo else value >= lo) and value <= hi and (not integer or isinstance(value, int))
    if not ok:
        kind = "an integer" if integer else "a number"
        raise RecipeError(f"{path}: expected {kind} in {'(' if open_lo else '['}{lo}, {hi}], got {value!r}")

def _choice(value: Any, options: tuple[str, ...], path: str) -> None:
    if value not in options:
        raise RecipeError(f"{path}: expected {' or '.join(repr(o) for o in options)}, got {value!r}")


def _flag(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        raise RecipeError(f"{path}: expected true or false, got {value!r}")


class Section:
    """A method section of a recipe: a frozen dataclass whose ``check`` validates its own fields."""

    def check(self, path: str) -> None:
        """Raise ``RecipeError`` naming ``path.field`` for a field out of its range."""

    @classmethod
    def parse(cls, data: Any, path: str) -> Any:
        """The section from recipe data: None when absent or false, the defaults when true."""
        if data is None or data is False:
            return None
        data = {} if data is True else data
        _check_keys(data, {f.name for f in dataclasses.fields(cls)}, path)
        section = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        section.check(path)
        return section

    def to_dict(self) -> dict[str, Any]:
        """Tuples as lists, so YAML's safe dumper writes them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class ShiftSpec(Section):
    """TaQ-DiT momentum-based shifting (Eqs. 5-8): a per-channel shift ``d`` of a linear's input.

    ``statistic``: "mean" (the paper, Eq. 6) or "midrange", (min + max) / 2 (the authors' code).
    ``sites``: "post_gelu" (inputs of fc2) or "all" (every quantized linear with a static input
    quantizer). ``momentum``: m in d <- m d + (1 - m) d_t over timesteps in sampling order.
    """

    statistic: str = "mean"
    momentum: float = 0.95
    sites: str = "post_gelu"

    def check(self, path: str) -> None:
        _choice(self.statistic, ("mean", "midrange"), f"{path}.statistic")
        _choice(self.sites, ("post_gelu", "all"), f"{path}.sites")
        _number(self.momentum, f"{path}.momentum", 0.0, 1.0)


@dataclass(frozen=True)
class MigrationSpec(Section):
    """TaQ-DiT reconstruction-driven migration (Eqs. 9-10): the top ``top_k`` fraction of input
    channels by range (after the shift) are divided by factors folded into the weight columns."""

    top_k: float = 0.02

    def check(self, path: str) -> None:
        _number(self.top_k, f"{path}.top_k", 0.0, 1.0, open_lo=True)


@dataclass(frozen=True)
class ReconstructionSpec(Section):
    """Block-wise reconstruction (TaQ-DiT Eq. 4): AdaRound weights, LSQ activation scales, factors.

    ``mode``: "joint" (weights, activation scales and migration factors together, with QDrop) or
    "separate" (weights first with float activations, then activation scales; the paper's
    baseline). Defaults from the paper and the BRECQ/QDrop code it builds on, except
    ``iterations`` (paper: 20000; chosen for the CPU budget, see the README's trade-off table)
    and ``factor_lr`` (the paper does not give one).
    """

    mode: str = "joint"
    iterations: int = 1000
    batch_size: int = 32
    round_loss_weight: float = 0.01
    b_start: float = 20.0
    b_end: float = 2.0
    warmup: float = 0.2
    weight_lr: float = 1e-3
    act_lr: float = 4e-5
    factor_lr: float = 1e-3
    drop_prob: float = 0.5
    seed: int = 0

    def check(self, path: str) -> None:
        _choice(self.mode, ("joint", "separate"), f"{path}.mode")
        _number(self.iterations, f"{path}.iterations", 0, 10**7, integer=True)
        _number(self.batch_size, f"{path}.batch_size", 1, 10**6, integer=True)
        _number(self.seed, f"{path}.seed", 0, 2**63 - 1, integer=True)
        _number(self.warmup, f"{path}.warmup", 0.0, 1.0)
        _number(self.drop_prob, f"{path}.drop_prob", 0.0, 1.0)
        for name in ("round_loss_weight", "weight_lr", "act_lr", "factor_lr"):
            _number(getattr(self, name), f"{path}.{name}", 0.0, 1e3)
        for name in ("b_start", "b_end"):
            _number(getattr(self, name), f"{path}.{name}", 0.0, 1e3, open_lo=True)


@dataclass(frozen=True)
class AttentionSpec(Section):
    """TQ-DiT attention (Sec. III-D): SDPA decomposed into matmul, scale, softmax, matmul
    (``passes/decompose_attention.py``); with ``matmuls`` both operands of both matmuls (q, k^T and
    the post-softmax P, v) are quantized per tensor with the recipe's activation spec."""

    matmuls: bool = True

    def check(self, path: str) -> None:
        _flag(self.matmuls, f"{path}.matmuls")


@dataclass(frozen=True)
class ScaleSearchSpec(Section):
    """TQ-DiT scale search (Eqs. 14-17, Algorithm 1 phase 3), replacing the observers.

    Candidates ``alpha * s0`` with ``s0`` the min/max step of the layer's (or time group's) data and
    ``alpha = eq_alpha + i (eq_beta - eq_alpha) / eq_n``, i = 0..eq_n (the authors' code: 0.01, 1.2,
    100). ``metric``: "hessian" scores a candidate by the layer-output error weighted with squared
    gradients of the diffusion loss (Eq. 16; the calibration set must carry the noise, as
    ``from_sampler`` sets do), "mse" by the plain output error (the ablation baseline). Weight and
    activation scales are searched alternately for ``rounds`` rounds (paper: R = 3).
    """

    metric: str = "hessian"
    rounds: int = 3
    eq_alpha: float = 0.01
    eq_beta: float = 1.2
    eq_n: int = 100

    def check(self, path: str) -> None:
        _choice(self.metric, ("hessian", "mse"), f"{path}.metric")
        _number(self.rounds, f"{path}.rounds", 1, 100, integer=True)
        _number(self.eq_n, f"{path}.eq_n", 1, 10**4, integer=True)
        _number(self.eq_alpha, f"{path}.eq_alpha", 0.0, 10.0, open_lo=True)
        _number(self.eq_beta, f"{path}.eq_beta", 0.0, 10.0, open_lo=True)
        if self.eq_beta <= self.eq_alpha:
            raise RecipeError(f"{path}.eq_beta: must be larger than eq_alpha ({self.eq_alpha}), got {self.eq_beta}")


@dataclass(frozen=True)
class MultiRegionSpec(Section):
    """TQ-DiT MRQ (Sec. III-C): two regions for the post-softmax probabilities (needs ``attention``)
    and separate negative / positive steps for the post-GELU inputs of fc2."""

    post_softmax: bool = True
    post_gelu: bool = True

    def check(self, path: str) -> None:
        for name in ("post_softmax", "post_gelu"):
            _flag(getattr(self, name), f"{path}.{name}")


@dataclass(frozen=True)
class TimeGroupSpec(Section):
    """TQ-DiT TGQ (Sec. III-A): the calibration timesteps split into ``groups`` contiguous groups, each
    with its own activation parameters at ``sites``: "post_softmax" (paper), "post_gelu" (fc2 inputs),
    "linear_inputs" (the other quantized linears' inputs), "attention_operands" (q, k, v)."""

    groups: int = 10
    sites: tuple[str, ...] = ("post_softmax",)

    def check(self, path: str) -> None:
        _number(self.groups, f"{path}.groups", 1, 10**4, integer=True)
        sites = self.sites
        if isinstance(sites, str) or not isinstance(sites, (list, tuple)) or not sites:
            raise RecipeError(f"{path}.sites: expected a non-empty list of sites, got {sites!r}")
        for i, site in enumerate(sites):
            if site not in TIME_GROUP_SITES:
                raise RecipeError(f"{path}.sites[{i}]: unknown site {site!r} (sites: {', '.join(TIME_GROUP_SITES)})")
        if len(set(sites)) != len(sites):
            raise RecipeError(f"{path}.sites: lists a site twice: {list(sites)}")


@dataclass(frozen=True)
class RotationSpec(Section):
    """RobuQ's Hadamard rotation in front of the linears with these roles (``passes/insert_hadamard.py``).

    ``fuse``: fold a rotation into the previous linear where nothing nonlinear lies between
    (false keeps every rotation online; same function, for checking).
    """

    roles: tuple[str, ...] = ("qkv", "attn_out", "fc1", "fc2")
    fuse: bool = True

    def check(self, path: str) -> None:
        _check_roles(self.roles, f"{path}.roles")
        if not self.roles:
            raise RecipeError(f"{path}.roles: rotate at least one role (or drop the section)")
        _flag(self.fuse, f"{path}.fuse")


@dataclass(frozen=True)
class DistillationSpec(Section):
    """Quantization-aware distillation against the FP model (``ditq_compiler/train/distill.py``).

    AdamW on the quantized layers' latent weights and biases (``lr``, ``weight_decay``) and on
    their weight scales and activation scales / per-token clipping ratios (``scale_lr``), cosine
    decay to 0 over ``iterations``, minibatches of ``batch_size`` calibration inputs. Loss:
    ``output_weight * MSE(out_q, out_fp) + dm_weight * MSE(eps_q, eps) + block_weight * mean_blocks
    mean(r_SBM^2)`` with BiDM+'s diffusion loss L_DM on the calibration set's noise (``dm_weight``; needs
    ``from_sampler`` data), its salience-weighted residual (Eqs. 18-19) and ``leniency`` its percentile (10
    in the paper); ``block_weight: 0`` drops the block term. Defaults chosen on dit-digits (the papers give no
    CPU-sized schedule; the README has the sweep): ``block_weight`` puts the block term at about a
    third of the output term at the start, where it added 0.6 dB of held-out noise SQNR.
    """

    iterations: int = 3000
    batch_size: int = 32
    lr: float = 3e-4
    scale_lr: float = 1e-3
    weight_decay: float = 0.0
    output_weight: float = 1.0
    dm_weight: float = 0.0
    block_weight: float = 5e-3
    leniency: float = 10.0
    seed: int = 0

    def check(self, path: str) -> None:
        _number(self.iterations, f"{path}.iterations", 0, 10**7, integer=True)
        _number(self.batch_size, f"{path}.batch_size", 1, 10**6, integer=True)
        _number(self.seed, f"{path}.seed", 0, 2**63 - 1, integer=True)
        _number(self.leniency, f"{path}.leniency", 0.0, 100.0)
        for name in ("lr", "scale_lr", "weight_decay", "output_weight", "dm_weight", "block_weight"):
            _number(getattr(self, name), f"{path}.{name}", 0.0, 1e6)
        if self.output_weight == 0 and self.dm_weight == 0 and self.block_weight == 0:
            raise RecipeError(f"{path}.output_weight: output_weight, dm_weight and block_weight are all 0: nothing "
                              "to learn from")


@dataclass(frozen=True)
class MixedPrecisionSpec(Section):
    """AMPN: each quantized layer's activation bits from ``candidates`` under an average ``budget``.

    ``sensitivity``: "distilled" measures, after ``search_iterations`` of distillation at the
    recipe's activation bits, how much the distillation loss rises when one layer's activation
    bits change; "ptq" measures the same on the model before any distillation (the PTQ metric the
    RobuQ paper argues against). ``weighting``: the average is over layers weighted by their
    multiply-adds per token ("macs") or unweighted ("layers").
    """

    budget: float = 3.0
    candidates: tuple[int, ...] = (2, 3, 4, 6, 8)
    sensitivity: str = "distilled"
    search_iterations: int = 500
    weighting: str = "macs"

    def check(self, path: str) -> None:
        candidates = self.candidates
        if not isinstance(candidates, tuple) or not candidates:
            raise RecipeError(f"{path}.candidates: expected a non-empty list of bit widths, got {candidates!r}")
        for i, bits in enumerate(candidates):
            _number(bits, f"{path}.candidates[{i}]", 2, 8, integer=True)
        if len(set(candidates)) != len(candidates):
            raise RecipeError(f"{path}.candidates: repeated bit widths in {list(candidates)}")
        _number(self.budget, f"{path}.budget", min(candidates), max(candidates))
        _choice(self.sensitivity, ("distilled", "ptq"), f"{path}.sensitivity")
        _choice(self.weighting, ("macs", "layers"), f"{path}.weighting")
        _number(self.search_iterations, f"{path}.search_iterations", 0, 10**7, integer=True)


SMOOTHING_ROLES = ("qkv", "fc1", "attn_out", "fc2", "linear", "conv")


@dataclass(frozen=True)
class SmoothingSpec(Section):
    """Smoothing folded through the normalization / adaLN modulation (``passes/smooth_through_modulation.py``):
    the inputs of the quantized layers with roles ``sites`` that a norm produces are divided per channel by
    ``s = max|X|^alpha / max|W|^(1 - alpha)`` (``calibration/smoothing.py``), the division folded into the
    modulation (or the norm's affine) and ``s`` into the layers' weight columns.

    ``alpha``: a number in [0, 1], or "search" (per site, ``grid`` values in [0, 1] and no smoothing, scored by
    the error of the layers' quantized outputs). ``metric``: "mse", "hessian" (the error weighted by squared
    gradients of the diffusion loss, TQ-DiT Eq. 16; needs calibration noise) or "auto" (hessian when the
    calibration set carries the noise, as ``from_sampler`` sets do, else mse). ``aggregation``: "max" (max |X_j|
    over all calibration rows) or "mean" (the mean over calibration timesteps of each timestep's max). ``rows``:
    token rows per site the search scores.
    """

    sites: tuple[str, ...] = ("qkv", "fc1")
    alpha: float | str = "search"
    grid: int = 21
    metric: str = "auto"
    aggregation: str = "max"
    rows: int = 4096

    def check(self, path: str) -> None:
        if isinstance(self.sites, str) or not isinstance(self.sites, tuple) or not self.sites:
            raise RecipeError(f"{path}.sites: expected a non-empty list of roles, got {self.sites!r}")
        for i, role in enumerate(self.sites):
            _choice(role, SMOOTHING_ROLES, f"{path}.sites[{i}]")
        if self.alpha != "search":
            _number(self.alpha, f"{path}.alpha", 0.0, 1.0)
        _number(self.grid, f"{path}.grid", 21, 1001, integer=True)
        _choice(self.metric, ("auto", "mse", "hessian"), f"{path}.metric")
        _choice(self.aggregation, ("max", "mean"), f"{path}.aggregation")
        _number(self.rows, f"{path}.rows", 1, 10**8, integer=True)


@dataclass(frozen=True)
class TimestepConnectionSpec(Section):
    """BiDM+'s TES (Sec. 3.4, Eq. 17; ``passes/connect_timesteps.py``): each block output mixed with its value at
    the previous sampler step, ``u + lambda(t) (u_prev - u)``, ``lambda(t) = lambda_hat[g] (1 + t / T)`` with
    ``groups`` learnable coefficients per site (g = floor(t groups / T), ``train_timesteps`` T) initialised to
    ``initial``. ``sites``: "blocks" (the outputs of a U-Net's up blocks, as the paper; of a DiT's transformer
    blocks, our extension). The coefficients are learned by the recipe's distillation, which then runs each
    training input's neighbouring (noisier) step first, as BiDM+'s training does.
    """

    sites: str = "blocks"
    groups: int = 10
    initial: float = 0.25
    train_timesteps: int = 1000

    def check(self, path: str) -> None:
        _choice(self.sites, ("blocks",), f"{path}.sites")
        _number(self.groups, f"{path}.groups", 1, 10**4, integer=True)
        _number(self.initial, f"{path}.initial", 0.0, 1.0)
        _number(self.train_timesteps, f"{path}.train_timesteps", 1, 10**6, integer=True)


SECTIONS: dict[str, type[Section]] = {
    "smoothing": SmoothingSpec,                                                                 # ditq
    "shift": ShiftSpec, "migration": MigrationSpec, "reconstruction": ReconstructionSpec,          # TaQ-DiT
    "attention": AttentionSpec, "scale_search": ScaleSearchSpec, "multi_region": MultiRegionSpec,  # TQ-DiT
    "time_groups": TimeGroupSpec,
    "rotation": RotationSpec, "distillation": DistillationSpec, "mixed_precision": MixedPrecisionSpec,  # RobuQ
    "timestep_connections": TimestepConnectionSpec,                                               # BiDM+
}


__all__ = ["SECTIONS", "TIME_GROUP_SITES", "AttentionSpec", "DistillationSpec", "MigrationSpec", "MixedPrecisionSpec",
           "MultiRegionSpec", "Override", "ReconstructionSpec", "RecipeError", "RotationSpec", "ScaleSearchSpec",
           "Section", "ShiftSpec", "SmoothingSpec", "TimeGroupSpec", "TimestepConnectionSpec"]
