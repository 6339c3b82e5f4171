"""Capture a denoiser as an FX graph with ``torch.export``.

The user's model is deep-copied and the copy put in eval mode, so ``compile`` never
touches the module it was given. Every call is normalised to keyword arguments bound
to ``forward``'s signature, so the graph has one placeholder per named input and the
timestep stays a graph input (time-aware quantizers read it at run time). A Python
number passed as the timestep is turned into a tensor of the batch size first;
otherwise ``torch.export`` would bake it into the graph as a constant.

The batch: dim 0 of the sample, and of every tensor input whose dim 0 has the sample's
size at capture, is exported as ``Dim.AUTO`` (dynamic where the model allows it), so
calibration and inference may use other batch sizes. Inputs whose dim 0 is something
else (Flux's ``img_ids`` / ``txt_ids``, one row per token, shared by the batch) keep it
static. At call time every batched input must have the sample's batch.

Drop-in calls. The captured signature is ``forward``'s, with every tensor input the graph
takes required and every other argument defaulting to the value it was captured with
(``return_dict`` is exported at its default). A call may pass any argument ``forward``
takes: ``return_dict=False`` gives the original's tuple; another non-tensor argument equal
to its captured value is accepted, a different one is an error naming the argument.

Where the model's code bounds the batch (diffusers' ``Upsample2D`` branches on ``batch >= 64``,
so a U-Net exported on a small batch takes 2..63), the bound is kept as ``max_batch``, and larger
calls run in chunks of at most that many rows (``split_rows`` / ``cat_rows``) instead of failing
torch's guard.

Bad inputs are named before the graph runs (``CallPlan.check``): rank and static sizes as exported,
at least one sample, the exported dtype (a float64, float16 or integer latent would fail in the
first matmul; an integer input of another width is converted, losslessly for the values an embedding
takes), and class labels within the rows of the embedding table they index. The plan reads the graph
once, so a call reads none and ``torch.compile(fullgraph=True)`` traces it.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.export import Dim

TIMESTEP_NAMES = ("timestep", "timesteps", "t", "time", "sigma", "sigmas")
SAMPLE_NAMES = ("hidden_states", "sample", "x", "latents", "latent", "img")
OUTPUT_OPTIONS = ("return_dict",)    # arguments that choose the output's form, not its values


class CaptureError(RuntimeError):
    """The model could not be exported to a graph."""


@dataclass
class CapturedModel:
    """The exported graph and what is needed to call it like the original model (module docs)."""

    graph_module: fx.GraphModule
    signature: inspect.Signature
    input_names: tuple[str, ...]      # forward parameters given at export, in signature order
    sample_input: str                 # placeholder of the noisy sample / latent
    timestep_input: str | None        # placeholder of the timestep, if the model takes one
    model_class: str
    max_batch: int | None = None      # the largest batch the graph accepts; None: unbounded
    constants: dict[str, Any] | None = None   # captured values of the inputs that carry no tensor

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Map a call of the original model onto the exported inputs, by name, and check them (module docs)."""
        return self.graph_inputs(self.call_plan.arguments(args, kwargs))

    def graph_inputs(self, values: dict[str, Any]) -> dict[str, Any]:
        """The graph's inputs for a call's arguments by name (``CallPlan.arguments``), checked."""
        plan = self.call_plan
        return plan.check(plan.graph_inputs(values))

    @property
    def call_plan(self) -> CallPlan:
        """What ``bind`` checks, read once from the signature and the graph (plain values, so that
        ``torch.compile`` traces a call without touching the graph)."""
        plan = getattr(self, "_call_plan", None)
        if plan is None:
            plan = CallPlan.of(self)
            object.__setattr__(self, "_call_plan", plan)
        return plan

def _is_integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _check_dtype(name: str, value: torch.Tensor, expected: torch.dtype, model_class: str,
                 top_level: bool) -> torch.Tensor:
    if value.dtype == expected:
        return value
    if _is_integer(value.dtype) and _is_integer(expected) and top_level:
        return value.to(expected)
    wanted = str(expected).removeprefix("torch.")
    raise ValueError(f"{model_class}: input '{name}' is {value.dtype}; the model was compiled for {expected} "
                     f"(pass {name}.to(torch.{wanted}))")


