"""The rewritten FX graph as JSON: op names, node references and plain values; tensors stay outside.

Why not ``torch.export.save``: in torch 2.13 its loader calls ``torch.load(weights_only=False)`` and
``pickle.loads`` on constants it cannot store otherwise, so opening an artifact could run code. This
format unpickles nothing. A node is

    {"name": "ditq_linear_3", "op": "call_function", "target": "ditq::quant_linear.default",
     "args": [{"node": "add_3"}, {"node": "ditq_linear_3_w_codes"}, ..., 8, false], "kwargs": {}, "meta": {...}}

* ``call_function`` targets are op overloads named ``namespace::op.overload``, resolved through
  ``torch.ops`` at load time, and only if ``allowed_ops`` lists them (the ``ditq::`` ops, the aten
  ops of the compiler's graphs, a few Python operators such as ``operator.getitem``): an op another
  module registers is saved and loaded once that module allows it (``allowed_ops.allow_op``).
* A graph is only built from checked parts: node names and placeholder targets are plain
  identifiers, attribute names are dotted plain identifiers bound only to the loaded module's own
  namespace (no ``__class__``, no name an ``nn.Module`` already has), values are the kinds below,
  looked up in fixed tables (never ``getattr`` on a name from the file), nested at most
  ``MAX_DEPTH`` deep. Generated Python (``GraphModule``'s ``forward``) spells these names, so
  nothing from the file reaches it unchecked.
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
import keyword
import math
import operator
import re
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import fx

from ditq_compiler import meta
from ditq_compiler.artifact import allowed_ops
from ditq_compiler.pipeline import fetch_attr

GRAPH_FORMAT_VERSION = 2     # 2: node meta as one typed record (``ditq_compiler.meta``)
GUARDS_MODULE = "_guards_fn"
# packages whose registered pytree types (model outputs) may be imported by name when loading
SPEC_TYPE_PACKAGES = ("diffusers.", "transformers.", "ditq_compiler.")
NODE_OPS = ("placeholder", "get_attr", "call_function", "output")
MAX_DEPTH = 32               # nesting of argument values and pytree specs


class GraphFormatError(ValueError):
    """A graph cannot be written to, or read from, the JSON format; the message names the node."""


def _python_functions() -> dict[str, Callable]:
    modules = {"operator": operator, "math": math, "torch": torch}
    table = {}
    for name in allowed_ops.PYTHON_FUNCTIONS:
        module, _, attr = name.partition(".")
        table[name] = getattr(modules[module], attr)
    return table


PYTHON_FUNCTIONS = _python_functions()
_PYTHON_NAMES = {id(fn): name for name, fn in PYTHON_FUNCTIONS.items()}


# ---- names ---------------------------------------------------------------------------------------
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ATTRIBUTE_PART = re.compile(r"[A-Za-z0-9_]+")


def _reserved_attributes() -> frozenset[str]:
    """What a GraphModule (and any nn.Module inside it) already has: an artifact may not set these."""
    sample = fx.GraphModule(torch.nn.Module(), fx.Graph())
    return frozenset(dir(fx.GraphModule)) | frozenset(vars(sample)) | frozenset(vars(torch.nn.Module()))


RESERVED_ATTRIBUTES = _reserved_attributes()


def check_identifier(name: Any, what: str) -> str:
    """A plain Python identifier (what generated code may spell): not a keyword, no leading ``__``."""
    if not (isinstance(name, str) and _IDENTIFIER.fullmatch(name) and not keyword.iskeyword(name)
            and not name.startswith("__")):
        raise GraphFormatError(f"{what} {name!r} is not a plain identifier")
    return name


def check_attribute_path(target: Any, what: str) -> str:
    """``a.b.c`` of plain names ([A-Za-z0-9_], no leading ``__``), none of them an attribute a module
    already has, so setting it touches only the loaded module's own tensors, never a class or torch."""
    if not isinstance(target, str) or not target:
        raise GraphFormatError(f"{what} {target!r} is not an attribute name")
    for part in target.split("."):
        if not _ATTRIBUTE_PART.fullmatch(part) or part.startswith("__"):
            raise GraphFormatError(f"{what} {target!r}: {part!r} is not a plain attribute name")
        if part in RESERVED_ATTRIBUTES:
            raise GraphFormatError(f"{what} {target!r}: {part!r} is an attribute every module already has")
    return target


