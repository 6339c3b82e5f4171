"""Recipes: validated, versioned, frozen quantization configuration.

A recipe says which layers (by graph role) are quantized and how their weights and input
activations are quantized, with overrides by role and by layer name (a regular expression
matched against the whole module path). It round-trips through YAML and JSON; unknown keys
and impossible combinations are errors that name the field path, e.g.
``recipe.overrides[1].weights.bitz``.

By default embedders, adaLN modulation, the patch embedding and the final layer stay in
full precision, as in the DiT quantization papers; a recipe can list them in
``quantize_roles`` or in an override to quantize them.

Optional method sections (version 2) switch on TaQ-DiT's transformations and calibration:
``shift`` (momentum-based shifting folded into the bias), ``migration`` (outlier channels
migrated into the weights; needs ``shift``) and ``reconstruction`` (block-wise AdaRound + LSQ,
joint with QDrop or separate). Their fields and defaults are the dataclasses below.

TQ-DiT's sections: ``attention`` (decompose SDPA and quantize both operands of both attention
matmuls), ``scale_search`` (weight and activation scales chosen from a candidate grid by the
Hessian-weighted output error, or the plain output MSE), ``multi_region`` (two-region post-softmax
and post-GELU quantizers) and ``time_groups`` (G time groups with their own activation parameters
at the chosen sites). The last three need ``scale_search``, which fits their parameters.

RobuQ's sections: ``rotation`` (Hadamard rotation of the inputs of linears chosen by role,
``passes/insert_hadamard.py``), ``distillation`` (quantization-aware distillation against the
FP model on the calibration inputs: STE, learnable scales, AdamW, output MSE plus the optional
BiDM+ salience-weighted block mimicking; ``ditq_compiler/train/distill.py``) and
``mixed_precision`` (AMPN: per-layer activation bits under an average budget,
``ditq_compiler/train/mixed_precision.py``). Ternary weights (W1.58) are ``weights: {bits: 1.58,
observer: absmean}`` (see ``ditq_compiler.quant.spec``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from ditq_compiler.atomic import write_text
from ditq_compiler.graph import ROLES, LayerInfo
from ditq_compiler.quant import QuantSpec

RECIPE_VERSION = 2
DEFAULT_QUANTIZED_ROLES = ("qkv", "attn_out", "fc1", "fc2", "conv", "linear")


class RecipeError(ValueError):
    """A recipe is malformed; the message names the field path."""


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


@dataclass(frozen=True)
class ShiftSpec:
    """TaQ-DiT momentum-based shifting (Eqs. 5-8): a per-channel shift ``d`` of a linear's input.

    ``statistic``: "mean" (the paper, Eq. 6) or "midrange", (min + max) / 2 (the authors' code).
    ``sites``: "post_gelu" (inputs of fc2) or "all" (every quantized linear with a static input
    quantizer). ``momentum``: m in d <- m d + (1 - m) d_t over timesteps in sampling order.
    """

    statistic: str = "mean"
    momentum: float = 0.95
    sites: str = "post_gelu"


@dataclass(frozen=True)
class MigrationSpec:
    """TaQ-DiT reconstruction-driven migration (Eqs. 9-10): the top ``top_k`` fraction of input
    channels by range (after the shift) are divided by factors folded into the weight columns."""

    top_k: float = 0.02


@dataclass(frozen=True)
class ReconstructionSpec:
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


@dataclass(frozen=True)
class AttentionSpec:
    """TQ-DiT attention (Sec. III-D): SDPA decomposed into matmul, scale, softmax, matmul
    (``passes/decompose_attention.py``); with ``matmuls`` both operands of both matmuls (q, k^T and
    the post-softmax P, v) are quantized per tensor with the recipe's activation spec."""

    matmuls: bool = True


@dataclass(frozen=True)
class ScaleSearchSpec:
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


@dataclass(frozen=True)
class MultiRegionSpec:
    """TQ-DiT MRQ (Sec. III-C): two regions for the post-softmax probabilities (needs ``attention``)
    and separate negative / positive steps for the post-GELU inputs of fc2."""

    post_softmax: bool = True
    post_gelu: bool = True


TIME_GROUP_SITES = ("post_softmax", "post_gelu", "linear_inputs", "attention_operands")


@dataclass(frozen=True)
class TimeGroupSpec:
    """TQ-DiT TGQ (Sec. III-A): the calibration timesteps split into ``groups`` contiguous groups, each
    with its own activation parameters at ``sites``: "post_softmax" (paper), "post_gelu" (fc2 inputs),
    "linear_inputs" (the other quantized linears' inputs), "attention_operands" (q, k, v)."""

    groups: int = 10
    sites: tuple[str, ...] = ("post_softmax",)


TQ_SECTIONS = {"attention": AttentionSpec, "scale_search": ScaleSearchSpec, "multi_region": MultiRegionSpec,
               "time_groups": TimeGroupSpec}


def _check_tq_spec(spec: Any, path: str) -> Any:
    if isinstance(spec, AttentionSpec):
        if not isinstance(spec.matmuls, bool):
            raise RecipeError(f"{path}.matmuls: expected true or false, got {spec.matmuls!r}")
    elif isinstance(spec, ScaleSearchSpec):
        if spec.metric not in ("hessian", "mse"):
            raise RecipeError(f"{path}.metric: expected 'hessian' or 'mse', got {spec.metric!r}")
        _number(spec.rounds, f"{path}.rounds", 1, 100, integer=True)
        _number(spec.eq_n, f"{path}.eq_n", 1, 10**4, integer=True)
        _number(spec.eq_alpha, f"{path}.eq_alpha", 0.0, 10.0, open_lo=True)
        _number(spec.eq_beta, f"{path}.eq_beta", 0.0, 10.0, open_lo=True)
        if spec.eq_beta <= spec.eq_alpha:
            raise RecipeError(f"{path}.eq_beta: must be larger than eq_alpha ({spec.eq_alpha}), got {spec.eq_beta}")
    elif isinstance(spec, MultiRegionSpec):
        for name in ("post_softmax", "post_gelu"):
            if not isinstance(getattr(spec, name), bool):
                raise RecipeError(f"{path}.{name}: expected true or false, got {getattr(spec, name)!r}")
    elif isinstance(spec, TimeGroupSpec):
        _number(spec.groups, f"{path}.groups", 1, 10**4, integer=True)
        sites = spec.sites
        if isinstance(sites, str) or not isinstance(sites, (list, tuple)) or not sites:
            raise RecipeError(f"{path}.sites: expected a non-empty list of sites, got {sites!r}")
        for i, site in enumerate(sites):
            if site not in TIME_GROUP_SITES:
                raise RecipeError(f"{path}.sites[{i}]: unknown site {site!r} (sites: {', '.join(TIME_GROUP_SITES)})")
        if len(set(sites)) != len(sites):
            raise RecipeError(f"{path}.sites: lists a site twice: {list(sites)}")
        spec = dataclasses.replace(spec, sites=tuple(sites))
    return spec


def _check_tq_sections(recipe_path: str, weights: QuantSpec, acts: QuantSpec | None, sections: dict) -> None:
    """Rules between TQ-DiT's sections and the rest of the recipe (the message names the field)."""
    attention, search = sections["attention"], sections["scale_search"]
    multi, groups = sections["multi_region"], sections["time_groups"]
    matmuls = attention is not None and attention.matmuls
    for name in ("attention", "multi_region", "time_groups"):
        if sections[name] is not None and acts is None:
            raise RecipeError(f"{recipe_path}.{name}: needs quantized activations (activations is false)")
    if matmuls and search is None:
        raise RecipeError(f"{recipe_path}.attention: the attention operands are calibrated by the scale search; "
                          "add a 'scale_search' section (metric: mse for the plain output error)")
    for name, section in (("multi_region", multi), ("time_groups", groups)):
        if section is not None and search is None:
            raise RecipeError(f"{recipe_path}.{name}: its parameters are fitted by the scale search; add a "
                              "'scale_search' section")
    if multi is not None and not multi.post_softmax and not multi.post_gelu:
        raise RecipeError(f"{recipe_path}.multi_region: post_softmax and post_gelu are both false, so the section "
                          "changes nothing; drop it")
    if multi is not None and multi.post_softmax and not matmuls:
        raise RecipeError(f"{recipe_path}.multi_region.post_softmax: the probabilities are quantized only where "
                          "the attention matmuls are; add 'attention: {matmuls: true}' or set post_softmax: false")
    if groups is not None and not matmuls:
        for i, site in enumerate(groups.sites):
            if site in ("post_softmax", "attention_operands"):
                raise RecipeError(f"{recipe_path}.time_groups.sites[{i}]: '{site}' needs the attention matmuls "
                                  "quantized; add 'attention: {matmuls: true}'")
    if search is not None:
        if weights.granularity == "group":
            raise RecipeError(f"{recipe_path}.scale_search: searches per-channel or per-tensor weight scales; "
                              "weights.granularity is 'group'")
        if acts is not None and acts.granularity == "token":
            raise RecipeError(f"{recipe_path}.scale_search: searches static activation scales; "
                              "activations.granularity is 'token' (dynamic)")
        if sections["reconstruction"] is not None:
            raise RecipeError(f"{recipe_path}.scale_search: the recipe also has a 'reconstruction' section; "
                              "both would set the same scales, keep one")


def _check_search_overrides(recipe_path: str, overrides: tuple[Override, ...], search: ScaleSearchSpec | None) -> None:
    """The scale search's limits on the recipe's formats hold for the formats an override sets, too."""
    if search is None:
        return
    for i, override in enumerate(overrides):
        weights = dict(override.weights or ())
        acts = dict(override.activations) if isinstance(override.activations, tuple) else {}
        if weights.get("granularity") == "group":
            raise RecipeError(f"{recipe_path}.overrides[{i}].weights.granularity: the scale_search searches "
                              "per-channel or per-tensor weight scales, not 'group'")
        if acts.get("granularity") == "token":
            raise RecipeError(f"{recipe_path}.overrides[{i}].activations.granularity: the scale_search fits static "
                              "activation scales (and time groups a table of them); 'token' is dynamic")


def _section_data(cls, data: Any, path: str) -> dict | None:
    """A method section's mapping with its keys checked: None when absent or false, {} (defaults) when true."""
    if data is None or data is False:
        return None
    data = {} if data is True else data
    _check_keys(data, {f.name for f in dataclasses.fields(cls)}, path)
    return data


def _method_spec(cls, data: Any, path: str):
    data = _section_data(cls, data, path)
    if data is None:
        return None
    spec = cls(**data)
    if cls in (AttentionSpec, ScaleSearchSpec, MultiRegionSpec, TimeGroupSpec):
        return _check_tq_spec(spec, path)
    if cls is ShiftSpec:
        if spec.statistic not in ("mean", "midrange"):
            raise RecipeError(f"{path}.statistic: expected 'mean' or 'midrange', got {spec.statistic!r}")
        if spec.sites not in ("post_gelu", "all"):
            raise RecipeError(f"{path}.sites: expected 'post_gelu' or 'all', got {spec.sites!r}")
        _number(spec.momentum, f"{path}.momentum", 0.0, 1.0)
    elif cls is MigrationSpec:
        _number(spec.top_k, f"{path}.top_k", 0.0, 1.0, open_lo=True)
    else:
        if spec.mode not in ("joint", "separate"):
            raise RecipeError(f"{path}.mode: expected 'joint' or 'separate', got {spec.mode!r}")
        _number(spec.iterations, f"{path}.iterations", 0, 10**7, integer=True)
        _number(spec.batch_size, f"{path}.batch_size", 1, 10**6, integer=True)
        _number(spec.seed, f"{path}.seed", 0, 2**63 - 1, integer=True)
        _number(spec.warmup, f"{path}.warmup", 0.0, 1.0)
        _number(spec.drop_prob, f"{path}.drop_prob", 0.0, 1.0)
        for name in ("round_loss_weight", "weight_lr", "act_lr", "factor_lr"):
            _number(getattr(spec, name), f"{path}.{name}", 0.0, 1e3)
        for name in ("b_start", "b_end"):
            _number(getattr(spec, name), f"{path}.{name}", 0.0, 1e3, open_lo=True)
    return spec


@dataclass(frozen=True)
class RotationSpec:
    """RobuQ's Hadamard rotation in front of the linears with these roles (``passes/insert_hadamard.py``).

    ``fuse``: fold a rotation into the previous linear where nothing nonlinear lies between
    (false keeps every rotation online; same function, for checking).
    """

    roles: tuple[str, ...] = ("qkv", "attn_out", "fc1", "fc2")
    fuse: bool = True


@dataclass(frozen=True)
class DistillationSpec:
    """Quantization-aware distillation against the FP model (``ditq_compiler/train/distill.py``).

    AdamW on the quantized layers' latent weights and biases (``lr``, ``weight_decay``) and on
    their weight scales and activation scales / per-token clipping ratios (``scale_lr``), cosine
    decay to 0 over ``iterations``, minibatches of ``batch_size`` calibration inputs. Loss:
    ``output_weight * MSE(out_q, out_fp) + block_weight * mean_blocks mean(r_SBM^2)`` with BiDM+'s
    salience-weighted residual (Eqs. 18-19) and ``leniency`` its percentile (10 in the paper);
    ``block_weight: 0`` drops the block term. Defaults chosen on dit-digits (the papers give no
    CPU-sized schedule; the README has the sweep): ``block_weight`` puts the block term at about a
    third of the output term at the start, where it added 0.6 dB of held-out noise SQNR.
    """

    iterations: int = 3000
    batch_size: int = 32
    lr: float = 3e-4
    scale_lr: float = 1e-3
    weight_decay: float = 0.0
    output_weight: float = 1.0
    block_weight: float = 5e-3
    leniency: float = 10.0
    seed: int = 0


@dataclass(frozen=True)
class MixedPrecisionSpec:
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


def _section(cls, data: Any, path: str):
    """A RobuQ section (rotation / distillation / mixed_precision), validated; None if absent."""
    data = _section_data(cls, data, path)
    if data is None:
        return None
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    spec = cls(**data)
    _SECTION_CHECKS[cls](spec, path)
    return spec


def _check_rotation(spec: RotationSpec, path: str) -> None:
    _check_roles(spec.roles, f"{path}.roles")
    if not spec.roles:
        raise RecipeError(f"{path}.roles: rotate at least one role (or drop the section)")
    if not isinstance(spec.fuse, bool):
        raise RecipeError(f"{path}.fuse: expected true or false, got {spec.fuse!r}")


def _check_distillation(spec: DistillationSpec, path: str) -> None:
    _number(spec.iterations, f"{path}.iterations", 0, 10**7, integer=True)
    _number(spec.batch_size, f"{path}.batch_size", 1, 10**6, integer=True)
    _number(spec.seed, f"{path}.seed", 0, 2**63 - 1, integer=True)
    _number(spec.leniency, f"{path}.leniency", 0.0, 100.0)
    for name in ("lr", "scale_lr", "weight_decay", "output_weight", "block_weight"):
        _number(getattr(spec, name), f"{path}.{name}", 0.0, 1e6)
    if spec.output_weight == 0 and spec.block_weight == 0:
        raise RecipeError(f"{path}.output_weight: output_weight and block_weight are both 0: nothing to learn from")


def _check_mixed_precision(spec: MixedPrecisionSpec, path: str) -> None:
    candidates = spec.candidates
    if not isinstance(candidates, tuple) or not candidates:
        raise RecipeError(f"{path}.candidates: expected a non-empty list of bit widths, got {candidates!r}")
    for i, bits in enumerate(candidates):
        _number(bits, f"{path}.candidates[{i}]", 2, 8, integer=True)
    if len(set(candidates)) != len(candidates):
        raise RecipeError(f"{path}.candidates: repeated bit widths in {list(candidates)}")
    _number(spec.budget, f"{path}.budget", min(candidates), max(candidates))
    if spec.sensitivity not in ("distilled", "ptq"):
        raise RecipeError(f"{path}.sensitivity: expected 'distilled' or 'ptq', got {spec.sensitivity!r}")
    if spec.weighting not in ("macs", "layers"):
        raise RecipeError(f"{path}.weighting: expected 'macs' or 'layers', got {spec.weighting!r}")
    _number(spec.search_iterations, f"{path}.search_iterations", 0, 10**7, integer=True)


_SECTION_CHECKS = {RotationSpec: _check_rotation, DistillationSpec: _check_distillation,
                   MixedPrecisionSpec: _check_mixed_precision}
ROBUQ_SECTIONS = {"rotation": RotationSpec, "distillation": DistillationSpec, "mixed_precision": MixedPrecisionSpec}


@dataclass(frozen=True)
class LayerPlan:
    """What the recipe decided for one layer."""

    weights: QuantSpec
    activations: QuantSpec | None


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    description: str = ""
    weights: QuantSpec = field(default_factory=lambda: QuantSpec(8, True, "channel"))
    activations: QuantSpec | None = field(default_factory=lambda: QuantSpec(8, False, "tensor", axis=-1))
    quantize_roles: tuple[str, ...] = DEFAULT_QUANTIZED_ROLES
    overrides: tuple[Override, ...] = ()
    shift: ShiftSpec | None = None
    migration: MigrationSpec | None = None
    reconstruction: ReconstructionSpec | None = None
    attention: AttentionSpec | None = None
    scale_search: ScaleSearchSpec | None = None
    multi_region: MultiRegionSpec | None = None
    time_groups: TimeGroupSpec | None = None
    rotation: RotationSpec | None = None
    distillation: DistillationSpec | None = None
    mixed_precision: MixedPrecisionSpec | None = None
    version: int = RECIPE_VERSION

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "recipe") -> Recipe:
        _check_keys(data, {f.name for f in dataclasses.fields(cls)}, path)
        version = data.get("version", RECIPE_VERSION)
        if not isinstance(version, int) or version > RECIPE_VERSION or version < 1:
            raise RecipeError(f"{path}.version: this ditq-compiler reads recipe versions 1..{RECIPE_VERSION}, "
                              f"got {version!r}")
        weights = _spec(data.get("weights", {}), f"{path}.weights", QuantSpec(8, True, "channel"))
        _check_weight_spec(weights, f"{path}.weights")
        acts_data = data.get("activations", {})
        acts = None
        if acts_data is not None and acts_data is not False:
            acts = _activation_spec(acts_data, f"{path}.activations", QuantSpec(8, False, "tensor", axis=-1))
        roles = _check_roles(data.get("quantize_roles", DEFAULT_QUANTIZED_ROLES), f"{path}.quantize_roles")
        raw_overrides = data.get("overrides") or []
        if not isinstance(raw_overrides, list):
            raise RecipeError(f"{path}.overrides: expected a list, got {type(raw_overrides).__name__}")
        overrides = tuple(_override(o, f"{path}.overrides[{i}]", weights, acts)
                          for i, o in enumerate(raw_overrides))
        for key in ("name", "description"):
            if key in data and not isinstance(data[key], str):
                raise RecipeError(f"{path}.{key}: expected a string, got {data[key]!r}")
        shift = _method_spec(ShiftSpec, data.get("shift"), f"{path}.shift")
        migration = _method_spec(MigrationSpec, data.get("migration"), f"{path}.migration")
        reconstruction = _method_spec(ReconstructionSpec, data.get("reconstruction"), f"{path}.reconstruction")
        if migration is not None and shift is None:
            raise RecipeError(f"{path}.migration: outlier migration runs on shifted activations; add a 'shift' "
                              "section")
        if (shift is not None or reconstruction is not None) and acts is None:
            section = "shift" if shift is not None else "reconstruction"
            raise RecipeError(f"{path}.{section}: needs quantized activations (activations is false)")
        tq = {name: _method_spec(spec_class, data.get(name), f"{path}.{name}")
              for name, spec_class in TQ_SECTIONS.items()}
        _check_tq_sections(path, weights, acts, {**tq, "reconstruction": reconstruction})
        _check_search_overrides(path, overrides, tq["scale_search"])
        robuq = {key: _section(spec_class, data.get(key), f"{path}.{key}")
                 for key, spec_class in ROBUQ_SECTIONS.items()}
        _check_robuq_combinations(robuq, shift, reconstruction, acts, path)
        if tq["scale_search"] is not None and any(v is not None for v in robuq.values()):
            used = next(k for k, v in robuq.items() if v is not None)
            raise RecipeError(f"{path}.{used}: RobuQ's sections and TQ-DiT's scale_search are not combined "
                              "(the search fits scales on the unrotated graph, distillation refits them); use one "
                              "method per recipe")
        return cls(name=data.get("name", "custom"), description=data.get("description", ""),
                   weights=weights, activations=acts, quantize_roles=roles, overrides=overrides,
                   shift=shift, migration=migration, reconstruction=reconstruction, version=version, **tq, **robuq)

    @classmethod
    def load(cls, name_or_path: str | Path) -> Recipe:
        """A preset name (see ``Recipe.presets()``) or a path to a .yaml/.yml/.json file."""
        text = str(name_or_path)
        path = Path(text)
        if path.suffix in (".yaml", ".yml", ".json") or path.exists():
            if not path.is_file():
                raise FileNotFoundError(f"recipe file {path} does not exist")
            return cls.from_dict(_parse(path.read_text(), path.suffix), path=f"recipe({path.name})")
        presets = cls.presets()
        if text not in presets:
            raise RecipeError(f"unknown recipe {text!r}: not a file and not a preset "
                              f"(presets: {', '.join(presets)})")
        data = _parse(_preset_dir().joinpath(f"{text}.yaml").read_text(), ".yaml")
        return cls.from_dict(data, path=f"recipe({text})")

    @staticmethod
    def presets() -> dict[str, str]:
        """Preset name -> one-line description."""
        out = {}
        for entry in sorted(_preset_dir().iterdir(), key=lambda p: p.name):
            if entry.name.endswith(".yaml"):
                out[entry.name[:-5]] = (yaml.safe_load(entry.read_text()) or {}).get("description", "")
        return out

    # ---- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "description": self.description,
            "weights": self.weights.to_dict(),
            "activations": self.activations.to_dict() if self.activations else False,
            "quantize_roles": list(self.quantize_roles),
            "overrides": [o.to_dict() for o in self.overrides],
            **{key: _plain(dataclasses.asdict(getattr(self, key)))
               for key in ("shift", "migration", "reconstruction", *TQ_SECTIONS, *ROBUQ_SECTIONS)
               if getattr(self, key) is not None},
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = self.to_dict()
        text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
        return write_text(path, text)

    # ---- decisions ---------------------------------------------------------------------
    def plan(self, layer: LayerInfo) -> LayerPlan | None:
        """The quantization of ``layer``, or None if it stays in full precision."""
        quantize = layer.role in self.quantize_roles
        weights, acts = self.weights, self.activations
        for override in self.overrides:
            if not override.matches(layer):
                continue
            if override.quantize is not None:
                quantize = override.quantize
            if override.weights is not None:
                weights = dataclasses.replace(weights, **dict(override.weights))
            if override.activations is False:
                acts = None
            elif override.activations is not None:
                base = acts.to_dict() if acts else {}
                acts = QuantSpec(**{**base, **dict(override.activations)})
        return LayerPlan(weights, acts) if quantize else None


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """Tuples as lists, so YAML's safe dumper writes them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def _check_robuq_combinations(robuq: dict[str, Any], shift: ShiftSpec | None,
                              reconstruction: ReconstructionSpec | None, acts: QuantSpec | None, path: str) -> None:
    if robuq["rotation"] is not None and shift is not None:
        raise RecipeError(f"{path}.rotation: the Hadamard rotation and TaQ-DiT's shift both rewrite the input of "
                          "the same linears; use one of them")
    if robuq["distillation"] is not None and reconstruction is not None:
        raise RecipeError(f"{path}.distillation: distillation and block reconstruction both fit the quantized "
                          "model; use one of them")
    mixed = robuq["mixed_precision"]
    if mixed is not None:
        if acts is None or acts.granularity != "token":
            raise RecipeError(f"{path}.mixed_precision: chooses per-token activation bits (dynamic ranges, so "
                              "any width runs without recalibration); set activations.granularity: token")
        if mixed.sensitivity == "distilled" and robuq["distillation"] is None:
            raise RecipeError(f"{path}.mixed_precision.sensitivity: 'distilled' measures sensitivity after "
                              "distillation; add a 'distillation' section (or use sensitivity: ptq)")


def _parse(text: str, suffix: str) -> dict:
    data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: the file must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _preset_dir():
    return resources.files("ditq_compiler.presets")
