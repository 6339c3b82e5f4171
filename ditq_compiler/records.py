"""What a compile produced, as plain records: the rows the summary shows, and the ``CompileRecord``.

``compile()`` fills a ``CompileRecord`` stage by stage; ``ditq_compiler.artifact`` writes one to disk and
reads one back; ``CompiledModel`` is built from one either way, so a loaded model and a freshly
compiled one are the same object with the same fields. Every record type the summary, the HTML view
and the artifact's ``report.json`` show lives here:

    LayerReport       one quantized layer: formats, scales, kernel, local SQNR, transformations
    SiteReport        one TQ-DiT activation site (the quantizer of one input of a linear or matmul)
    Rotation          one RobuQ Hadamard rotation and where it runs
    Allocation        AMPN's per-layer activation bits and the sensitivities behind them
    UnsupportedLayer  a weight-carrying op left in float because it has no quantized lowering
    FloatLayer        a linear or conv the recipe leaves in float (its role, or an override)
    StageNote         a line a stage (built in or added by a user) adds to the summary
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # for annotations only: these modules do not import this one either
    from torch import fx

    from ditq_compiler.capture import CapturedModel
    from ditq_compiler.provenance import Provenance
    from ditq_compiler.recipe import Recipe


@dataclass
class LayerReport:
    name: str
    role: str
    op: str
    weights: str
    activations: str
    weight_scale: tuple[float, float]
    activation_scale: float | None
    sqnr_db: float | None = None
    kernel: str = "reference"
    transforms: str = ""          # "shift" / "shift+migrate" in front of the layer (TaQ-DiT), "hadamard ..." (RobuQ)
    input_site: str = ""          # its input's standalone quantizer (TQ-DiT), e.g. 'int6 2-region'; see the sites
    activation_clip: float | None = None   # per-token range clipping ratio (learned by distillation)


@dataclass
class SiteReport:
    """One TQ-DiT activation site: the quantizer of one input of a linear or an attention matmul."""

    layer: str
    operand: str                  # input | q | k^T | P | v
    kind: str                     # post_softmax | post_gelu | linear_input | attention_operand
    quantizer: str                # e.g. 'int6 asym', 'int6 2-region'
    regions: str                  # '1' or the two regions
    groups: int                   # time groups (1: one parameter set for all timesteps)
    parameters: str               # the searched values (range over the groups)
    sqnr_db: float | None = None  # the layer's output SQNR with both operands quantized, on the calibration data


@dataclass(frozen=True)
class Rotation:
    """What was done in front of one linear (``passes/insert_hadamard.py``)."""

    layer: str
    role: str
    width: int
    construction: str    # e.g. 'H128 = H8 x H16'
    placement: str       # 'online', 'fused into <layer>', 'per-head H32 fused into <layer> + online H4 across heads'


@dataclass
class Allocation:
    """AMPN's chosen widths and the numbers behind them (node name keyed, graph order)."""

    bits: dict[str, int]
    sensitivity: dict[str, dict[int, float]]
    cost: dict[str, float]
    base_loss: float
    sensitivity_from: str
    layer_names: dict[str, str]        # node name -> layer name (module path)

    @property
    def average_bits(self) -> float:
        return sum(self.cost[n] * b for n, b in self.bits.items()) / sum(self.cost[n] for n in self.bits)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Allocation:
        """JSON made the per-layer {bits: loss} keys strings; they are ints again."""
        sensitivity = {name: {int(bits): loss for bits, loss in losses.items()}
                       for name, losses in data["sensitivity"].items()}
        return cls(**{**data, "sensitivity": sensitivity})


@dataclass(frozen=True)
class UnsupportedLayer:
    node: str
    name: str            # module path
    op: str
    closest_role: str

    def describe(self) -> str:
        supported = "aten.conv2d (nn.Conv2d)" if self.closest_role == "conv" else "aten.linear (nn.Linear)"
        return f"'{self.name}' (node {self.node}, aten.{self.op}): closest supported role '{self.closest_role}', " \
               f"which needs {supported}"