# ---- targets -------------------------------------------------------------------------------------
_NOT_ALLOWED = ("which a ditq artifact may not call (the ops it may call are listed in "
                "ditq_compiler/artifact/allowed_ops.py; code that registers its own op allows it with allow_op)")


def target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = allowed_ops.op_name(target)
    elif id(target) in _PYTHON_NAMES:
        name = _PYTHON_NAMES[id(target)]
    else:
        raise GraphFormatError(f"node '{node.name}' calls {target!r}, which is neither a torch op overload nor one "
                               f"of the Python operators the artifact format knows")
    if not allowed_ops.is_allowed(name):
        raise GraphFormatError(f"node '{node.name}' calls {name}, {_NOT_ALLOWED}: the artifact would not load")
    return name


def resolve_target(name: Any, node_name: str) -> Callable:
    """The op an allowed target names; anything else is refused before it is looked up."""
    if not isinstance(name, str) or not allowed_ops.is_allowed(name):
        raise GraphFormatError(f"node '{node_name}' calls {name!r}, {_NOT_ALLOWED}")
    if name in PYTHON_FUNCTIONS:
        return PYTHON_FUNCTIONS[name]
    namespace, _, rest = name.partition("::")
    op_name, _, overload = rest.rpartition(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), op_name), overload)
    except (AttributeError, RuntimeError):
        raise GraphFormatError(f"node '{node_name}' calls {name}, which is not registered in this torch/ditq-compiler "
                               "(import the module that registers it before loading)") from None


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


def _enum_table(cls: type) -> dict[str, Any]:
    return {name: value for name in dir(torch) if isinstance(value := getattr(torch, name), cls)}


# every value of each enum, by name: decoding looks names up here, never with getattr on torch
ENUM_VALUES = {kind: _enum_table(cls) for kind, cls in _ENUMS.items()}
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_DEVICE = re.compile(r"(cpu|cuda|meta|mps|xpu)(:[0-9]{1,3})?")


def _malformed(where: str, data: Any) -> GraphFormatError:
    shown = repr(data)
    return GraphFormatError(f"{where}: malformed value {shown[:80]}{'...' if len(shown) > 80 else ''}")


def decode_value(data: Any, nodes: dict[str, fx.Node], where: str, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise GraphFormatError(f"{where}: values nested more than {MAX_DEPTH} deep")
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode_value(v, nodes, where, depth + 1) for v in data]
    if not isinstance(data, dict) or len(data) != 1:
        raise _malformed(where, data)
    (kind, payload), = data.items()
    if kind == "node":
        if not isinstance(payload, str) or payload not in nodes:
            raise GraphFormatError(f"{where}: refers to node {payload!r}, which is not defined before it")
        return nodes[payload]
    if kind in ("tuple", "slice") and isinstance(payload, list):
        items = [decode_value(v, nodes, where, depth + 1) for v in payload]
        if kind == "tuple":
            return tuple(items)
        if len(items) == 3:
            return slice(*items)
    if kind == "dict" and isinstance(payload, list) and all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in payload):
        return {k: decode_value(v, nodes, where, depth + 1) for k, v in payload}
    if kind == "float" and isinstance(payload, str) and payload in _FLOATS:
        return _FLOATS[payload]
    if kind == "device" and isinstance(payload, str) and _DEVICE.fullmatch(payload):
        return torch.device(payload)
    if kind in ENUM_VALUES:
        if not isinstance(payload, str) or payload not in ENUM_VALUES[kind]:
            raise GraphFormatError(f"{where}: unknown torch.{kind} {payload!r}")
        return ENUM_VALUES[kind][payload]
    raise _malformed(where, data)


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


_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _spec_type(name: Any) -> type:
    """A registered pytree type by its serialized name; a module of ``SPEC_TYPE_PACKAGES`` may be imported
    so its types register (a plain dotted name only: nothing else from the file is imported)."""
    if not isinstance(name, str) or not _TYPE_NAME.fullmatch(name):
        raise GraphFormatError(f"the artifact's inputs or outputs name pytree type {name!r}, which is not a type name")
    if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE and name.startswith(SPEC_TYPE_PACKAGES):
        try:
            importlib.import_module(name.rsplit(".", 1)[0])   # registering happens when the class is defined
        except ImportError:
            pass
    if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
        raise GraphFormatError(f"the artifact's inputs or outputs use pytree type {name!r}, which is not registered "
                               "(import the library that defines it before loading)")
    return pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE[name]


