import pytest
import torch

import ditq_compiler as dq
from ditq_compiler.pipeline import fetch_attr
from ditq_compiler import meta

SHIFT = {"name": "w8a8-shift", "weights": {"observer": "minmax"}, "activations": {"observer": "minmax"}, "shift": {}}


@pytest.fixture(scope="module")
def shifted(dit, dit_batches):
    return dq.compile(dit, dq.Recipe.from_dict(SHIFT), calibration=dit_batches, progress=False)


def fc2_inputs(model, batches):
    """The FP model's fc2 inputs (post-GELU), straight from a forward hook on the original model."""
    seen = []
    handle = model.transformer_blocks[0].ff.net[2].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            for args, kwargs in batches:
                model(*args, **kwargs)
    finally:
        handle.remove()
    return seen


def test_before_is_the_models_own_activation_and_after_is_shifted(shifted, dit, dit_batches):
    node = next(n for n in shifted.graph_module.graph.nodes if meta.get(n).annotation is not None
                and meta.get(n).annotation.name == "transformer_blocks.0.ff.net.2")
    stats = shifted.activation_stats[meta.get(node).source_node]
    raw = fc2_inputs(dit, dit_batches)
    values = torch.cat([x.reshape(-1, x.shape[-1]) for x in raw])
    assert bool(stats.transformed)
    torch.testing.assert_close(stats.channel_before_min, values.amin(0))
    torch.testing.assert_close(stats.channel_before_max, values.amax(0))
    shift = fetch_attr(shifted.graph_module, node.args[0].args[1].target)      # the sub node's constant d
    torch.testing.assert_close(stats.channel_after_min, values.amin(0) - shift)
    assert int(stats.hist_before.sum()) == int(stats.hist_after.sum()) == values.numel()
    timesteps = torch.cat([kwargs["timestep"] for _, kwargs in dit_batches]).unique().double().flip(0)
    assert torch.equal(stats.timesteps, timesteps)                              # one entry per timestep, noisiest first
    assert float(stats.before_min.min()) == float(values.min()) and float(stats.before_max.max()) == float(values.max())


def test_without_transforms_before_and_after_are_the_same(compiled_dit_w8a8):
    for stats in compiled_dit_w8a8.activation_stats.values():
        assert not bool(stats.transformed)
        assert torch.equal(stats.hist_before, stats.hist_after) and torch.equal(stats.before_min, stats.after_min)
    assert len(compiled_dit_w8a8.activation_stats) == 12


def test_plot_writes_one_png_per_layer(shifted, tmp_path):
    pytest.importorskip("matplotlib")
    paths = shifted.plot(tmp_path, ["transformer_blocks.0.ff.net.2", "transformer_blocks.1.attn1.to_q"])
    assert [p.name for p in paths] == ["transformer_blocks.0.ff.net.2.png", "transformer_blocks.1.attn1.to_q.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    with pytest.raises(KeyError, match="no quantized layer named 'nope'"):
        shifted.plot(tmp_path, ["nope"])


def test_summary_is_a_rich_table_and_a_string(shifted):
    from rich.console import Console

    summary = shifted.summary()
    assert isinstance(summary, str) and "┃ layer" in summary and "12 of 23" in summary
    assert "shift" in summary and "transformer_blocks.1.ff.net.2" in summary
    console = Console(record=True, width=400, color_system="truecolor", force_terminal=True)
    console.print(summary)
    assert "\x1b[" in console.export_text(styles=True)                          # coloured SQNR cells on a terminal