@dataclass(frozen=True)
class FloatLayer:
    """A linear or conv the recipe leaves in full precision, and why."""

    name: str
    role: str
    reason: str          # 'role' (not in the recipe's quantize_roles) or 'override' (an override keeps it)


@dataclass(frozen=True)
class StageNote:
    """A line of the summary's head from one stage, e.g. ``StageNote("smooth", "12 layers smoothed")``."""

    stage: str
    text: str


@dataclass
class Reports:
    """What the stages found and did, for the summary, the HTML view and ``report.json``."""

    layers: list[LayerReport] = field(default_factory=list)
    output_sqnr_db: float | None = None
    sites: list[SiteReport] = field(default_factory=list)         # TQ-DiT activation sites
    time_groups: list[str] = field(default_factory=list)          # the timestep range of each time group
    rotations: list[Rotation] = field(default_factory=list)       # RobuQ
    allocation: Allocation | None = None                          # AMPN
    unsupported: list[UnsupportedLayer] = field(default_factory=list)
    float_layers: list[FloatLayer] = field(default_factory=list)  # left in float by the recipe
    notes: list[StageNote] = field(default_factory=list)
    unit_seconds: dict[str, dict[str, float]] = field(default_factory=dict)   # phase:block -> {"total", "learning"}
    activation_stats: dict[str, Any] = field(default_factory=dict)   # layer -> inspection.activations stats

    def extras_to_json(self) -> dict[str, Any]:
        """The records besides the layers, as JSON values (``report.json``)."""
        return {"sites": [dataclasses.asdict(site) for site in self.sites], "time_groups": list(self.time_groups),
                "rotations": [dataclasses.asdict(rotation) for rotation in self.rotations],
                "unsupported": [dataclasses.asdict(layer) for layer in self.unsupported],
                "float_layers": [dataclasses.asdict(layer) for layer in self.float_layers],
                "allocation": None if self.allocation is None else dataclasses.asdict(self.allocation),
                "notes": [dataclasses.asdict(note) for note in self.notes]}

    def read_extras(self, report: dict[str, Any]) -> None:
        """Inverse of ``extras_to_json`` (keys absent in older artifacts stay empty)."""
        self.sites = [SiteReport(**site) for site in report.get("sites", [])]
        self.time_groups = list(report.get("time_groups", []))
        self.rotations = [Rotation(**rotation) for rotation in report.get("rotations", [])]
        self.unsupported = [UnsupportedLayer(**layer) for layer in report.get("unsupported", [])]
        self.float_layers = [FloatLayer(**layer) for layer in report.get("float_layers", [])]
        allocation = report.get("allocation")
        self.allocation = None if allocation is None else Allocation.from_json(allocation)
        self.notes = [StageNote(**note) for note in report.get("notes", [])]


@dataclass
class CompileRecord:
    """Everything a ``CompiledModel`` is made of; what ``compile()`` and ``load()`` produce."""

    graph_module: fx.GraphModule                  # what runs: the reference, or its lowering for ``backend``
    captured: CapturedModel
    recipe: Recipe
    backend: str = "torch"
    reference_graph: fx.GraphModule | None = None   # the fake-quant reference, when a backend lowered it
    reports: Reports = field(default_factory=Reports)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    resumed_from_cache: list[str] = field(default_factory=list)   # work an interrupted compile had finished
    world_size: int = 1                           # processes that calibrated it (``ditq_compiler.distributed``)
    provenance: Provenance | None = None
    manifest: dict[str, Any] | None = None        # a loaded artifact's manifest (``ditq inspect`` shows it)


__all__ = ["Allocation", "CompileRecord", "FloatLayer", "LayerReport", "Reports", "Rotation", "SiteReport", "StageNote",
           "UnsupportedLayer"]