# ops that pass an integer input's values on unchanged (only their shape or dtype changes)
_VALUE_PRESERVING = {"to", "_to_copy", "view", "reshape", "clone", "contiguous", "unsqueeze", "squeeze", "expand",
                     "flatten", "slice", "select", "repeat"}


def _embedding_tables(placeholder: fx.Node) -> list[tuple[fx.Node, int]]:
    """(embedding node, rows of its table) for each ``aten.embedding`` indexed by this input's values."""
    val = placeholder.meta.get("val")
    if not isinstance(val, torch.Tensor) or not _is_integer(val.dtype):
        return []
    found, stack, seen = [], [placeholder], set()
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            name = getattr(user.target, "_opname", None)
            if user.target is torch.ops.aten.embedding.default and len(user.args) > 1 and user.args[1] is node:
                table = user.args[0].meta.get("val")
                if isinstance(table, torch.Tensor) and isinstance(table.shape[0], int):
                    found.append((user, table.shape[0]))
            elif name in _VALUE_PRESERVING and user.args and user.args[0] is node:
                stack.append(user)
    return found


def _check_indices(name: str, value: torch.Tensor, embedding: str, rows: int, model_class: str) -> None:
    if torch.compiler.is_compiling() or value.device.type == "meta":   # traced (a value check would be data-
        return                                                           # dependent control flow), or no values
    bad = (value < 0) | (value >= rows)
    if value.numel() and bool(bad.any()):
        where = bad.reshape(-1).nonzero()[0].item()
        raise ValueError(f"{model_class}: input '{name}' holds {value.reshape(-1)[where].item()} (element {where}); "
                         f"the model's embedding table (node '{embedding}') has {rows} rows, so it takes "
                         f"0..{rows - 1}")


def split_rows(inputs: Any, limit: int | None) -> list[Any]:
    """``inputs`` (any pytree) as consecutive chunks of at most ``limit`` rows: every tensor whose first
    dim is the batch is sliced, everything else is shared. One chunk when ``limit`` is None or not exceeded."""
    leaves, spec = torch.utils._pytree.tree_flatten(inputs)
    batch = next((v.shape[0] for v in leaves if isinstance(v, torch.Tensor) and v.dim() > 0
                  and v.is_floating_point()), None)
    if limit is None or batch is None or batch <= limit:
        return [inputs]
    return [torch.utils._pytree.tree_unflatten(
        [v[start:start + limit] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v
         for v in leaves], spec) for start in range(0, batch, limit)]


def cat_rows(outputs: list[Any]) -> Any:
    """The outputs of consecutive row chunks joined back along the batch dim (the inverse of ``split_rows``)."""
    if len(outputs) == 1:
        return outputs[0]
    flats = [torch.utils._pytree.tree_flatten(out) for out in outputs]
    joined = [torch.cat(parts) if isinstance(parts[0], torch.Tensor) and parts[0].dim() > 0 else parts[0]
              for parts in zip(*(leaves for leaves, _ in flats), strict=True)]
    return torch.utils._pytree.tree_unflatten(joined, flats[0][1])


