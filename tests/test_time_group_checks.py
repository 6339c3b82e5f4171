"""Time groups that cannot work on the model or the calibration set: refused with the field, layers and
timesteps named, before any calibration, the model untouched; inputs that do not depend on the timestep
get the ungrouped quantizer."""

import pytest
import torch

import ditq_compiler as dq
from ditq_compiler import stages
from ditq_compiler import meta
from tests.test_bad_input import TimedMLP
from tests.test_compile import assert_unchanged, snapshot

ROLES = list(dq.recipe.ROLES)


def _recipe(name="int4-time-groups", sites=("post_gelu", "linear_inputs"), groups=2, **sections):
    """A4 per-tensor activations, time groups fitted by the plain-MSE search (a tiny grid: these models are toys)."""
    return dq.Recipe.from_dict({"name": name, "quantize_roles": ROLES,
                                "activations": {"bits": 4, "granularity": "tensor", "symmetric": False},
                                "scale_search": {"metric": "mse", "rounds": 1, "eq_n": 4},
                                "time_groups": {"groups": groups, "sites": list(sites)}, **sections})


def _batches(timesteps=((900, 500, 10), (700, 300, 100)), width=8):
    g = torch.Generator().manual_seed(0)
    return [((torch.randn(len(t), width, generator=g), torch.tensor(t)), {}) for t in timesteps]


@pytest.fixture
def no_calibration(monkeypatch):
    """Any calibration work is a test failure: the errors here must come first."""
    def started(*args, **kwargs):
        raise AssertionError("calibration started before the recipe/calibration error was raised")

    for name in ("calibrate_transforms", "search_scales", "observe_activations"):
        monkeypatch.setattr(stages, name, started)


class Untimed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class HalfTimed(torch.nn.Module):
    """``proj`` reads only the sample; the timestep is added after it, so fc1 and fc2 see it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.fc1, self.fc2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x, timestep):
        h = self.proj(x) + torch.sin(timestep.float()[:, None] / 300 * torch.arange(1, 9, dtype=torch.float32))
        return self.fc2(torch.nn.functional.gelu(self.fc1(h)))


def test_time_groups_on_a_model_without_a_timestep_input(no_calibration):
    model = Untimed()
    snap = snapshot(model)
    batches = [((torch.randn(3, 8),), {})]
    with pytest.raises(dq.RecipeError, match=r"^recipe\(int4-time-groups\)\.time_groups: Untimed has no timestep "
                                             r"input.*groups: 1"):
        dq.compile(model, _recipe(), calibration=batches, progress=False)
    assert_unchanged(model, snap)


def test_int4_per_tensor_time_groups_on_layers_whose_input_ignores_the_timestep(no_calibration):
    """The issue's example: TimedMLP takes a timestep but no layer's input depends on it."""
    model = TimedMLP()
    snap = snapshot(model)
    with pytest.raises(dq.RecipeError) as err:
        dq.compile(model, _recipe(), calibration=_batches(), progress=False)
    message = str(err.value)
    assert message.startswith("recipe(int4-time-groups).time_groups.sites[0]: 'post_gelu'"), message
    assert "none of them depends on the timestep input 'timestep' of TimedMLP" in message
    assert "same 4-bit tensor activations" in message and "'fc2' input (node linear_1, input gelu)" in message
    assert_unchanged(model, snap)


def test_a_listed_site_kind_none_of_whose_inputs_sees_the_timestep_is_named_with_its_layers(no_calibration):
    model = TimedMLP()
    recipe = _recipe(sites=("linear_inputs",))
    with pytest.raises(dq.RecipeError, match=r"^recipe\(int4-time-groups\)\.time_groups\.sites\[0\]: 'linear_inputs'"
                                             r".*'fc1' input \(node linear, input x\)"):
        dq.compile(model, recipe, calibration=_batches(), progress=False)


def test_a_listed_site_kind_the_graph_lacks_is_named(no_calibration):
    model = TimedMLP(torch.relu)   # no GELU: no post-GELU site
    with pytest.raises(dq.RecipeError, match=r"^recipe\(int4-time-groups\)\.time_groups\.sites\[0\]: 'post_gelu'.*"
                                             r"no fc2 layer.*remove 'post_gelu'"):
        dq.compile(model, _recipe(sites=("post_gelu",)), calibration=_batches(), progress=False)
    with pytest.raises(dq.RecipeError, match=r"^recipe\(mrq\)\.multi_region\.post_gelu: TimedMLP has no post-GELU "
                                             r"site.*post_gelu: false"):
        dq.compile(model, _recipe("mrq", groups=1, multi_region={"post_softmax": False}), calibration=_batches(),
                   progress=False)


def test_only_inputs_that_depend_on_the_timestep_are_time_grouped():
    compiled = dq.compile(HalfTimed(), _recipe(), calibration=_batches(((900, 500, 10), (700, 300, 100))),
                          progress=False)
    grouped = {s.layer: s.groups for s in compiled.sites}
    assert grouped == {"proj": 1, "fc1": 2, "fc2": 2}, grouped
    grouped_ops = [n for n in compiled.graph_module.graph.nodes if meta.get(n).time_grouped]
    assert len(grouped_ops) == 2


@pytest.mark.parametrize("timesteps, seen", [
    ((), "timesteps seen: none"),
    (((500, 500, 500), (500, 500, 500)), "has 1 distinct timestep \\(seen: 500\\)"),
    (((900, 10, 900), (10, 500, 10)), "has 3 distinct timesteps \\(seen: 10, 500, 900\\)"),
], ids=["empty", "one-timestep", "fewer-than-groups"])
def test_too_few_calibration_timesteps_for_the_groups(timesteps, seen, no_calibration):
    model = HalfTimed()
    snap = snapshot(model)
    recipe = _recipe(groups=4)
    with pytest.raises(dq.CalibrationError, match=r"^recipe\(int4-time-groups\)\.time_groups\.groups is 4.*" + seen):
        dq.compile(model, recipe, calibration=_batches(timesteps), progress=False)
    assert_unchanged(model, snap)
