"""LoRA adapters on compiled models: fused into the weights before quantization, or kept as a float branch.

A LoRA adapter changes a linear ``y = W x + b`` by a low-rank product,

    y = (W + s B A) x + b,        A: (r, in), B: (out, r), s = alpha / r (times a user scale)

Two ways to have it on a quantized model (``dq.compile(..., lora=adapter, lora_mode=...)``):

* ``"fuse"``: ``W' = W + s B A`` in a copy of the model, which is then calibrated and quantized as
  usual: ``y = Q(W') x``. The adapter costs nothing at run time; another adapter needs another compile.
* ``"branch"``: the base model is compiled as it is, and each adapted linear gets a float branch beside
  its quantized op, ``y = Q(W) x + B (A x)`` (``s`` folded into ``B``), reading the layer's float input.
  ``swap(compiled, other)`` puts another adapter's tensors in the branches: no recalibration.

Adapters are read from the two state-dict layouts in use (``load``): peft's
``<module>.lora_A[.<adapter>].weight`` / ``lora_B``, and diffusers' older ``<module>.lora.down.weight`` /
``lora.up.weight`` (or ``lora_down`` / ``lora_up``), with an optional ``<module>.alpha``; a leading
``transformer.`` / ``unet.`` / ``base_model.model.`` is dropped, so module paths are the denoiser's own.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, fx

MODES = ("fuse", "branch")
PREFIXES = ("base_model.model.", "transformer.", "unet.", "model.")
_DOWN = re.compile(r"^(?P<module>.+?)\.(lora_A(\.[^.]+)?|lora\.down|lora_down)\.weight$")
_UP = re.compile(r"^(?P<module>.+?)\.(lora_B(\.[^.]+)?|lora\.up|lora_up)\.weight$")


class LoraError(ValueError):
    """An adapter that cannot be read or does not fit the model; the message names the module."""


@dataclass(frozen=True)
class LoraLayer:
    down: Tensor        # A: (r, in)
    up: Tensor          # B: (out, r)
    scale: float        # alpha / r

    @property
    def delta(self) -> Tensor:
        """``s B A``: what the adapter adds to the weight."""
        return self.scale * (self.up.float() @ self.down.float())


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter as module path -> low-rank factors."""

    layers: dict[str, LoraLayer]
    name: str = "lora"

    def scaled(self, factor: float) -> LoraAdapter:
        return LoraAdapter({k: LoraLayer(v.down, v.up, v.scale * factor) for k, v in self.layers.items()}, self.name)

    def state_dict(self) -> dict[str, Tensor]:
        """peft's layout, with each layer's alpha (``scale * r``)."""
        out = {}
        for module, layer in self.layers.items():
            out[f"{module}.lora_A.weight"] = layer.down.contiguous()
            out[f"{module}.lora_B.weight"] = layer.up.contiguous()
            out[f"{module}.alpha"] = torch.tensor(layer.scale * layer.down.shape[0])
        return out

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(path), metadata={"format": "pt", "name": self.name})
        return Path(path)


def load(source: str | os.PathLike | Mapping[str, Tensor] | LoraAdapter, scale: float = 1.0,
         alpha: float | None = None) -> LoraAdapter:
    """An adapter from a safetensors file or a state dict (module docs); ``scale`` multiplies every layer's
    ``alpha / r``; ``alpha`` is used where the file has none (default: ``r``, i.e. ``s = 1``)."""
    if isinstance(source, LoraAdapter):
        return source.scaled(scale) if scale != 1.0 else source
    name = "lora"
    if not isinstance(source, Mapping):
        from safetensors.torch import load_file

        name = Path(source).stem
        source = load_file(str(source))
    downs, ups, alphas = {}, {}, {}
    for key, value in source.items():
        key = _strip(key)
        if (match := _DOWN.match(key)) is not None:
            downs[match["module"]] = value
        elif (match := _UP.match(key)) is not None:
            ups[match["module"]] = value
        elif key.endswith(".alpha"):
            alphas[key.removesuffix(".alpha")] = float(value)
    if not downs:
        raise LoraError("no LoRA weights found: expected keys '<module>.lora_A.weight' / '<module>.lora_B.weight' "
                        f"(peft) or '<module>.lora.down.weight' / '.lora.up.weight' (diffusers); got e.g. "
                        f"{sorted(source)[:3]}")
    layers = {}
    for module, down in downs.items():
        if module not in ups:
            raise LoraError(f"LoRA module '{module}' has a down (A) matrix but no up (B) matrix")
        up = ups[module]
        rank = down.shape[0]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != rank:
            raise LoraError(f"LoRA module '{module}': A {tuple(down.shape)} and B {tuple(up.shape)} are not "
                            "(r, in) and (out, r) matrices of one rank r (only linear layers are supported)")
        layers[module] = LoraLayer(down.float(), up.float(), scale * alphas.get(module, alpha or rank) / rank)
    return LoraAdapter(layers, name)


