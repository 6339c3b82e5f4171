"""The rewritten FX graph as JSON: op names, node references and plain values; tensors stay outside.

Why not ``torch.export.save``: in torch 2.13 its loader calls ``torch.load(weights_only=False)`` and
``pickle.loads`` on constants it cannot store otherwise, so opening an artifact could run code. This
format unpickles nothing. A node is

    {"name": "ditq_linear_3", "op": "call_function", "target": "ditq::quant_linear.default",
     "args": [{"node": "add_3"}, {"node": "ditq_linear_3_w_codes"}, ..., 8, false], "kwargs": {}, "meta": {...}}

* ``call_function`` targets are ``torch.library`` / aten op overloads named ``namespace::op.overload``
  and resolved through ``torch.ops`` at load time, so an op added by any pass (``ditq::`` or
  otherwise) round-trips with no change here, as long as its module is imported before loading;
  a few Python operators (``operator.getitem``, ``torch.sym_*``) come from a fixed table.
* ``get_attr`` targets name tensors stored in safetensors (parameters, buffers, constants); the
  graph keeps only their names and kinds.
* Arguments are nodes, ``None``, bools, ints, floats (``inf``/``nan`` spelled out), strings,
  lists, tuples, dicts with string keys, ``torch.dtype`` / ``device`` / ``layout`` /
  ``memory_format``. Anything else is an error naming the node.
* ``meta`` keeps ``nn_module_stack`` and the node's ``ditq_compiler.meta`` record, stored and rebuilt
  field by field against that module's schema (no class is looked up by a name from the file).
  Graph format 1 spread the record over ``ditq_*`` keys; it is read through ``meta.from_legacy_json``. ``val`` (fake
  tensors) is not kept: ``dq.load`` propagates it again from the artifact's example call
  (``artifact.store._restore_shapes``), with a symbolic batch on the inputs.
* The pytree specs of the call signature and of the output (e.g. diffusers'
  ``Transformer2DModelOutput``) are stored by their registered serialized type names.

The ``_guards_fn`` module torch.export inserts to check input shapes is dropped (it is generated
Python; the ops check shapes anyway). Any other ``call_module`` node is an error.
"""

from __future__ import annotations

import importlib
import math
import operator
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import fx

from ditq_compiler import meta
from ditq_compiler.pipeline import fetch_attr

GRAPH_FORMAT_VERSION = 2     # 2: node meta as one typed record (``ditq_compiler.meta``)
GUARDS_MODULE = "_guards_fn"
# packages whose registered pytree types (model outputs) may be imported by name when loading
SPEC_TYPE_PACKAGES = ("diffusers.", "transformers.", "ditq_compiler.")


class GraphFormatError(ValueError):
    """A graph cannot be written to, or read from, the JSON format; the message names the node."""


def _python_functions() -> dict[str, Callable]:
    table = {f"operator.{name}": getattr(operator, name) for name in (
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne",
        "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift")}
    table.update({f"math.{name}": getattr(math, name) for name in ("ceil", "floor", "sqrt", "trunc")})
    table.update({f"torch.{name}": getattr(torch, name) for name in dir(torch) if name.startswith("sym_")})
    table["torch._assert"] = torch._assert
    return table


PYTHON_FUNCTIONS = _python_functions()
_PYTHON_NAMES = {id(fn): name for name, fn in PYTHON_FUNCTIONS.items()}


# ---- targets -------------------------------------------------------------------------------------
def target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}::{target._schema.name.split('::', 1)[1]}.{target._overloadname}"
    if id(target) in _PYTHON_NAMES:
        return _PYTHON_NAMES[id(target)]
    raise GraphFormatError(f"node '{node.name}' calls {target!r}, which is neither a torch op overload nor one of "
                           f"the Python operators the artifact format knows")


def resolve_target(name: str, node_name: str) -> Callable:
    if name in PYTHON_FUNCTIONS:
        return PYTHON_FUNCTIONS[name]
    namespace, sep, rest = name.partition("::")
    op_name, dot, overload = rest.rpartition(".")
    if not (sep and dot):
        raise GraphFormatError(f"node '{node_name}': unknown target {name!r}")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), op_name), overload)
    except (AttributeError, RuntimeError):
        hint = " (import the module that registers it before loading)" if namespace != "aten" else ""
        raise GraphFormatError(f"node '{node_name}' calls {name}, which is not registered in this "
                               f"torch/ditq-compiler{hint}") from None


# ---- values --------------------------------------------------------------------------------------
_ENUMS = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}


