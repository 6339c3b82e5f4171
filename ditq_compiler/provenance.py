"""Where a compiled model came from: what an artifact records besides the graph and the tensors.

* ``fp_checkpoint_bytes``: the size of the FP model's state dict (each tensor counted once), the
  reference the artifact's size on disk is reported against;
* ``model_config``: the diffusers config of the model, if it has one (pipelines read it from the
  denoiser: ``config.sample_size``, ``config.in_channels`` ...), with sets as sorted lists: a set's
  order follows the process's hash seed (``PYTHONHASHSEED``), and an artifact must be the same
  bytes in every process;
* ``calibration``: how the calibration set was made; for a ``from_sampler`` set its selection,
  sampler and ``seed``, otherwise the number of batches;
* ``example_inputs``: one call of the model (its first calibration batch, cut to two rows),
  bound to the graph's inputs, so the saved graph can be re-exported and checked after loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

EXAMPLE_ROWS = 2


@dataclass
class Provenance:
    fp_checkpoint_bytes: int = 0
    model_config: dict[str, Any] | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    example_inputs: dict[str, Any] | None = None


def state_dict_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


# config entries diffusers builds as list(set(...)): their order is the hash order of the process that made them
SET_VALUED_CONFIG_KEYS = ("_use_default_values",)


def _plain(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    return str(value)


def model_config(model: torch.nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        return None
    plain = json.loads(json.dumps(dict(config), default=_plain))
    for key in SET_VALUED_CONFIG_KEYS:
        if isinstance(plain.get(key), list):
            plain[key] = sorted(plain[key], key=repr)
    return plain


def calibration_info(calibration: Any, batches: list) -> dict[str, Any]:
    selection = getattr(calibration, "selection", None)
    if isinstance(selection, dict) and selection:
        return {"source": "from_sampler", "samples": int(getattr(calibration, "num_samples", 0)), **selection}
    return {"source": "batches", "batches": len(batches)}


def example_call(inputs: dict[str, Any], batched: tuple[int, ...] | None = None) -> dict[str, Any]:
    """``inputs`` cut to ``EXAMPLE_ROWS`` rows: the leaves at ``batched`` (by flattened position), or
    every tensor whose dim 0 is the first tensor's when that is not known."""
    leaves, spec = tree_flatten(inputs)
    if batched is None:
        batch = next((v.shape[0] for v in leaves if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        batched = tuple(i for i, v in enumerate(leaves)
                        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch)
    return tree_unflatten([v[:EXAMPLE_ROWS].detach().clone() if i in batched else v for i, v in enumerate(leaves)],
                          spec)


def provenance_of(model: torch.nn.Module, calibration: Any, batches: list, bind,
                  batched: tuple[int, ...] | None = None) -> Provenance:
    return Provenance(fp_checkpoint_bytes=state_dict_bytes(model), model_config=model_config(model),
                      calibration=calibration_info(calibration, batches),
                      example_inputs=example_call(bind(*batches[0]), batched) if batches else None)


__all__ = ["Provenance", "provenance_of", "state_dict_bytes"]
