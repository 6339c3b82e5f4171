"""``compiled.plot(out_dir)``: one PNG per quantized layer, its input activations before and after the transforms.

Three panels from the statistics recorded at compile time (``inspection.activations``), in the
TaQ-DiT paper's views:

* range over timesteps (Fig. 2(d)): min..max band and mean per calibration timestep, noisiest first;
* histogram of all values (Fig. 3(a)/(b)), log counts, one shared range;
* range per input channel (Fig. 3(c)/(f)): where outlier channels stand out, and what migration did.

Grey is before the transformations (the model's own activation), blue is after (what the activation
quantizer sees); a layer without transformations has only the blue series. Needs matplotlib
(``pip install 'ditq-compiler[plot]'``); files are written atomically.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from ditq_compiler.atomic import replacing
from ditq_compiler import meta

BEFORE, AFTER = "#8a939c", "#2f6fd6"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("compiled.plot needs matplotlib: pip install 'ditq-compiler[plot]'") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_layer(stats, title: str, path: Path) -> Path:
    plt = _pyplot()
    sides = [("before", BEFORE, "before the transformations"), ("after", AFTER, "after (quantizer input)")]
    if not bool(stats.transformed):
        sides = [("after", AFTER, "input (no transformations)")]
    fig, (ranges, hist, channels) = plt.subplots(1, 3, figsize=(15, 3.6))
    steps = range(len(stats.timesteps))
    for side, colour, label in sides:
        lo, hi, mean = (getattr(stats, f"{side}_{k}").numpy() for k in ("min", "max", "mean"))
        ranges.fill_between(steps, lo, hi, color=colour, alpha=0.35, label=label)
        ranges.plot(steps, mean, color=colour, linestyle="--", linewidth=1)
        edges = stats.hist_edges.numpy()
        hist.stairs(getattr(stats, f"hist_{side}").numpy(), edges, color=colour, fill=True, alpha=0.5, label=label)
        c_lo, c_hi = getattr(stats, f"channel_{side}_min").numpy(), getattr(stats, f"channel_{side}_max").numpy()
        channels.vlines(range(len(c_lo)), c_lo, c_hi, color=colour, alpha=0.6, linewidth=0.8, label=label)
    ticks = list(steps)[:: max(1, len(stats.timesteps) // 6)]
    ranges.set_xticks(ticks, [f"{stats.timesteps[i]:.0f}" for i in ticks])
    ranges.set(title="range per timestep (band: min..max, dashed: mean)", xlabel="timestep (sampling order)")
    hist.set(title="histogram of all values", yscale="log", xlabel="value")
    channels.set(title="range per input channel", xlabel="channel")
    ranges.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path


def plot_activations(compiled, out_dir: str | Path, layers: Iterable[str] | None = None) -> list[Path]:
    """Write one PNG per quantized layer (or per layer named in ``layers``); returns their paths."""
    sources = {meta.get(n).annotation.name: meta.get(n).source_node for n in compiled.reference_graph_module.graph.nodes
               if meta.get(n).source_node is not None and meta.get(n).annotation is not None}
    wanted = list(sources) if layers is None else list(layers)
    unknown = [name for name in wanted if name not in sources]
    if unknown:
        raise KeyError(f"no quantized layer named {unknown[0]!r}; layers: {', '.join(sources)}")
    if not compiled.activation_stats:
        raise ValueError("this model has no activation statistics (it was compiled without calibration data)")
    paths = []
    for name in wanted:
        stats = compiled.activation_stats[sources[name]]
        report = next((r for r in compiled.layers if r.name == name), None)
        title = name if report is None else \
            f"{name} ({report.role}, {report.activations}; {report.transforms or 'no transforms'})"
        paths.append(plot_layer(stats, title, Path(out_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"))
    return paths


__all__ = ["plot_activations", "plot_layer"]