@dataclass(frozen=True)
class LoraPlan:
    """What ``compile(..., lora=, lora_mode=, lora_scale=)`` does with an adapter: fuse it into a copy of the model
    before the stages run, or attach it as float branches to the compiled model after them."""

    adapter: LoraAdapter | None
    mode: str

    @classmethod
    def of(cls, lora: Any, mode: str, scale: float, model: torch.nn.Module) -> LoraPlan:
        if lora is None:
            return cls(None, mode)
        if mode not in MODES:
            raise ValueError(f"lora_mode={mode!r}: expected one of {MODES}")
        adapter = load(lora, scale)
        check(model, adapter)
        return cls(adapter, mode)

    def model_to_compile(self, model: torch.nn.Module) -> torch.nn.Module:
        return fuse(model, self.adapter) if self.adapter is not None and self.mode == "fuse" else model

    def finish(self, state: Any) -> Any:
        """The ``CompiledModel`` of a finished ``CompileState``, with the adapter noted (and attached, as a branch)."""
        from ditq_compiler.compiled import CompiledModel

        if self.adapter is not None:
            state.note("lora", f"adapter '{self.adapter.name}' on {len(self.adapter.layers)} linear(s), "
                               + ("fused into the weights before quantization" if self.mode == "fuse"
                                  else "a float branch beside the quantized layers (dq.lora.swap replaces it)"))
        compiled = CompiledModel(state.record())
        if self.adapter is not None and self.mode == "branch":
            swap(compiled, self.adapter)
        return compiled


