"""Capture a denoiser as an FX graph with ``torch.export``.

The user's model is deep-copied and the copy put in eval mode, so ``compile`` never
touches the module it was given. Every call is normalised to keyword arguments bound
to ``forward``'s signature, so the graph has one placeholder per named input and the
timestep stays a graph input (time-aware quantizers read it at run time). A Python
number passed as the timestep is turned into a tensor of the batch size first;
otherwise ``torch.export`` would bake it into the graph as a constant.

The batch dimension of every tensor input is exported as ``Dim.AUTO``: dynamic where
the model allows it, so calibration and inference may use other batch sizes. Where the model's
code bounds it (diffusers' ``Upsample2D`` branches on ``batch >= 64``, so a U-Net exports for
batches 2..63), the bound is kept as ``max_batch``, and larger calls run in chunks of at most
that many rows (``split_rows`` / ``cat_rows``) instead of failing torch's guard.
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


class CaptureError(RuntimeError):
    """The model could not be exported to a graph."""


@dataclass
class CapturedModel:
    """The exported graph and what is needed to call it like the original model."""

    graph_module: fx.GraphModule
    signature: inspect.Signature
    input_names: tuple[str, ...]      # forward parameters given at export, in signature order
    sample_input: str                 # placeholder of the noisy sample / latent
    timestep_input: str | None        # placeholder of the timestep, if the model takes one
    model_class: str
    max_batch: int | None = None      # the largest batch the graph accepts; None: unbounded

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Map a call of the original model onto the exported inputs, by name, and check them (``check_inputs``)."""
        inputs = bind_inputs(self.signature, args, kwargs, self.timestep_input,
                             expected=self.input_names, model_class=self.model_class)
        return check_inputs(self.graph_module, inputs, self.model_class)