def encode_value(value: Any, where: str) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [encode_value(v, where) for v in value]}
    if isinstance(value, list):
        return [encode_value(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": [[k, encode_value(v, where)] for k, v in value.items()]}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    for kind, cls in _ENUMS.items():
        if isinstance(value, cls):
            return {kind: str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [encode_value(v, where) for v in (value.start, value.stop, value.step)]}
    raise GraphFormatError(f"{where}: cannot store a {type(value).__name__} argument ({value!r}); the artifact "
                           "format holds nodes, numbers, bools, strings, lists, None, dtypes and devices")


def decode_value(data: Any, nodes: dict[str, fx.Node], where: str) -> Any:
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode_value(v, nodes, where) for v in data]
    if not isinstance(data, dict) or len(data) != 1:
        raise GraphFormatError(f"{where}: malformed value {data!r}")
    (kind, payload), = data.items()
    if kind == "node":
        if payload not in nodes:
            raise GraphFormatError(f"{where}: refers to node '{payload}', which is not defined before it")
        return nodes[payload]
    if kind == "tuple":
        return tuple(decode_value(v, nodes, where) for v in payload)
    if kind == "dict":
        return {k: decode_value(v, nodes, where) for k, v in payload}
    if kind == "float":
        return float(payload)
    if kind == "device":
        return torch.device(payload)
    if kind == "slice":
        return slice(*(decode_value(v, nodes, where) for v in payload))
    if kind in _ENUMS:
        value = getattr(torch, payload, None)
        if not isinstance(value, _ENUMS[kind]):
            raise GraphFormatError(f"{where}: unknown torch.{kind} {payload!r}")
        return value
    raise GraphFormatError(f"{where}: unknown value kind {kind!r}")


# ---- node meta -----------------------------------------------------------------------------------
def encode_meta(node: fx.Node) -> dict[str, Any]:
    out: dict[str, Any] = {}
    stack = node.meta.get("nn_module_stack")
    if stack:
        out["nn_module_stack"] = [[key, str(path), str(kind)] for key, (path, kind) in stack.items()]
    if meta.has(node):
        out[meta.KEY] = meta.get(node).to_json()
    return out


def decode_meta(data: Any, version: int, where: str) -> dict[str, Any]:
    """torch's ``nn_module_stack`` and our record; format 1 spread the record over ``ditq_*`` keys."""
    if not isinstance(data, dict):
        raise GraphFormatError(f"{where}: meta must be a mapping")
    decoded: dict[str, Any] = {}
    stack = data.get("nn_module_stack")
    if stack is not None:
        entries_ok = isinstance(stack, list) and all(
            isinstance(e, list) and len(e) == 3 and all(isinstance(v, str) for v in e) for e in stack)
        if not entries_ok:
            raise GraphFormatError(f"{where}: malformed nn_module_stack")
        decoded["nn_module_stack"] = {key: (path, kind) for key, path, kind in stack}
    ours = {key: value for key, value in data.items() if key != "nn_module_stack"}
    try:
        if version == 1 and ours:
            decoded[meta.KEY] = meta.from_legacy_json(ours, where)
        elif ours:
            if set(ours) != {meta.KEY}:
                raise GraphFormatError(f"{where}: unknown meta key {sorted(set(ours) - {meta.KEY})[0]!r}")
            decoded[meta.KEY] = meta.NodeMeta.from_json(ours[meta.KEY], where)
    except meta.MetaFormatError as e:
        raise GraphFormatError(str(e)) from None
    return decoded


# ---- pytree specs --------------------------------------------------------------------------------
def encode_spec(spec: pytree.TreeSpec | None) -> Any:
    if spec is None or spec.is_leaf():
        return None
    definition = pytree.SUPPORTED_SERIALIZED_TYPES.get(spec.type)
    if definition is None or definition.serialized_type_name == pytree.NO_SERIALIZED_TYPE_NAME_FOUND:
        raise GraphFormatError(f"the model's inputs or outputs contain a {spec.type.__name__}, which has no "
                               "registered pytree serialization name")
    context = (definition.to_dumpable_context(spec.context) if definition.to_dumpable_context
               else encode_value(spec.context, f"pytree context of {spec.type.__name__}"))
    return {"type": definition.serialized_type_name, "context": context,
            "children": [encode_spec(child) for child in spec.children()]}


def _spec_type(name: str) -> type:
    if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE and name.startswith(SPEC_TYPE_PACKAGES):
        try:
            importlib.import_module(name.rsplit(".", 1)[0])   # registering happens when the class is defined
        except ImportError:
            pass
    if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
        raise GraphFormatError(f"the artifact's inputs or outputs use pytree type {name!r}, which is not registered "
                               "(import the library that defines it before loading)")
    return pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE[name]


def decode_spec(data: Any) -> pytree.TreeSpec:
    if data is None:
        return pytree.treespec_leaf()
    typ = _spec_type(data["type"])
    definition = pytree.SUPPORTED_SERIALIZED_TYPES[typ]
    context = (definition.from_dumpable_context(data["context"]) if definition.from_dumpable_context
               else decode_value(data["context"], {}, f"pytree context of {data['type']}"))
    return pytree.TreeSpec(typ, context, [decode_spec(child) for child in data["children"]])


# ---- graphs --------------------------------------------------------------------------------------
def constant_kind(gm: fx.GraphModule, target: str) -> str:
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if attr in owner._parameters:
        return "parameter"
    if attr in owner._buffers:
        return "buffer"
    return "constant"


def graph_to_json(gm: fx.GraphModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able description, tensors by get_attr target) of ``gm``."""
    nodes, tensors, kinds = [], {}, {}
    for node in gm.graph.nodes:
        where = f"node '{node.name}'"
        if node.op == "call_module":
            if node.target == GUARDS_MODULE and not node.users:
                continue
            module = gm.get_submodule(node.target)
            raise GraphFormatError(f"{where} calls module '{node.target}' ({type(module).__name__}); the artifact "
                                   "format stores graphs of torch ops only")
        if node.op == "call_method":
            raise GraphFormatError(f"{where} calls method '{node.target}'; the artifact format stores torch ops only")
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "call_function":
            entry["target"] = target_name(node)
        elif node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if not isinstance(value, torch.Tensor):
                raise GraphFormatError(f"{where} reads attribute '{node.target}', a {type(value).__name__}; only "
                                       "tensor attributes are stored")
            entry["target"] = node.target
            tensors[node.target] = value.detach()
            kinds[node.target] = {"kind": constant_kind(gm, node.target),
                                  "requires_grad": bool(value.requires_grad)}
        else:
            entry["target"] = node.target
        entry["args"] = encode_value(tuple(node.args), where)
        entry["kwargs"] = encode_value(dict(node.kwargs), where)
        entry["meta"] = encode_meta(node)
        nodes.append(entry)
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    description = {
        "format_version": GRAPH_FORMAT_VERSION,
        "nodes": nodes,
        "constants": kinds,
        "pytree": None if info is None else {"orig_args": list(info.orig_args), "in_spec": encode_spec(info.in_spec),
                                             "out_spec": encode_spec(info.out_spec)},
    }
    return description, tensors


def _set_attr(root: torch.nn.Module, target: str, value: torch.Tensor, kind: str, requires_grad: bool) -> None:
    *path, attr = target.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if kind == "parameter":
        owner.register_parameter(attr, torch.nn.Parameter(value, requires_grad=requires_grad))
    elif kind == "buffer":
        owner.register_buffer(attr, value)
    else:
        setattr(owner, attr, value)


def graph_from_json(description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild the GraphModule ``graph_to_json`` described, with ``tensors`` as its attributes."""
    version = description.get("format_version")
    if not isinstance(version, int) or version > GRAPH_FORMAT_VERSION:
        raise GraphFormatError(f"graph format version {version!r} is newer than this ditq-compiler reads "
                               f"({GRAPH_FORMAT_VERSION}); upgrade ditq-compiler")
    root = torch.nn.Module()
    for target, info in description["constants"].items():
        if target not in tensors:
            raise GraphFormatError(f"the graph reads tensor '{target}', which the tensor file does not hold")
        _set_attr(root, target, tensors[target], info["kind"], info.get("requires_grad", False))
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for entry in description["nodes"]:
        name, op = entry["name"], entry["op"]
        where = f"node '{name}'"
        target = resolve_target(entry["target"], name) if op == "call_function" else entry["target"]
        args = decode_value(entry["args"], nodes, where)
        kwargs = decode_value(entry["kwargs"], nodes, where)
        node = graph.create_node(op, target, tuple(args), dict(kwargs), name=name)
        if node.name != name:
            raise GraphFormatError(f"{where}: duplicate node name in the graph description")
        node.meta.update(decode_meta(entry.get("meta", {}), version, where))
        nodes[name] = node
    tree = description.get("pytree")
    if tree is not None:
        graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(
            tree["orig_args"], decode_spec(tree["in_spec"]), decode_spec(tree["out_spec"])))
    gm = fx.GraphModule(root, graph)
    gm.graph.lint()
    return gm


__all__ = ["GRAPH_FORMAT_VERSION", "GraphFormatError", "decode_spec", "encode_spec", "graph_from_json",
           "graph_to_json"]