@dataclass(frozen=True)
class CallPlan:
    """How a call of the original ``forward`` becomes the graph's inputs (``CapturedModel.bind``)."""

    model_class: str
    positional: tuple[str, ...]          # parameters that may be passed by position, in order
    named: frozenset[str]                # every named parameter
    var_keyword: bool                    # forward takes **kwargs (flattened into the inputs)
    input_names: tuple[str, ...]
    tensors: tuple[str, ...]             # inputs that carry tensors: every call passes them
    fixed: dict[str, Any]                # the other arguments: their captured (or default) values
    timestep: str | None
    sample: str
    shapes: tuple[tuple[int | None, ...] | None, ...]   # per graph input leaf: its shape, None where dynamic
    batched: tuple[int, ...]             # leaves whose dim 0 is the batch
    sample_leaf: int | None
    dtypes: tuple[torch.dtype | None, ...] = ()              # per graph input leaf: its exported dtype
    tables: tuple[tuple[tuple[str, int], ...], ...] = ()     # per leaf: (embedding node, rows) it indexes

    @classmethod
    def of(cls, captured: CapturedModel) -> CallPlan:
        parameters = captured.signature.parameters.values()
        constants = captured.constants or {}
        fixed = {p.name: p.default for p in parameters
                 if p.default is not inspect.Parameter.empty and p.name not in captured.input_names}
        fixed.update(constants)
        shapes, batched, sample_leaf, dtypes, tables = [], [], None, [], []
        for i, node in enumerate(n for n in captured.graph_module.graph.nodes if n.op == "placeholder"):
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                shapes.append(None)
                dtypes.append(None)
                tables.append(())
                continue
            shapes.append(tuple(d if isinstance(d, int) else None for d in val.shape))
            dtypes.append(val.dtype)
            tables.append(tuple((e.name, rows) for e, rows in _embedding_tables(node)))
            if val.dim() > 0 and not isinstance(val.shape[0], int):
                batched.append(i)
            if node.name == captured.sample_input:
                sample_leaf = i
        return cls(captured.model_class,
                   tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)),
                   frozenset(p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)),
                   any(p.kind is p.VAR_KEYWORD for p in parameters), captured.input_names,
                   tuple(n for n in captured.input_names if n not in constants), fixed, captured.timestep_input,
                   captured.sample_input, tuple(shapes), tuple(batched), sample_leaf, tuple(dtypes), tuple(tables))

    def arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call's arguments by name, as ``forward`` would bind them."""
        cls = self.model_class
        if len(args) > len(self.positional):
            raise TypeError(f"{cls}: forward takes {len(self.positional)} positional arguments "
                            f"({', '.join(self.positional)}), the call gave {len(args)}")
        values = dict(zip(self.positional, args, strict=False))
        for name, value in kwargs.items():
            if name in values:
                raise TypeError(f"{cls}: argument '{name}' given both by position and by name")
            if name not in self.named and not self.var_keyword:
                raise TypeError(f"{cls}: forward has no argument '{name}' (it takes {', '.join(sorted(self.named))})")
            values[name] = value
        return values

    def graph_inputs(self, values: dict[str, Any]) -> dict[str, Any]:
        """The graph's inputs, in export order; every argument that is not one must keep its captured value."""
        cls = self.model_class
        missing = [name for name in self.tensors if values.get(name) is None]
        if missing:
            raise TypeError(f"{cls}: the call lacks {missing}; the model was compiled with tensor inputs "
                            f"{list(self.tensors)}, and each call must pass them")
        for name, value in values.items():
            if name in self.tensors or name in OUTPUT_OPTIONS:
                continue
            if name not in self.fixed:
                raise TypeError(f"{cls} was compiled for inputs {list(self.input_names)}; this call adds '{name}'")
            if not _same(value, self.fixed[name]):
                raise TypeError(f"{cls}: argument '{name}' is {_describe(value)} in this call but was "
                                f"{_describe(self.fixed[name])} when the model was compiled; a compiled graph keeps "
                                f"its non-tensor arguments as captured. Pass {name}={_describe(self.fixed[name])} "
                                f"(or leave it out), or compile again with calls that pass the value you need")
        inputs = {name: values[name] if name in self.tensors else self.fixed[name] for name in self.input_names}
        if self.timestep is not None and isinstance(inputs.get(self.timestep), (int, float)) \
                and not isinstance(inputs.get(self.timestep), bool):
            inputs[self.timestep] = _timestep_tensor(inputs[self.timestep], _batch_size(inputs, self.sample))
        return inputs

    def check(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Every tensor input has the rank, static sizes and dtype it was exported with (an integer input of
        another width is converted), at least one row, indices within the embedding tables it feeds, and every
        batched input the sample's batch; a mismatch names the input rather than failing deep inside the
        graph. Returns ``inputs``, converted."""
        flat = torch.utils._pytree.tree_flatten_with_path(((), inputs))[0]
        if len(flat) != len(self.shapes):    # a call torch.export's own guards will judge
            return inputs
        checked = dict(inputs)
        for i, ((path, value), want) in enumerate(zip(flat, self.shapes, strict=True)):
            if want is None or not isinstance(value, torch.Tensor):
                continue
            name = _leaf_name(inputs, i)
            if not _fits(value, want):
                raise ValueError(_shape_message(self.model_class, name, value, want))
            if value.dim() and value.shape[0] == 0:
                raise ValueError(f"{self.model_class}: input '{name}' has batch size 0 (shape "
                                 f"{tuple(value.shape)}); call the model with at least one sample")
            if self.dtypes:
                value = _check_dtype(name, value, self.dtypes[i], self.model_class, top_level=len(path) == 2)
                if len(path) == 2:
                    checked[name] = value
                for embedding, rows in self.tables[i]:
                    _check_indices(name, value, embedding, rows, self.model_class)
        leaves = [value for _, value in flat]
        if self.sample_leaf is None or not isinstance(leaves[self.sample_leaf], torch.Tensor):
            return checked
        batch = leaves[self.sample_leaf].shape[0]
        for i in self.batched:
            if isinstance(leaves[i], torch.Tensor) and leaves[i].shape[0] != batch:
                name = _leaf_name(inputs, i)
                raise ValueError(f"{self.model_class}: input '{name}' has batch {leaves[i].shape[0]} "
                                 f"(shape {tuple(leaves[i].shape)}) but the sample '{self.sample}' has batch {batch}: "
                                 f"give '{name}' one row per sample (e.g. expand a single value to {batch} rows)")
        return checked


def _fits(value: torch.Tensor, want: tuple[int | None, ...]) -> bool:
    """``value`` has ``want``'s rank and its sizes where they are static (None: any size)."""
    return value.dim() == len(want) and all(w is None or g == w for g, w in zip(value.shape, want, strict=True))


def _same(value: Any, captured: Any) -> bool:
    if isinstance(value, torch.Tensor) or isinstance(captured, torch.Tensor):
        return value is captured
    try:
        return bool(value == captured)
    except Exception:   # a type whose == does not give a bool
        return value is captured


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


def _leaf_name(inputs: dict[str, Any], index: int) -> str:
    path = torch.utils._pytree.tree_flatten_with_path(((), inputs))[0][index][0]
    return torch.utils._pytree.keystr(path[1:]).strip("[]'\"").replace("']['", ".")


def _shape_message(model_class: str, name: str, value: torch.Tensor, want: tuple[int | None, ...]) -> str:
    shown = "(" + ", ".join("any" if d is None else str(d) for d in want) + ")"
    if value.dim() != len(want):
        return (f"{model_class}: input '{name}' has {value.dim()} dims, shape {tuple(value.shape)}; "
                f"the model was compiled for shape {shown}")
    dim = next(i for i, (g, w) in enumerate(zip(value.shape, want, strict=True)) if w is not None and g != w)
    return (f"{model_class}: input '{name}' has size {value.shape[dim]} in dim {dim} (shape {tuple(value.shape)}); "
            f"the model was compiled for shape {shown}, where dim {dim} is fixed at {want[dim]}. Compile with "
            "example inputs of the size you deploy, or ask for that dim in dynamic_shapes=")


def bind_inputs(signature: inspect.Signature, args: tuple, kwargs: dict, timestep_name: str | None,
                expected: tuple[str, ...] | None = None, model_class: str = "model",
                sample_name: str | None = None) -> dict[str, Any]:
    """``signature.bind`` of a call, ``**kwargs`` flattened, a Python-number timestep made a tensor."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{model_class}: the call does not match forward{signature}: {e}") from None
    inputs = dict(bound.arguments)
    for name, param in signature.parameters.items():       # **kwargs parameters are flattened
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in inputs:
            inputs.update(inputs.pop(name))
    if timestep_name and isinstance(inputs.get(timestep_name), (int, float)) \
            and not isinstance(inputs.get(timestep_name), bool):
        inputs[timestep_name] = _timestep_tensor(inputs[timestep_name], _batch_size(inputs, sample_name))
    if expected is not None and tuple(inputs) != expected:
        missing = [n for n in expected if n not in inputs]
        extra = [n for n in inputs if n not in expected]
        raise TypeError(f"{model_class} was compiled for inputs {list(expected)}; this call "
                        f"{'lacks ' + str(missing) if missing else ''}"
                        f"{' and ' if missing and extra else ''}{'adds ' + str(extra) if extra else ''}")
    return inputs


def _timestep_tensor(value: int | float, batch: int) -> torch.Tensor:
    return torch.full((batch,), value, dtype=torch.float32 if isinstance(value, float) else torch.long)


def _batch_size(inputs: dict[str, Any], sample_name: str | None = None) -> int:
    sample = inputs.get(sample_name) if sample_name else None
    if isinstance(sample, torch.Tensor) and sample.dim() > 0:
        return sample.shape[0]
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return 1


def _find_input(names, candidates: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in candidates), None)


def auto_example_inputs(model: torch.nn.Module, batch_size: int = 2) -> dict[str, Any]:
    """Example inputs for the diffusers denoisers this project knows, built from their config."""
    cls = type(model).__name__
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise CaptureError(f"{cls}: no example inputs given and the model has no diffusers config to "
                           "build them from. Pass example_inputs=(args, kwargs) or calibration data.")
    build = _EXAMPLES.get(cls)
    if build is None:
        raise CaptureError(f"{cls}: no example inputs given and this model class has no automatic ones "
                           f"({', '.join(_EXAMPLES)}). Pass example_inputs=(args, kwargs) or calibration data.")
    return build(cfg, batch_size, torch.Generator().manual_seed(0))


def _image(cfg: Any, b: int, gen: torch.Generator) -> torch.Tensor:
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    hw = (size, size) if isinstance(size, int) else size
    return torch.randn(b, cfg.in_channels, *hw, generator=gen)


def _timesteps(b: int) -> torch.Tensor:
    return torch.linspace(1, 999, b).round().long()


def _text(b: int, width: int, gen: torch.Generator, tokens: int = 4) -> torch.Tensor:
    return torch.randn(b, tokens, width, generator=gen)


def _flux_example(cfg: Any, b: int, gen: torch.Generator) -> dict[str, Any]:
    """16 packed latent tokens on a 4x4 grid; the position ids have no batch dim (one row per token)."""
    img_ids = torch.stack([torch.zeros(16), torch.arange(16.0) // 4, torch.arange(16.0) % 4], dim=1)
    inputs = dict(hidden_states=torch.randn(b, 16, cfg.in_channels, generator=gen),
                  encoder_hidden_states=_text(b, cfg.joint_attention_dim, gen),
                  pooled_projections=torch.randn(b, cfg.pooled_projection_dim, generator=gen),
                  timestep=torch.linspace(0.01, 0.99, b), img_ids=img_ids, txt_ids=torch.zeros(4, 3))
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((b,), 3.5)
    return inputs


_EXAMPLES = {
    "DiTTransformer2DModel": lambda cfg, b, gen: dict(
        hidden_states=_image(cfg, b, gen), timestep=_timesteps(b),
        class_labels=torch.arange(b) % max(cfg.num_embeds_ada_norm or 1, 1)),
    "PixArtTransformer2DModel": lambda cfg, b, gen: dict(
        hidden_states=_image(cfg, b, gen), encoder_hidden_states=_text(b, cfg.caption_channels, gen),
        timestep=_timesteps(b), added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
    "SD3Transformer2DModel": lambda cfg, b, gen: dict(
        hidden_states=_image(cfg, b, gen), encoder_hidden_states=_text(b, cfg.joint_attention_dim, gen),
        pooled_projections=torch.randn(b, cfg.pooled_projection_dim, generator=gen), timestep=_timesteps(b).float()),
    "FluxTransformer2DModel": _flux_example,
    "WanTransformer3DModel": lambda cfg, b, gen: dict(     # 2 latent frames of 8x8
        hidden_states=torch.randn(b, cfg.in_channels, 2, 8, 8, generator=gen), timestep=_timesteps(b),
        encoder_hidden_states=_text(b, cfg.text_dim, gen)),
    "UNet2DModel": lambda cfg, b, gen: dict(
        sample=_image(cfg, b, gen), timestep=_timesteps(b),
        **({"class_labels": torch.arange(b) % max(cfg.num_class_embeds or 1, 1)}
           if cfg.num_class_embeds is not None or cfg.class_embed_type is not None else {})),
    "UNet2DConditionModel": lambda cfg, b, gen: dict(
        sample=_image(cfg, b, gen), timestep=_timesteps(b),
        encoder_hidden_states=_text(b, cfg.cross_attention_dim, gen)),
}


def _source_line(error: BaseException) -> str | None:
    """The first user (non-torch) source location torch mentions, or the innermost user frame."""
    torch_dir = inspect.getfile(torch).rsplit("/", 1)[0]
    for path, line in re.findall(r'File "([^"]+)", line (\d+)', str(error)):
        if not path.startswith(torch_dir):
            return f"{path}:{line}"
    location = None
    tb = error.__traceback__
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename
        if not path.startswith(torch_dir) and not path.endswith("capture.py"):
            location = f"{path}:{tb.tb_lineno}"
        tb = tb.tb_next
    return location


def capture(model: torch.nn.Module, example_inputs: tuple[tuple, dict] | dict | None = None,
            dynamic_shapes: dict[str, dict[int, Any]] | None = None) -> CapturedModel:
    """Export a deep copy of ``model`` with ``torch.export`` and return the unlifted graph.

    ``dynamic_shapes`` asks for more dynamic dims than the batch, by input name:
    ``{"hidden_states": {2: Dim("h", min=16, max=64)}}`` (``torch.export.Dim``, or ``Dim.AUTO``).
    A request the model's code cannot honour (a DiT's pos-embedding fixes its latent size; a
    patch-2 model needs even sizes) is an error that names the input, the dim and torch's fix.
    """
    cls = type(model).__name__
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compile() takes a torch.nn.Module, got {cls}")
    signature = inspect.signature(model.forward)
    if example_inputs is None:
        args, kwargs = (), auto_example_inputs(model)
    elif isinstance(example_inputs, dict):
        args, kwargs = (), example_inputs
    else:
        args, kwargs = example_inputs
    names = [n for n, p in signature.parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    timestep_name = _find_input(names, TIMESTEP_NAMES)
    inputs = bind_inputs(signature, tuple(args), dict(kwargs), None, model_class=cls)
    for option in OUTPUT_OPTIONS:          # exported at its default: the output object, made a tuple on request
        inputs.pop(option, None)
    sample_name = _find_input(inputs, SAMPLE_NAMES) or next(
        (n for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    if sample_name is None:
        raise CaptureError(f"{cls}: none of the inputs {list(inputs)} is a floating-point sample tensor")
    if timestep_name and isinstance(inputs.get(timestep_name), (int, float)):
        inputs[timestep_name] = _timestep_tensor(inputs[timestep_name], _batch_size(inputs, sample_name))

    copy_ = copy.deepcopy(model).eval()
    batch = inputs[sample_name].shape[0] if isinstance(inputs[sample_name], torch.Tensor) else None
    dynamic = {name: _batch_dims(value, batch) for name, value in inputs.items()}
    for name, dims in (dynamic_shapes or {}).items():
        value = inputs.get(name)
        if not isinstance(value, torch.Tensor):
            tensors = [n for n, v in inputs.items() if isinstance(v, torch.Tensor)]
            raise CaptureError(f"dynamic_shapes['{name}']: {cls} has no tensor input '{name}' (inputs: {tensors})")
        for dim in dims:
            if not isinstance(dim, int) or not 0 <= dim < value.dim():
                raise CaptureError(f"dynamic_shapes['{name}'][{dim!r}]: '{name}' has dims 0..{value.dim() - 1} "
                                   f"(shape {tuple(value.shape)})")
        dynamic[name] = {**(dynamic[name] or {}), **dims}
    try:
        program = torch.export.export(copy_, (), inputs, dynamic_shapes=dynamic)
    except Exception as e:  # torch raises many types here; all mean "does not export"
        if dynamic_shapes and "Constraints violated" in str(e):
            raise CaptureError(_constraint_message(cls, str(e), dynamic_shapes)) from e
        where = _source_line(e)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(
            f"torch.export could not capture {cls}: {type(e).__name__}: {first}\n"
            f"  at: {where or 'unknown source line'}\n"
            "  hint: data-dependent Python control flow (if/while on tensor values, .item(), "
            "tolist()) cannot be captured; rewrite it with torch.where / torch.cond, state what a "
            "data-dependent value may be with torch._check, or pass example inputs that take the "
            "branch you deploy."
        ) from e
    gm = program.module()
    placeholders = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    sample = sample_name if sample_name in placeholders else _placeholder_for(gm, sample_name)
    return CapturedModel(
        graph_module=gm,
        signature=signature,
        input_names=tuple(inputs),
        sample_input=sample,
        timestep_input=(timestep_name if timestep_name in placeholders else _placeholder_for(gm, timestep_name))
        if timestep_name in inputs else None,
        model_class=cls,
        max_batch=_batch_limit(program, gm, sample),
        constants=captured_constants(inputs),
    )


def captured_constants(inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs of a bound call that carry no tensor: the graph holds them as constants."""
    return {name: value for name, value in inputs.items() if not _has_tensor(value)}


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in torch.utils._pytree.tree_leaves(value))


