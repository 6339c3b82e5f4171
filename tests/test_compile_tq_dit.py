"""TQ-DiT end to end: dit-digits compiled with the tq-dit recipes (a reduced candidate grid to stay fast)."""

import dataclasses

import pytest
import torch
from torch import fx

import ditq_compiler as dq
from ditq_compiler import zoo
from ditq_compiler.calibration import CalibrationError, from_sampler
from ditq_compiler.quant.multi_region import softmax_two_region
from ditq_compiler.toy import small_pixart
from ditq_compiler import meta

ops = torch.ops.ditq


def _recipe(name="tq-dit-w6a6", **sections):
    recipe = dq.Recipe.from_dict({**dq.Recipe.load(name).to_dict(), **sections})
    return dataclasses.replace(recipe, scale_search=dataclasses.replace(recipe.scale_search, eq_n=10, rounds=1))


@pytest.fixture(scope="module")
def digits_calibration():
    model, scheduler = zoo.load("dit-digits"), zoo.scheduler("dit-digits")
    calibration = from_sampler(model, scheduler, num_inference_steps=20, guidance_scale=2.0, num_trajectories=8,
                               selection="time_groups", groups=4, samples_per_group=10, batch_size=20,
                               progress=False)
    return model, calibration


@pytest.fixture(scope="module")
def compiled_w6a6(digits_calibration):
    model, calibration = digits_calibration
    return dq.compile(model, _recipe(time_groups={"groups": 4, "sites": ["post_softmax"]}), calibration=calibration,
                      progress=False)


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def test_graph_holds_the_tq_dit_quantizers_and_reexports(compiled_w6a6, digits_calibration):
    gm = compiled_w6a6.graph_module
    assert _count(gm, torch.ops.aten.scaled_dot_product_attention.default) == 0
    assert _count(gm, ops.quant_softmax_mrq.default) == 6 and _count(gm, ops.quant_gelu_mrq.default) == 6
    assert _count(gm, ops.quant_act.default) == 18 and _count(gm, ops.quant_linear.default) == 36
    grouped = [n for n in gm.graph.nodes if meta.get(n).time_grouped]
    assert len(grouped) == 6 and all(n.target is ops.quant_softmax_mrq.default for n in grouped)
    assert compiled_w6a6.output_sqnr_db > 12       # W6A6 with the attention matmuls quantized too
    args, kwargs = next(iter(digits_calibration[1]))
    inputs = compiled_w6a6.captured.bind(args, kwargs)
    program = torch.export.export(gm, (), inputs)
    assert _count(program.graph_module, ops.quant_softmax_mrq.default) == 6
    torch.testing.assert_close(program.module()(**inputs)[0], compiled_w6a6(*args, **kwargs).sample, rtol=0, atol=0)


def test_the_summary_shows_regions_and_time_groups_per_site(compiled_w6a6):
    text = compiled_w6a6.summary()
    assert "activation sites:" in text and "time groups (by timestep): 0: t <= " in text
    lines = text.splitlines()
    softmax = [line for line in lines if "matmul_pv  P" in line]
    assert len(softmax) == 6 and all("int6 2-region" in line and "[0, 32 s1) step s1 | [32 s1, 1] step 1/32" in line
                                     and " 4 " in line for line in softmax)
    gelu = [line.lstrip("│ ") for line in lines if line.lstrip("│ ").startswith("transformer_blocks.0.ff.net.2")]
    assert "int6 2-region" in gelu[0] and "(sites)" in gelu[0]            # the layer table points to its site
    assert "[-32 s-, 0] step s- | [0, 31 s+] step s+" in gelu[1] and "s- " in gelu[1] and "s+ " in gelu[1]


class _SiteInputs(fx.Interpreter):
    def __init__(self, gm, name):
        super().__init__(gm)
        self.name, self.seen = name, None

    def run_node(self, node):
        if node.name == self.name:
            self.seen = (self.env[node.args[0]].clone(), self.env[node.args[1]].clone())
        return super().run_node(node)


