"""Everything ditq records on a graph node, under one key: ``node.meta["ditq"]``.

This module owns that key. Analyses and passes read a node's record with ``get(node)`` (a
``NodeMeta`` with every field at its default when nothing was recorded) and write it with
``update(node, field=value, ...)``; nothing else touches ``node.meta["ditq"]``. ``NodeMeta`` is
frozen and ``update`` stores a new one, so graph copies (which share meta values) never see a
later write to the original.

Who writes what:

    field               written by                          on
    role                graph.analyse                       every linear / conv
    site                graph.analyse                       post_gelu / post_softmax activation nodes
    timestep_dependent  graph.analyse                       every descendant of the timestep input
    annotation          annotate (and mixed precision)      every layer the recipe quantizes
    matmul              passes.decompose_attention          the two attention matmuls
    matmul_layer        activation_sites.plan_sites         attention matmuls with quantized operands
    shift               passes.fold_shift_into_bias,        the shift / affine node in front of a linear
                        passes.migrate_outliers
    transform           a pass that inserts an exact        inserted nodes (the HTML view shows them as
                        transformation                      transformations, ``inspection.activations``)
    rotation            passes.insert_hadamard              an online rotation node
    activation_site     passes.quantize_activations         a standalone activation quantizer node
    time_grouped        passes.quantize_activations         a quantizer whose parameters follow the timestep
    input_site          passes.quantize_activations         a layer whose input has a quantizer op
    time_group_index    passes.attach_time_groups           the node computing the time-group index
    source_node         passes.quantize_linears             a quantized layer: its node in the captured graph
    trainable_of        train.trainable                     a layer swapped for a trainable module
    timestep_state      passes.connect_timesteps            an input carrying state across sampler steps: the index
                                                            of the state, -1 for the flag of rows that have one
    applied             ``record_applied`` (every pass)     a layer: the passes that changed it

Artifacts store each node's record as JSON (``to_json`` / ``from_json``): plain values and the three
value types below, rebuilt field by field from a fixed schema (nothing is imported by name). Format-1
artifacts kept the same facts under separate ``ditq_*`` keys; ``from_legacy_json`` reads those.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from torch import fx

from ditq_compiler.quant.spec import QuantSpec

KEY = "ditq"


class MetaFormatError(ValueError):
    """A stored node record does not match the schema; the message names the field."""


# ---- the values a record holds ----------------------------------------------------------------------

@dataclass(frozen=True)
class LayerAnnotation:
    """The recipe's decision for one layer (``annotate``)."""

    name: str
    role: str
    op: str
    weights: QuantSpec
    activations: QuantSpec | None


@dataclass(frozen=True)
class ActivationSite:
    """One quantized input of one op (``activation_sites``)."""

    consumer: str        # node whose input is quantized (aten.linear / conv2d / matmul)
    arg: int             # which argument of it
    layer: str           # the consumer's layer name
    operand: str         # 'input' for linears; 'q', 'k^T', 'P', 'v' for attention matmuls
    kind: str            # post_softmax | post_gelu | linear_input | attention_operand
    quantizer: str       # uniform | softmax_mrq | gelu_mrq
    spec: QuantSpec
    time_grouped: bool

    @property
    def key(self) -> str:
        return f"{self.consumer}:{self.arg}"

    @property
    def standalone(self) -> bool:
        """Whether the site needs its own quantizer op (else ``quant_linear`` quantizes its input)."""
        return self.kind in ("post_softmax", "attention_operand") or self.quantizer != "uniform" or self.time_grouped

    @property
    def parameters(self) -> tuple[str, ...]:
        return {"uniform": ("scale", "zero_point"), "softmax_mrq": ("s1",), "gelu_mrq": ("s_neg", "s_pos")}[
            self.quantizer]


@dataclass(frozen=True)
class MatmulLayer:
    """An attention matmul whose operands are quantized, named like a layer."""

    node: str
    name: str
    role: str            # attn_scores (q k^T) | attn_value (P v)