def _batch_limit(program: torch.export.ExportedProgram, gm: fx.GraphModule, sample_name: str) -> int | None:
    """The upper bound torch.export derived for the sample's batch dim, where the model's code sets one."""
    node = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == sample_name), None)
    value = node.meta.get("val") if node is not None else None
    size = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() > 0 else None
    if not isinstance(size, torch.SymInt):
        return None
    bound = program.range_constraints.get(size.node.expr)
    try:
        return int(bound.upper)
    except (AttributeError, TypeError, ValueError, OverflowError):   # no entry, or torch's int_oo
        return None


def _constraint_message(cls: str, error: str, requested: dict[str, dict[int, Any]]) -> str:
    """torch's constraint report, reduced to the lines that say which requested dim breaks which guard."""
    lines = [line.strip() for line in error.splitlines()]
    broken = [line.lstrip("- ") for line in lines if line.startswith("- ")]
    fixes = lines[lines.index("Suggested fixes:") + 1:] if "Suggested fixes:" in lines else []
    fixes = [f for f in fixes if f and "=" in f and not f.startswith("The error")]
    asked = ", ".join(f"'{name}' dims {sorted(dims)}" for name, dims in requested.items())
    return (f"dynamic_shapes: {cls} cannot be exported with the sizes asked for ({asked}): the model's code "
            "constrains them.\n  " + "\n  ".join(broken[:6]) +
            (f"\n  torch suggests: {'; '.join(fixes)}" if fixes else ""))


def _batch_dims(value: Any, batch: int | None):
    """``{0: Dim.AUTO}`` for tensors whose dim 0 has the sample's batch size; other dims stay static."""
    if isinstance(value, torch.Tensor):
        return {0: Dim.AUTO} if value.dim() > 0 and value.shape[0] == batch else None
    if isinstance(value, dict):
        return {k: _batch_dims(v, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_batch_dims(v, batch) for v in value)
    return None


def _placeholder_for(gm: fx.GraphModule, name: str | None) -> str | None:
    if name is None:
        return None
    return next((n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith(name)), None)
