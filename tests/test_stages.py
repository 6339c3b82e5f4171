"""The stage list: compile() is the declared stages; a stage and a pass are added from outside the package."""

import inspect

import pytest
import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

import ditq_compiler as dq
from ditq_compiler import meta
from ditq_compiler.compiler import compile as compile_function
from ditq_compiler.pipeline import PassError, PreconditionError
from ditq_compiler.stages import CLOCKS, DEFAULT_STAGES, Stage, run_stages, with_stage
from ditq_compiler.toy import random_dit_batches, small_dit


class ScaleFc2Inputs(PassBase):
    """A toy exact rewrite, written outside the package: ``fc2(x) = fc2((2 x) / 2)``, with the two nodes
    marked as a transformation (the HTML view and the activation statistics see them)."""

    name = "scale_fc2_inputs"

    def requires(self, gm: fx.GraphModule) -> None:
        if not any(meta.get(n).annotation is not None for n in gm.graph.nodes):
            raise PreconditionError(f"{self.name}: the graph has no annotated layers (run after 'annotate')")

    def call(self, gm: fx.GraphModule) -> PassResult:
        layers = [n for n in gm.graph.nodes if meta.get(n).annotation is not None
                  and meta.get(n).annotation.role == "fc2"]
        for node in layers:
            x = node.args[0]
            with gm.graph.inserting_before(node):
                doubled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))
                halved = gm.graph.call_function(torch.ops.aten.div.Tensor, (doubled, 2.0))
            for new in (doubled, halved):
                new.meta["val"] = x.meta.get("val")
                meta.copy_location(new, node)
                meta.update(new, transform=self.name)
            node.args = (halved, *node.args[1:])
            meta.record_applied(node, self.name)
        gm.recompile()
        return PassResult(gm, bool(layers))


def scale_stage(state) -> None:
    state.run_passes(ScaleFc2Inputs())
    state.note("scale", f"{sum(1 for a in state.annotations.values() if a.role == 'fc2')} fc2 inputs scaled")


TOY_STAGES = with_stage(DEFAULT_STAGES, Stage("scale", scale_stage, lambda recipe: recipe.activations is not None),
                        after="annotate")


@pytest.fixture(scope="module")
def batches():
    return random_dit_batches(count=2)


def test_compile_runs_the_declared_stages_and_fits_on_a_screen():
    source = inspect.getsource(compile_function)
    body = source[source.index('    """', source.index('"""') + 3):].split('"""', 1)[1]   # after the docstring
    assert len(body.strip().splitlines()) <= 15, body
    assert "run_stages(state, stages)" in body and "for stage in stages" in inspect.getsource(run_stages)
    assert [s.name for s in DEFAULT_STAGES][:2] == ["check", "capture"]
    assert {s.column for s in DEFAULT_STAGES} == set(CLOCKS)


def test_a_stage_and_a_pass_added_from_outside_run_in_their_place(batches):
    model = small_dit()
    plain = dq.compile(model, "w8a8", calibration=batches, progress=False, cache_dir=False)
    toy = dq.compile(model, "w8a8", calibration=batches, progress=False, cache_dir=False, stages=TOY_STAGES)
    graph = toy.graph_module.graph
    marked = [n for n in graph.nodes if meta.get(n).transform == "scale_fc2_inputs"]
    assert len(marked) == 2 * 2                              # 2 blocks x (mul, div)
    assert "scale: 2 fc2 inputs scaled" in toy.summary()
    assert "scale" in toy.stage_seconds
    fc2 = [meta.get(n).source_node for n in graph.nodes
           if meta.get(n).source_node and meta.get(n).annotation.role == "fc2"]
    assert len(fc2) == 2 and all(name in toy.activation_stats for name in fc2)
    args, kwargs = batches[0]
    with torch.no_grad():                                    # (2 x) / 2 is x exactly in float
        assert torch.equal(plain(*args, **kwargs).sample, toy(*args, **kwargs).sample)


def test_a_disabled_stage_does_not_run(batches):
    weight_only = dq.Recipe.from_dict({"name": "w8-only", "activations": False})
    compiled = dq.compile(small_dit(), weight_only, calibration=batches, progress=False, cache_dir=False,
                          stages=TOY_STAGES)
    assert not any(meta.get(n).transform for n in compiled.graph_module.graph.nodes)
    assert "scale" not in compiled.stage_seconds


def test_a_pass_precondition_names_the_pass(batches):
    def too_early(state):
        state.run_passes(ScaleFc2Inputs())
    stages = with_stage(DEFAULT_STAGES, Stage("too early", too_early), before="annotate")
    with pytest.raises(PassError, match=r"pass 'scale_fc2_inputs' failed.*no annotated layers"):
        dq.compile(small_dit(), "w8a8", calibration=batches, progress=False, cache_dir=False, stages=stages)


def test_with_stage_refuses_an_unknown_anchor_or_a_duplicate_name():
    with pytest.raises(ValueError, match="naming a stage of"):
        with_stage(DEFAULT_STAGES, Stage("x", scale_stage), after="no such stage")
    with pytest.raises(ValueError, match="already in the list"):
        with_stage(DEFAULT_STAGES, Stage("capture", scale_stage), after="check")