@dataclass(frozen=True)
class NodeMeta:
    """What ditq knows about one node; see the module docstring for who writes each field."""

    role: str | None = None
    site: str | None = None
    timestep_dependent: bool = False
    annotation: LayerAnnotation | None = None
    matmul: str | None = None
    matmul_layer: MatmulLayer | None = None
    shift: bool = False
    transform: str | None = None
    rotation: bool = False
    activation_site: ActivationSite | None = None
    time_grouped: bool = False
    input_site: str | None = None
    time_group_index: bool = False
    source_node: str | None = None
    trainable_of: str | None = None
    timestep_state: int | None = None
    applied: tuple[Mapping[str, Any], ...] = ()

    # ---- JSON --------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The fields that differ from their defaults, as JSON values."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if isinstance(value, (LayerAnnotation, ActivationSite, MatmulLayer)):
                value = _value_to_json(value)
            elif f.name == "applied":
                value = [dict(entry) for entry in value]
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "node") -> NodeMeta:
        """Inverse of ``to_json``; every field is type-checked (``MetaFormatError`` names it)."""
        if not isinstance(data, dict):
            raise MetaFormatError(f"{where}: meta must be a mapping, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise MetaFormatError(f"{where}: unknown meta field {unknown[0]!r}")
        values = {}
        for name, value in data.items():
            kind = _FIELD_KINDS[name]
            path = f"{where}.{name}"
            if kind in _VALUE_TYPES:
                values[name] = _value_from_json(_VALUE_TYPES[kind], value, path)
            elif kind == "applied":
                if not isinstance(value, list) or not all(isinstance(e, dict) and _plain(e) for e in value):
                    raise MetaFormatError(f"{path}: expected a list of mappings of plain values")
                values[name] = tuple(value)
            else:
                values[name] = _checked(value, kind, path)
        return cls(**values)


_FIELD_KINDS = {"role": "str?", "site": "str?", "timestep_dependent": "bool", "annotation": "LayerAnnotation",
                "matmul": "str?", "matmul_layer": "MatmulLayer", "shift": "bool", "transform": "str?",
                "rotation": "bool", "activation_site": "ActivationSite", "time_grouped": "bool",
                "input_site": "str?", "time_group_index": "bool", "source_node": "str?", "trainable_of": "str?",
                "timestep_state": "int?",
                "applied": "applied"}
_VALUE_TYPES = {"LayerAnnotation": LayerAnnotation, "ActivationSite": ActivationSite, "MatmulLayer": MatmulLayer}
_VALUE_FIELD_KINDS = {
    LayerAnnotation: {"name": "str", "role": "str", "op": "str", "weights": "QuantSpec", "activations": "QuantSpec?"},
    ActivationSite: {"consumer": "str", "arg": "int", "layer": "str", "operand": "str", "kind": "str",
                     "quantizer": "str", "spec": "QuantSpec", "time_grouped": "bool"},
    MatmulLayer: {"node": "str", "name": "str", "role": "str"},
}


def _checked(value: Any, kind: str, path: str) -> Any:
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None and optional:
        return None
    if kind == "QuantSpec":
        if not isinstance(value, dict):
            raise MetaFormatError(f"{path}: expected a QuantSpec mapping, got {type(value).__name__}")
        try:
            return QuantSpec.from_dict(value)
        except (TypeError, ValueError) as e:
            raise MetaFormatError(f"{path}: {e}") from None
    types = {"str": str, "int": int, "bool": bool}[kind]
    if not isinstance(value, types) or (kind == "int" and isinstance(value, bool)):
        raise MetaFormatError(f"{path}: expected {kind}{' or null' if optional else ''}, got {value!r}")
    return value


def _value_to_json(value: Any) -> dict[str, Any]:
    return {f.name: (getattr(value, f.name).to_dict() if isinstance(getattr(value, f.name), QuantSpec)
                     else getattr(value, f.name)) for f in dataclasses.fields(value)}


def _value_from_json(cls: type, data: Any, path: str) -> Any:
    kinds = _VALUE_FIELD_KINDS[cls]
    if not isinstance(data, dict) or set(data) != set(kinds):
        raise MetaFormatError(f"{path}: expected a {cls.__name__} with fields {sorted(kinds)}, got {data!r:.200}")
    return cls(**{name: _checked(data[name], kind, f"{path}.{name}") for name, kind in kinds.items()})


def _plain(value: Any) -> bool:
    """JSON-able scalars, lists and string-keyed mappings of them."""
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


# ---- access ----------------------------------------------------------------------------------------

_EMPTY = NodeMeta()


def get(node: fx.Node) -> NodeMeta:
    """The node's record (all defaults if nothing was recorded)."""
    return node.meta.get(KEY, _EMPTY)


def has(node: fx.Node) -> bool:
    return KEY in node.meta


def update(node: fx.Node, **fields: Any) -> NodeMeta:
    """Store a new record with ``fields`` changed; returns it."""
    record = dataclasses.replace(get(node), **fields)
    node.meta[KEY] = record
    return record


def annotation(node: fx.Node) -> LayerAnnotation | None:
    return get(node).annotation


def record_applied(node: fx.Node, pass_name: str, **details: Any) -> None:
    """Note on layer ``node`` that ``pass_name`` changed it, with JSON-able details (``ditq inspect`` lists them)."""
    update(node, applied=(*get(node).applied, {"pass": pass_name, **details}))


def copy_location(new: fx.Node, like: fx.Node) -> None:
    """Give an inserted node the module location of the layer it serves (for names and block grouping)."""
    for key in ("nn_module_stack", "stack_trace"):
        if key in like.meta:
            new.meta[key] = like.meta[key]
    if get(like).timestep_dependent:
        update(new, timestep_dependent=True)


def carry(new: fx.Node, old: fx.Node, **fields: Any) -> None:
    """``new`` replaces ``old``: it takes over all of old's meta (torch's and ours), with ``fields`` changed."""
    new.meta.update(old.meta)
    if fields:
        update(new, **fields)


# ---- format-1 artifacts ----------------------------------------------------------------------------

_LEGACY_KEYS = {"ditq": "annotation", "ditq_role": "role", "ditq_site": "site",
                "ditq_timestep_dependent": "timestep_dependent", "ditq_matmul": "matmul",
                "ditq_matmul_layer": "matmul_layer", "ditq_shift": "shift", "ditq_transform": "transform",
                "ditq_rotation": "rotation", "ditq_activation_site": "activation_site",
                "ditq_time_grouped": "time_grouped", "ditq_input_site": "input_site",
                "ditq_time_group_index": "time_group_index", "ditq_source_node": "source_node",
                "ditq_qat_of": "trainable_of", "ditq_applied": "applied"}


def from_legacy_json(data: Mapping[str, Any], where: str = "node") -> NodeMeta:
    """A format-1 node's ``ditq*`` keys, whose values were encoded as ``{"dataclass": NAME, "fields": ...}``,
    ``{"tuple": [...]}`` and ``{"dict": [[key, value], ...]}``; the class names are not used (the schema
    of each field says what it holds)."""
    converted = {}
    for key, value in data.items():
        if key not in _LEGACY_KEYS:
            raise MetaFormatError(f"{where}: unknown format-1 meta key {key!r}")
        converted[_LEGACY_KEYS[key]] = _legacy_value(value, f"{where}.{key}")
    return NodeMeta.from_json(converted, where)


def _legacy_value(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [_legacy_value(v, where) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"dataclass", "fields"} and isinstance(value["fields"], dict):
        return {k: _legacy_value(v, where) for k, v in value["fields"].items()}
    if set(value) == {"tuple"} and isinstance(value["tuple"], list):
        return [_legacy_value(v, where) for v in value["tuple"]]
    if set(value) == {"dict"} and isinstance(value["dict"], list) and all(
            isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], str) for kv in value["dict"]):
        return {k: _legacy_value(v, where) for k, v in value["dict"]}
    raise MetaFormatError(f"{where}: malformed format-1 meta value {value!r:.200}")


__all__ = ["KEY", "ActivationSite", "LayerAnnotation", "MatmulLayer", "MetaFormatError", "NodeMeta", "annotation",
           "carry", "copy_location", "from_legacy_json", "get", "has", "record_applied", "update"]