def test_time_group_tables_are_used(compiled_w6a6, digits_calibration):
    """The same input at two timesteps in different groups is quantized with different parameters."""
    gm, calibration = compiled_w6a6.graph_module, digits_calibration[1]
    node = next(n for n in gm.graph.nodes if meta.get(n).time_grouped)
    s1 = getattr(gm, node.args[2].target)
    assert len(s1) == 4 and len(set(s1.tolist())) > 1
    x = calibration.inputs[:2]
    groups, probabilities = [], None
    for t in (10, 900):   # the ends of the sampler's range: groups 0 and 3
        recorder = _SiteInputs(gm, node.name)
        inputs = compiled_w6a6.captured.bind((x, torch.full((2,), t), torch.tensor([3, 10])), {})
        recorder.run(*torch.utils._pytree.tree_leaves(((), inputs)))
        probabilities = recorder.seen[0] if probabilities is None else probabilities
        groups.append(recorder.seen[1])
    assert groups[0].tolist() == [0, 0] and groups[1].tolist() == [3, 3]
    quantized = [node.target(probabilities, g, s1, 6) for g in groups]
    assert not torch.equal(quantized[0], quantized[1])
    for g, q in zip((0, 3), quantized, strict=True):
        assert torch.equal(q, softmax_two_region(probabilities, s1[g], 6))


def test_one_time_group_equals_the_ungrouped_path(digits_calibration):
    model, calibration = digits_calibration
    one = dq.compile(model, _recipe(time_groups={"groups": 1, "sites": ["post_softmax", "post_gelu"]}),
                     calibration=calibration, progress=False)
    ungrouped = dq.compile(model, _recipe(time_groups=None), calibration=calibration, progress=False)
    assert not any(meta.get(n).time_group_index for n in one.graph_module.graph.nodes)
    assert one.graph_module.code == ungrouped.graph_module.code
    for name, value in ungrouped.graph_module.named_buffers():
        assert torch.equal(value, one.graph_module.get_buffer(name)), name
    x = torch.randn(4, 1, 8, 8)
    for t in (5, 500, 995):
        args = (x, torch.full((4,), t), torch.tensor([1, 2, 10, 10]))
        assert torch.equal(one(*args).sample, ungrouped(*args).sample)


def test_the_hessian_metric_needs_a_calibration_set_that_carries_the_noise(digits_calibration):
    model, calibration = digits_calibration
    with pytest.raises(CalibrationError, match="use dq.calibration.from_sampler"):
        dq.compile(model, _recipe(), calibration=list(calibration), progress=False)


def test_cross_attention_sites_on_pixart_compile_and_reexport():
    """PixArt's self- and cross-attention, every site time-grouped whose input depends on the timestep (not the
    cross-attention's k and v, which read only the caption); the plain output MSE needs no noise."""
    g = torch.Generator().manual_seed(0)
    batches = [((), dict(hidden_states=torch.randn(4, 4, 8, 8, generator=g),
                         encoder_hidden_states=torch.randn(4, 4, 24, generator=g),
                         timestep=torch.randint(0, 1000, (4,), generator=g),
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None})) for _ in range(3)]
    recipe = _recipe("tq-dit-w8a8", time_groups={"groups": 2, "sites": ["post_softmax", "attention_operands",
                                                                       "post_gelu", "linear_inputs"]})
    recipe = dataclasses.replace(recipe, scale_search=dataclasses.replace(recipe.scale_search, metric="mse"))
    compiled = dq.compile(small_pixart(), recipe, calibration=batches, progress=False)
    gm = compiled.graph_module
    assert _count(gm, ops.quant_softmax_mrq.default) == 2                 # self- and cross-attention
    cross = [s for s in compiled.sites if s.layer.endswith("attn2.matmul_pv")]
    assert [s.operand for s in cross] == ["P", "v"]
    caption_only = {"attn2.matmul_qk": "k^T", "attn2.matmul_pv": "v", "attn2.to_k": "input", "attn2.to_v": "input"}
    for site in compiled.sites:
        ungrouped = caption_only.get(site.layer.removeprefix("transformer_blocks.0.")) == site.operand
        assert site.groups == (1 if ungrouped else 2), (site.layer, site.operand)
    assert compiled.output_sqnr_db > 20
    inputs = compiled.captured.bind(*batches[0])
    program = torch.export.export(gm, (), inputs)
    torch.testing.assert_close(program.module()(**inputs)[0], gm(**inputs)[0], rtol=0, atol=0)