def _strip(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _linear(model: torch.nn.Module, module: str) -> torch.nn.Linear:
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        raise LoraError(f"LoRA module '{module}' is not a module of {type(model).__name__}") from None
    if not isinstance(layer, torch.nn.Linear):
        raise LoraError(f"LoRA module '{module}' is a {type(layer).__name__}; only nn.Linear layers are supported")
    return layer


def check(model: torch.nn.Module, adapter: LoraAdapter) -> None:
    """Every adapted module is a linear of ``model`` with the adapter's in/out sizes."""
    for module, layer in adapter.layers.items():
        linear = _linear(model, module)
        if layer.down.shape[1] != linear.in_features or layer.up.shape[0] != linear.out_features:
            raise LoraError(f"LoRA module '{module}': B A is {layer.up.shape[0]}x{layer.down.shape[1]}, the layer's "
                            f"weight is {linear.out_features}x{linear.in_features}")


def fuse(model: torch.nn.Module, adapter: LoraAdapter) -> torch.nn.Module:
    """A copy of ``model`` with ``W + s B A`` in every adapted linear (``model`` is not modified)."""
    check(model, adapter)
    fused = copy.deepcopy(model)
    with torch.no_grad():
        for module, layer in adapter.layers.items():
            linear = _linear(fused, module)
            linear.weight += layer.delta.to(linear.weight.dtype)
    return fused


# ---- the float branch ------------------------------------------------------------------------------------

_OWNER = "lora"     # the submodule of the graph that holds the branches' tensors
# passes that change what a layer's input node holds (x / s, H x, x - shift): a branch there would read that
INPUT_PASSES = {"smooth_through_modulation", "insert_hadamard", "fold_shift_into_bias", "migrate_outliers",
                "update_migration_factors"}


def _safe(module: str) -> str:
    return module.replace(".", "_")


def _layer_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Module path -> the node that computes that linear (quantized op, int8 kernel or float linear)."""
    from ditq_compiler import meta
    from ditq_compiler.graph import module_path

    found = {}
    for node in gm.graph.nodes:
        annotation = meta.get(node).annotation
        if annotation is not None and node.op in ("call_function", "call_module") and annotation.op == "linear":
            found.setdefault(annotation.name, node)
        elif node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            found.setdefault(module_path(node), node)
    return found


def attach(gm: fx.GraphModule, adapter: LoraAdapter) -> fx.GraphModule:
    """Put ``adapter``'s branch ``+ B (A x)`` on its linears in ``gm`` (in place): a branch there already takes the
    new tensors; a branch of an earlier adapter that this one does not have gets zeros."""
    from ditq_compiler import meta

    if not hasattr(gm, _OWNER):
        gm.add_module(_OWNER, torch.nn.Module())
    owner = gm.get_submodule(_OWNER)
    nodes = _layer_nodes(gm)
    for module in adapter.layers:
        if module not in nodes:
            raise LoraError(f"LoRA module '{module}' is not a linear of the compiled graph (linears: "
                            f"{', '.join(list(nodes)[:6])} ...)")
        passes = sorted({entry.get("pass", "?") for entry in meta.get(nodes[module]).applied} & INPUT_PASSES)
        if passes and not hasattr(owner, f"{_safe(module)}_A"):
            passes = ", ".join(passes)
            raise LoraError(f"LoRA module '{module}': its input was transformed by {passes}, so a branch on it would "
                            "read the transformed input; use lora_mode='fuse', or a recipe without those passes")
    for name, _ in list(owner.named_buffers()):
        module_key = name[:-2]
        if name.endswith("_A") and not any(_safe(m) == module_key for m in adapter.layers):
            owner.register_buffer(name, torch.zeros_like(getattr(owner, name)[:1]))
            owner.register_buffer(f"{module_key}_B", torch.zeros(getattr(owner, f"{module_key}_B").shape[0], 1))
    for module, layer in adapter.layers.items():
        key = _safe(module)
        exists = hasattr(owner, f"{key}_A")
        owner.register_buffer(f"{key}_A", layer.down.clone())
        owner.register_buffer(f"{key}_B", (layer.up * layer.scale).clone())
        if not exists:
            _insert_branch(gm, nodes[module], f"{_OWNER}.{key}")
    gm.recompile()
    return gm


def _insert_branch(gm: fx.GraphModule, node: fx.Node, prefix: str) -> None:
    """``node`` -> ``node + linear(linear(x, A), B)``, ``x`` the node's input."""
    x = node.args[0]
    graph = gm.graph
    with graph.inserting_after(node):
        down = graph.get_attr(f"{prefix}_A")
    with graph.inserting_after(down):
        up = graph.get_attr(f"{prefix}_B")
    with graph.inserting_after(up):
        low = graph.call_function(torch.ops.aten.linear.default, (x, down))
    with graph.inserting_after(low):
        branch = graph.call_function(torch.ops.aten.linear.default, (low, up))
    with graph.inserting_after(branch):
        total = graph.call_function(torch.ops.aten.add.Tensor, (node, branch))
    node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
    if "val" in node.meta:
        total.meta["val"] = node.meta["val"]


def swap(compiled: Any, adapter: Any, scale: float = 1.0) -> Any:
    """Put ``adapter`` in the float branches of ``compiled`` (a ``CompiledModel`` compiled with
    ``lora_mode='branch'``, or any compiled model: branches are added); no recalibration. Returns ``compiled``."""
    adapter = load(adapter, scale)
    for gm in {id(g): g for g in (compiled.graph_module, compiled.reference_graph_module)}.values():
        attach(gm, adapter)
    return compiled


__all__ = ["MODES", "LoraAdapter", "LoraError", "LoraLayer", "LoraPlan", "attach", "check", "fuse", "load", "swap"]