def check_inputs(gm: fx.GraphModule, inputs: dict[str, Any], model_class: str) -> dict[str, Any]:
    """Every tensor input is one the graph can take; each problem is named here, not deep inside the graph.

    * rank and static sizes as exported: dimensions exported as dynamic (the batch) may take any size,
      the others are fixed by the export (a DiT's pos-embedding fixes its latent size);
    * at least one sample: a batch of 0 would fail in the first reshape;
    * the dtype exported: a float64, float16 or integer latent would fail in the first matmul. An
      integer input of another width (int32 class labels) is converted, losslessly for the values an
      embedding takes;
    * the rows of the embedding tables integer inputs index (class labels: 0..classes-1).

    Returns ``inputs``, integer inputs converted to the exported width.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = torch.utils._pytree.tree_flatten_with_path(((), inputs))[0]
    if len(flat) != len(placeholders):    # a call torch.export's own guards will judge
        return inputs
    checked = dict(inputs)
    for (path, value), node in zip(flat, placeholders, strict=True):
        expected = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not isinstance(expected, torch.Tensor):
            continue
        name = torch.utils._pytree.keystr(path[1:]).strip("[]'\"")
        _check_size(name, value, expected, model_class)
        value = _check_dtype(name, value, expected, model_class, top_level=len(path) == 2)
        if len(path) == 2:
            checked[name] = value
        for embedding, rows in _embedding_tables(node):
            _check_indices(name, value, embedding, rows, model_class)
    return checked


def _check_size(name: str, value: torch.Tensor, expected: torch.Tensor, model_class: str) -> None:
    shown = "(" + ", ".join(str(d) if isinstance(d, int) else "any" for d in expected.shape) + ")"
    if value.dim() != expected.dim():
        raise ValueError(f"{model_class}: input '{name}' has {value.dim()} dims, shape {tuple(value.shape)}; "
                         f"the model was compiled for shape {shown}")
    if value.dim() and value.shape[0] == 0:
        raise ValueError(f"{model_class}: input '{name}' has batch size 0 (shape {tuple(value.shape)}); call the "
                         "model with at least one sample")
    for dim, (got, want) in enumerate(zip(value.shape, expected.shape, strict=True)):
        if isinstance(want, int) and got != want:
            raise ValueError(
                f"{model_class}: input '{name}' has size {got} in dim {dim} (shape {tuple(value.shape)}); "
                f"the model was compiled for shape {shown}, where dim {dim} is fixed at {want}. Compile with "
                "example inputs of the size you deploy, or ask for that dim in dynamic_shapes=")


def _is_integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _check_dtype(name: str, value: torch.Tensor, expected: torch.Tensor, model_class: str,
                 top_level: bool) -> torch.Tensor:
    if value.dtype == expected.dtype:
        return value
    if _is_integer(value.dtype) and _is_integer(expected.dtype) and top_level:
        return value.to(expected.dtype)
    wanted = str(expected.dtype).removeprefix("torch.")
    raise ValueError(f"{model_class}: input '{name}' is {value.dtype}; the model was compiled for {expected.dtype} "
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


def _check_indices(name: str, value: torch.Tensor, embedding: fx.Node, rows: int, model_class: str) -> None:
    bad = (value < 0) | (value >= rows)
    if value.numel() and bool(bad.any()):
        where = bad.reshape(-1).nonzero()[0].item()
        raise ValueError(f"{model_class}: input '{name}' holds {value.reshape(-1)[where].item()} (element {where}); "
                         f"the model's embedding table (node '{embedding.name}') has {rows} rows, so it takes "
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


def bind_inputs(signature: inspect.Signature, args: tuple, kwargs: dict, timestep_name: str | None,
                expected: tuple[str, ...] | None = None, model_class: str = "model") -> dict[str, Any]:
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{model_class}: the call does not match forward{signature}: {e}") from None
    inputs = dict(bound.arguments)
    for name, param in signature.parameters.items():       # **kwargs parameters are flattened
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in inputs:
            inputs.update(inputs.pop(name))
    if timestep_name and not isinstance(inputs.get(timestep_name), torch.Tensor) \
            and isinstance(inputs.get(timestep_name), (int, float)):
        batch = _batch_size(inputs)
        inputs[timestep_name] = torch.full((batch,), inputs[timestep_name],
                                           dtype=torch.float32 if isinstance(inputs[timestep_name], float)
                                           else torch.long)
    if expected is not None and tuple(inputs) != expected:
        missing = [n for n in expected if n not in inputs]
        extra = [n for n in inputs if n not in expected]
        raise TypeError(f"{model_class} was compiled for inputs {list(expected)}; this call "
                        f"{'lacks ' + str(missing) if missing else ''}"
                        f"{' and ' if missing and extra else ''}{'adds ' + str(extra) if extra else ''}")
    return inputs


def _batch_size(inputs: dict[str, Any]) -> int:
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
    gen = torch.Generator().manual_seed(0)
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    hw = (size, size) if isinstance(size, int) else size
    sample = torch.randn(batch_size, cfg.in_channels, *hw, generator=gen)
    timestep = torch.linspace(1, 999, batch_size).round().long()
    if cls == "DiTTransformer2DModel":
        return dict(hidden_states=sample, timestep=timestep,
                    class_labels=torch.arange(batch_size) % max(cfg.num_embeds_ada_norm or 1, 1))
    if cls == "PixArtTransformer2DModel":
        caption = torch.randn(batch_size, 4, cfg.caption_channels, generator=gen)
        return dict(hidden_states=sample, encoder_hidden_states=caption, timestep=timestep,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if cls == "UNet2DModel":
        kwargs = dict(sample=sample, timestep=timestep)
        if cfg.num_class_embeds is not None or cfg.class_embed_type is not None:
            kwargs["class_labels"] = torch.arange(batch_size) % max(cfg.num_class_embeds or 1, 1)
        return kwargs
    if cls == "UNet2DConditionModel":
        context = torch.randn(batch_size, 4, cfg.cross_attention_dim, generator=gen)
        return dict(sample=sample, timestep=timestep, encoder_hidden_states=context)
    raise CaptureError(f"{cls}: no example inputs given and this model class has no automatic ones "
                       "(DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DModel, UNet2DConditionModel). "
                       "Pass example_inputs=(args, kwargs) or calibration data.")


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
    inputs = bind_inputs(signature, tuple(args), dict(kwargs), timestep_name, model_class=cls)
    sample_name = _find_input(inputs, SAMPLE_NAMES) or next(
        (n for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    if sample_name is None:
        raise CaptureError(f"{cls}: none of the inputs {list(inputs)} is a floating-point sample tensor")

    copy_ = copy.deepcopy(model).eval()
    dynamic = {name: _batch_dims(value) for name, value in inputs.items()}
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
    )


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


def _batch_dims(value: Any):
    if isinstance(value, torch.Tensor):
        return {0: Dim.AUTO} if value.dim() > 0 else None
    if isinstance(value, dict):
        return {k: _batch_dims(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_batch_dims(v) for v in value)
    return None


def _placeholder_for(gm: fx.GraphModule, name: str | None) -> str | None:
    if name is None:
        return None
    return next((n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith(name)), None)
