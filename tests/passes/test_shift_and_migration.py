"""fold_shift_into_bias and migrate_outliers: exact on the trained reference DiT, structure, negative cases."""

import pytest
import torch
from torch import fx

import ditq_compiler as dq
from ditq_compiler import zoo
from ditq_compiler.annotate import annotate
from ditq_compiler.calibration import from_sampler
from ditq_compiler.calibration.channel_stats import calibrate_transforms
from ditq_compiler.capture import capture
from ditq_compiler.calibration.data import flat_inputs, timestep_position
from ditq_compiler.pipeline import copy_graph
from ditq_compiler.graph import analyse
from ditq_compiler.passes.fold_shift_into_bias import FoldShiftIntoBias
from ditq_compiler.passes.migrate_outliers import MigrateOutliers
from ditq_compiler.pipeline import PassPipeline
from ditq_compiler import meta
from ditq_compiler.stages import transform_passes


@pytest.fixture(scope="module")
def reference():
    model, scheduler = zoo.load("dit-digits"), zoo.scheduler("dit-digits")
    calibration = from_sampler(model, scheduler, num_inference_steps=20, guidance_scale=2.0, num_trajectories=10,
                               steps=10, samples_per_step=4, batch_size=20, progress=False)
    return model, list(calibration)


def _prepared(model, batches, recipe):
    captured = capture(model, batches[0])
    gm = captured.graph_module
    annotations = annotate(gm, analyse(gm, captured.sample_input, captured.timestep_input), dq.Recipe.load(recipe)
                           if isinstance(recipe, str) else recipe)
    flat = [flat_inputs(captured.bind(a, k)) for a, k in batches]
    return captured, gm, annotations, flat


def _run(gm, flat):
    with torch.no_grad():
        return fx.Interpreter(gm).run(*flat)[0]


def _count(gm, target, shift_only=True):
    return sum(1 for n in gm.graph.nodes if n.target is target and (meta.get(n).shift or not shift_only))


def _max_relative_error(a, b):
    return float((a - b).abs().max() / a.abs().max())


def _plan_transforms(gm, annotations, recipe, flat, timestep_index, progress):
    return transform_passes(calibrate_transforms(gm, annotations, recipe, flat, timestep_index, progress))


def test_shift_and_migration_are_exact_on_reference_dit(reference):
    model, batches = reference
    captured, gm, annotations, flat = _prepared(model, batches, "taq-dit-w4a8")
    original = copy_graph(gm)
    shift, migrate = _plan_transforms(gm, annotations, dq.Recipe.load("taq-dit-w4a8"), flat,
                                     timestep_position(captured), progress=False)
    assert isinstance(shift, FoldShiftIntoBias) and isinstance(migrate, MigrateOutliers)
    fc2 = [n for n, a in annotations.items() if a.role == "fc2"]
    assert sorted(shift.shifts) == sorted(fc2) and len(fc2) == 6

    shifted = PassPipeline([shift], debug=True)(gm).graph_module
    assert _count(shifted, torch.ops.aten.sub.Tensor) == 6
    for batch in flat:
        assert _max_relative_error(_run(original, batch), _run(shifted, batch)) < 1e-5
    # every fc2 now reads the shifted value and its bias became b + W d
    nodes = {n.name: n for n in shifted.graph.nodes}
    for name in fc2:
        assert meta.get(nodes[name].args[0]).shift
        assert nodes[name].args[2].target == f"ditq_{name}_shifted_bias"

    migrated = PassPipeline([migrate], debug=True)(shifted).graph_module
    assert _count(migrated, torch.ops.aten.sub.Tensor) == 0
    assert _count(migrated, torch.ops.aten.addcmul.default) == 6
    assert any(bool((f > 1).any()) for f in migrate.factors.values())   # some channel was migrated
    for factors in migrate.factors.values():
        assert int((factors > 1).sum()) <= 11                           # top 2% of 512 channels
    for batch in flat:
        assert _max_relative_error(_run(original, batch), _run(migrated, batch)) < 1e-5


def test_shift_everywhere_is_exact_and_reaches_every_static_linear(reference):
    model, batches = reference
    recipe = dq.Recipe.from_dict({**dq.Recipe.load("taq-dit-w4a8").to_dict(), "migration": None,
                                  "shift": {"sites": "all", "statistic": "midrange"}})
    captured, gm, annotations, flat = _prepared(model, batches, recipe)
    original = copy_graph(gm)
    (shift,) = _plan_transforms(gm, annotations, recipe, flat, timestep_position(captured), progress=False)
    assert len(shift.shifts) == len(annotations) == 36
    shifted = PassPipeline([shift], debug=True)(gm).graph_module
    assert _count(shifted, torch.ops.aten.sub.Tensor) == 36
    for batch in flat:
        assert _max_relative_error(_run(original, batch), _run(shifted, batch)) < 1e-5


class ReluMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x, timestep):
        return self.fc2(torch.relu(self.fc1(x + timestep[:, None])))


def test_no_gelu_feeding_a_linear_leaves_the_graph_unchanged():
    torch.manual_seed(0)
    batches = [((torch.randn(4, 8), torch.rand(4)), {}) for _ in range(2)]
    captured, gm, annotations, flat = _prepared(ReluMLP(), batches, "taq-dit-w4a8")
    before = str(gm.graph)
    assert _plan_transforms(gm, annotations, dq.Recipe.load("taq-dit-w4a8"), flat, 1, progress=False) == []
    assert FoldShiftIntoBias({})(gm).modified is False and MigrateOutliers({})(gm).modified is False
    assert str(gm.graph) == before


def test_migration_without_a_shift_is_refused():
    torch.manual_seed(0)
    batches = [((torch.randn(4, 8), torch.rand(4)), {})]
    _, gm, _, _ = _prepared(ReluMLP(), batches, "w4a8")
    fc2 = [n.name for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default][-1]
    with pytest.raises(ValueError, match=f"layer node '{fc2}' has no shift in front of it"):
        MigrateOutliers({fc2: torch.ones(16)})(gm)
    with pytest.raises(ValueError, match="has shape \\(3,\\), the layer has 16 input channels"):
        FoldShiftIntoBias({fc2: torch.zeros(3)})(gm)


def test_taq_dit_compiled_graph_reexports_with_the_affine_in_place(reference):
    model, batches = reference
    import dataclasses

    recipe = dq.Recipe.load("taq-dit-w4a8")
    recipe = dataclasses.replace(recipe, reconstruction=dataclasses.replace(recipe.reconstruction, iterations=5))
    compiled = dq.compile(model, recipe, calibration=batches, progress=False)
    args, kwargs = batches[0]
    inputs = compiled.captured.bind(args, kwargs)
    program = torch.export.export(compiled.graph_module, (), inputs)
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count("aten.addcmul.default") == 6 and ops.count("ditq.quant_linear.default") == 36
    torch.testing.assert_close(program.module()(**inputs)[0], compiled(*args, **kwargs).sample)