def decode_spec(data: Any, depth: int = 0) -> pytree.TreeSpec:
    if data is None:
        return pytree.treespec_leaf()
    if depth > MAX_DEPTH:
        raise GraphFormatError(f"a pytree spec is nested more than {MAX_DEPTH} deep")
    if not (isinstance(data, dict) and set(data) == {"type", "context", "children"}
            and isinstance(data["children"], list)):
        raise GraphFormatError(f"malformed pytree spec {str(data)[:80]!r}")
    typ = _spec_type(data["type"])
    definition = pytree.SUPPORTED_SERIALIZED_TYPES[typ]
    children = [decode_spec(child, depth + 1) for child in data["children"]]
    try:
        context = (definition.from_dumpable_context(data["context"]) if definition.from_dumpable_context
                   else decode_value(data["context"], {}, f"pytree context of {data['type']}"))
        return pytree.TreeSpec(typ, context, children)
    except GraphFormatError:
        raise
    except Exception as e:  # a registered type's own context decoder or TreeSpec refused it
        raise GraphFormatError(f"malformed pytree spec of type {data['type']}: {e}") from None


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
        entry: dict[str, Any] = {"name": check_identifier(node.name, "node name"), "op": node.op}
        if node.op == "call_function":
            entry["target"] = target_name(node)
        elif node.op == "get_attr":
            value = fetch_attr(gm, check_attribute_path(node.target, f"{where}: tensor name"))
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


CONSTANT_KINDS = ("parameter", "buffer", "constant")


def _set_attr(root: torch.nn.Module, target: str, value: torch.Tensor, kind: str, requires_grad: bool) -> None:
    """Put ``value`` at ``target`` under ``root``, making the submodules on the way: only ever in modules made
    here (``check_attribute_path`` has refused names a module already has)."""
    *path, attr = target.split(".")
    owner = root
    for part in path:
        if part not in owner._modules:
            if hasattr(owner, part):
                raise GraphFormatError(f"tensor '{target}': '{part}' is a tensor and a module path at once")
            owner.add_module(part, torch.nn.Module())
        owner = owner._modules[part]
    if hasattr(owner, attr):
        raise GraphFormatError(f"tensor '{target}' is stored twice or is also a module path")
    if kind == "parameter":
        owner.register_parameter(attr, torch.nn.Parameter(value, requires_grad=requires_grad))
    elif kind == "buffer":
        owner.register_buffer(attr, value)
    else:
        setattr(owner, attr, value)


def _constants(description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    constants = description.get("constants")
    if not isinstance(constants, dict):
        raise GraphFormatError("'constants' must map tensor names to their kinds")
    root = torch.nn.Module()
    for target, info in constants.items():
        check_attribute_path(target, "tensor name")
        if not (isinstance(info, dict) and info.get("kind") in CONSTANT_KINDS
                and isinstance(info.get("requires_grad", False), bool)):
            raise GraphFormatError(f"tensor '{target}': malformed entry {str(info)[:80]}")
        if target not in tensors:
            raise GraphFormatError(f"the graph reads tensor '{target}', which the tensor file does not hold")
        _set_attr(root, target, tensors[target], info["kind"], info.get("requires_grad", False))
    return root


def _node_entry(entry: Any, index: int) -> tuple[str, str, Any]:
    """(name, op, target) of a node entry, each checked; targets are checked by kind of node."""
    if not (isinstance(entry, dict) and {"name", "op", "target"} <= set(entry)
            and set(entry) <= {"name", "op", "target", "args", "kwargs", "meta"}):
        raise GraphFormatError(f"node #{index}: malformed entry {str(entry)[:80]}")
    name = check_identifier(entry["name"], f"node #{index}: name")
    op = entry["op"]
    if op not in NODE_OPS:
        raise GraphFormatError(f"node '{name}': op {op!r} is not one of {', '.join(NODE_OPS)} (a ditq artifact "
                               "calls no methods and no modules)")
    target = entry["target"]
    if op == "placeholder":
        check_identifier(target, f"node '{name}': input name")
    elif op == "get_attr":
        check_attribute_path(target, f"node '{name}': tensor name")
    elif op == "output" and target != "output":
        raise GraphFormatError(f"node '{name}': an output node's target is 'output', got {target!r}")
    return name, op, target


def _pytree_codegen(tree: Any, graph: fx.Graph) -> fx.graph._PyTreeCodeGen:
    """The call signature and output structure. Input names and keyword keys are spelled in generated code,
    so they are plain identifiers; the input spec is ``((args...), {kwargs...})`` over the graph's inputs
    (the form ``torch.export`` gives) and the output spec holds as many values as the output node returns."""
    if not (isinstance(tree, dict) and isinstance(tree.get("orig_args"), list)):
        raise GraphFormatError("malformed 'pytree' entry")
    names = [check_identifier(arg, "graph input name") for arg in tree["orig_args"]]
    in_spec, out_spec = decode_spec(tree.get("in_spec")), decode_spec(tree.get("out_spec"))
    if not (in_spec.type is tuple and in_spec.num_children == 2 and in_spec.child(0).type is tuple
            and in_spec.child(1).type is dict):
        raise GraphFormatError("the input spec must be ((args...), {kwargs...})")
    positional, keywords = in_spec.child(0).num_children, list(in_spec.child(1).context)
    for key in keywords:
        check_identifier(key, "keyword input name")
    if keywords != names[positional:] or positional + len(keywords) != len(names):
        raise GraphFormatError(f"the input spec's keywords {keywords} do not match the graph's input names {names}")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if in_spec.num_leaves != len(placeholders):
        raise GraphFormatError(f"the input spec holds {in_spec.num_leaves} tensors, the graph has "
                               f"{len(placeholders)} inputs")
    returned = graph.find_nodes(op="output")[0].args[0]
    count = len(returned) if isinstance(returned, (list, tuple)) else 1
    if out_spec.num_leaves != count:
        raise GraphFormatError(f"the output spec holds {out_spec.num_leaves} values, the graph returns {count}")
    return fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(names, in_spec, out_spec))


