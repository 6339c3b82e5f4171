"""QuantParams: the quantization parameters every calibration method returns, and how they merge.

Observers, TQ-DiT's scale search, TaQ-DiT's block reconstruction and RobuQ's distillation each fit
some of these, keyed by the layer's node name in the graph being compiled:

    activations   node -> (s_a, z_a)          static per-tensor input quantizer of a linear / conv
    weights       node -> (q_w, s_w, z_w)     integer weight codes (absent: nearest rounding of W)
    token_clips   node -> c                   per-token activation range clipping ratio (learned)
    biases        node -> b                   a trained bias that replaces the float one
    binary        node -> {name -> tensor}    a binarized layer's stored form (``train.binary_layer``)
    timestep_lambdas  site -> (G,)            BiDM+'s TES coefficients of a block output (learned)
    smoothing     node -> s                   per-channel smoothing of a site's input (its first consumer's node)
    shifts        node -> d                   TaQ-DiT momentum shift of a linear's input (folded into the graph)
    factors       node -> a                   TaQ-DiT migration factors (from channel ranges, then learned)
    site_tables   site key -> {param -> (G,)} a TQ-DiT activation site's parameters per time group
    boundaries    (G - 1,) timesteps          the time groups' boundaries (when any site is grouped)
    layer_sqnr    node -> dB                  the search's layer-output SQNR (reported)
    trace         name -> {figure -> value}   what fitting measured on the way (losses, seconds)

Merging (``a.merged(b)``: ``b`` fitted after ``a``) is per entry: an entry of ``b`` replaces the same
node's (or site's) entry of ``a``, entries only one of them has are kept, and ``boundaries`` is
``b``'s when ``b`` has one. So reconstruction refines what the observers found layer by layer, and
a method that fits only some layers leaves the others as they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from torch import Tensor


@dataclass
class QuantParams:
    activations: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    weights: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    token_clips: dict[str, Tensor] = field(default_factory=dict)
    biases: dict[str, Tensor] = field(default_factory=dict)
    binary: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    timestep_lambdas: dict[str, Tensor] = field(default_factory=dict)
    smoothing: dict[str, Tensor] = field(default_factory=dict)
    shifts: dict[str, Tensor] = field(default_factory=dict)
    factors: dict[str, Tensor] = field(default_factory=dict)
    site_tables: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    boundaries: Tensor | None = None
    layer_sqnr: dict[str, float] = field(default_factory=dict)
    trace: dict[str, dict[str, float]] = field(default_factory=dict)

    def merged(self, newer: QuantParams) -> QuantParams:
        """``self`` with ``newer``'s entries laid over it (see the module docstring)."""
        out = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(newer, f.name)
            if f.name == "boundaries":
                out[f.name] = theirs if theirs is not None else mine
            else:
                out[f.name] = {**mine, **theirs}
        return QuantParams(**out)

    def linear_input_qparams(self, sites) -> dict[str, tuple[Tensor, Tensor]]:
        """(scale, zero point) of the linear inputs ``ditq::quant_linear`` quantizes itself, from ``sites``'
        tables (the sites that need no quantizer op of their own)."""
        return {s.consumer: (self.site_tables[s.key]["scale"][0], self.site_tables[s.key]["zero_point"][0])
                for s in sites if not s.standalone}


__all__ = ["QuantParams"]
