"""Recipes: validated, versioned, frozen quantization configuration.

A recipe says which layers (by graph role) are quantized and how their weights and input
activations are quantized, with overrides by role and by layer name (a regular expression
matched against the whole module path). It round-trips through YAML and JSON; unknown keys
and impossible combinations are errors that name the field path, e.g.
``recipe.overrides[1].weights.bitz``. The parts live in ``recipe_sections`` (each section checks its
own fields) and the rules between them in the one table of ``recipe_rules``.

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
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from ditq_compiler.atomic import write_text
from ditq_compiler.graph import ROLES, LayerInfo
from ditq_compiler.quant import QuantSpec
from ditq_compiler.recipe_rules import RuleContext, check_rules
from ditq_compiler.recipe_sections import (SECTIONS, TIME_GROUP_SITES, AttentionSpec, DistillationSpec,  # noqa: F401
                                           MigrationSpec, MixedPrecisionSpec, MultiRegionSpec, Override,
                                           ReconstructionSpec, RecipeError, RecipeWarning, RotationSpec,
                                           ScaleSearchSpec, ShiftSpec, SmoothingSpec, TimeGroupSpec,
                                           TimestepConnectionSpec, _activation_spec, _check_keys, _check_roles,
                                           _check_weight_spec, _override, _spec)

RECIPE_VERSION = 2
DEFAULT_QUANTIZED_ROLES = ("qkv", "attn_out", "fc1", "fc2", "conv", "linear")


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
    smoothing: SmoothingSpec | None = None
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
    timestep_connections: TimestepConnectionSpec | None = None
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
        sections = {key: section.parse(data.get(key), f"{path}.{key}") for key, section in SECTIONS.items()}
        recipe = cls(name=data.get("name", "custom"), description=data.get("description", ""), weights=weights,
                     activations=acts, quantize_roles=roles, overrides=overrides, version=version, **sections)
        check_rules(RuleContext(recipe), "recipe", path)
        return recipe

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
            **{key: getattr(self, key).to_dict() for key in SECTIONS if getattr(self, key) is not None},
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


def _parse(text: str, suffix: str) -> dict:
    data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: the file must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _preset_dir():
    return resources.files("ditq_compiler.presets")


__all__ = ["DEFAULT_QUANTIZED_ROLES", "RECIPE_VERSION", "ROLES", "SECTIONS", "TIME_GROUP_SITES", "AttentionSpec",
           "DistillationSpec", "LayerPlan", "MigrationSpec", "MixedPrecisionSpec", "MultiRegionSpec", "Override",
           "Recipe", "RecipeError", "RecipeWarning", "ReconstructionSpec", "RotationSpec", "ScaleSearchSpec",
           "ShiftSpec", "SmoothingSpec", "TimeGroupSpec", "TimestepConnectionSpec"]