def graph_from_json(description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild the GraphModule ``graph_to_json`` described, with ``tensors`` as its attributes.

    Every part is checked before the GraphModule (and its generated ``forward``) is made: node ops and
    targets (``allowed_ops``), names, values, tensor names. Nothing of the graph runs here."""
    if not isinstance(description, dict):
        raise GraphFormatError("the graph description must be a mapping")
    version = description.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= GRAPH_FORMAT_VERSION:
        raise GraphFormatError(f"graph format version {version!r} is not one this ditq-compiler reads "
                               f"(1..{GRAPH_FORMAT_VERSION}); a newer one needs a newer ditq-compiler")
    root = _constants(description, tensors)
    entries = description.get("nodes")
    if not isinstance(entries, list) or not entries:
        raise GraphFormatError("'nodes' must be a non-empty list")
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for index, entry in enumerate(entries):
        name, op, target = _node_entry(entry, index)
        where = f"node '{name}'"
        if name in nodes:
            raise GraphFormatError(f"{where}: duplicate node name in the graph description")
        if (op == "output") != (index == len(entries) - 1):
            raise GraphFormatError(f"{where}: the graph has exactly one output node, the last")
        if op == "get_attr" and target not in description["constants"]:
            raise GraphFormatError(f"{where} reads tensor '{target}', which the graph's constants do not list")
        if op == "call_function":
            target = resolve_target(target, name)
        args = decode_value(entry.get("args", {"tuple": []}), nodes, where)
        kwargs = decode_value(entry.get("kwargs", {"dict": []}), nodes, where)
        if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
            raise GraphFormatError(f"{where}: args must be a tuple and kwargs a mapping")
        if op in ("placeholder", "get_attr") and (args or kwargs):
            raise GraphFormatError(f"{where}: a {op} node takes no arguments")
        if op == "output" and (len(args) != 1 or kwargs):
            raise GraphFormatError(f"{where}: the output node takes one argument, the values it returns")
        node = graph.create_node(op, target, tuple(args), dict(kwargs), name=name)
        if node.name != name:
            raise GraphFormatError(f"{where}: the name is reserved in generated code")
        node.meta.update(decode_meta(entry.get("meta", {}), version, where))
        nodes[name] = node
    tree = description.get("pytree")
    if tree is not None:
        graph._codegen = _pytree_codegen(tree, graph)
    gm = fx.GraphModule(root, graph)
    gm.graph.lint()
    return gm


__all__ = ["GRAPH_FORMAT_VERSION", "RESERVED_ATTRIBUTES", "GraphFormatError", "check_attribute_path",
           "check_identifier", "decode_spec", "encode_spec", "graph_from_json", "graph_to_json"]
