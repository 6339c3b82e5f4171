import pytest
import torch

from ditq_compiler.capture import CaptureError, capture
from ditq_compiler.toy import small_pixart, small_unet_condition


def test_dit_timestep_stays_a_graph_input(dit, dit_batches):
    captured = capture(dit, dit_batches[0])
    placeholders = [n.name for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    assert captured.timestep_input == "timestep" and "timestep" in placeholders
    assert captured.sample_input == "hidden_states"
    timestep_users = [n for n in captured.graph_module.graph.nodes if n.op == "placeholder" and n.name == "timestep"]
    assert timestep_users[0].users, "the timestep placeholder must feed the graph"


def test_captured_graph_matches_model_and_other_batch_sizes(dit, dit_batches):
    captured = capture(dit, dit_batches[0])
    for batch in (1, 3):
        kwargs = {k: v[:batch] for k, v in dit_batches[1][1].items()}
        expected = dit(**kwargs).sample
        got = captured.graph_module(**captured.bind((), kwargs)).sample
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_python_number_timestep_becomes_a_tensor(dit, dit_batches):
    captured = capture(dit, dit_batches[0])
    kwargs = dict(dit_batches[0][1], timestep=500)
    got = captured.graph_module(**captured.bind((), kwargs)).sample
    expected = dit(**dict(kwargs, timestep=torch.full((4,), 500))).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory", [small_pixart, small_unet_condition])
def test_automatic_example_inputs_for_diffusers_models(factory):
    model = factory()
    captured = capture(model)
    assert captured.timestep_input == "timestep"
    assert any(n.op == "call_function" for n in captured.graph_module.graph.nodes)


def test_automatic_example_inputs_for_unet2d(unet):
    captured = capture(unet)
    assert captured.input_names == ("sample", "timestep", "class_labels")


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x, timestep):
        if x.sum() > 0:  # data-dependent control flow: cannot be captured
            return self.proj(x)
        return x


def test_export_failure_names_class_source_line_and_hint():
    with pytest.raises(CaptureError) as err:
        capture(DataDependent(), ((torch.randn(2, 4), torch.tensor([1, 2])), {}))
    message = str(err.value)
    assert "DataDependent" in message
    assert "test_capture.py:" in message  # the offending source line
    assert "hint" in message


def test_unknown_model_without_example_inputs_is_a_clear_error():
    with pytest.raises(CaptureError, match="example_inputs"):
        capture(DataDependent())
