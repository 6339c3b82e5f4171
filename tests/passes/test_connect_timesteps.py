"""BiDM+'s TES: a graph connected across sampler steps, its explicit state, and that state through ONNX Runtime."""

import pytest
import torch

import ditq_compiler as dq
from ditq_compiler import zoo
from ditq_compiler.calibration import from_sampler
from ditq_compiler.capture import capture
from ditq_compiler.graph import analyse, block_sites
from ditq_compiler.passes.connect_timesteps import ConnectTimesteps
from ditq_compiler.pipeline import PreconditionError, copy_graph
from ditq_compiler.sampling import sample
from ditq_compiler.toy import random_dit_batches, small_dit, small_unet
from ditq_compiler.trajectory import TrajectoryError, state_inputs, stateless_inputs

BIDM = {"name": "bidm-test", "weights": {"bits": 1, "binarizer": "fpb"}, "activations": {"bits": 1, "binarizer": "fpb"},
        "quantize_roles": ["qkv", "attn_out", "fc1", "fc2"], "timestep_connections": {},
        "distillation": {"iterations": 4, "batch_size": 8, "dm_weight": 1.0, "output_weight": 0.0,
                         "block_weight": 5e-4}}


@pytest.fixture(scope="module")
def connected():
    """A small DiT's graph with every block output connected, and one call of it."""
    call = random_dit_batches(count=1)[0]
    captured = capture(small_dit(), call)
    gm = captured.graph_module
    sites = block_sites(gm, analyse(gm, captured.sample_input, captured.timestep_input).sample_dependent)
    plain = copy_graph(gm)
    ConnectTimesteps(sites, captured.timestep_input, 10, 1000)(gm)
    return plain, gm, captured.bind(*call), sites


def test_the_sites_are_the_block_outputs_and_the_graph_gains_explicit_state(connected):
    plain, gm, _, sites = connected
    assert len(sites) == 2
    states = state_inputs(gm)
    assert [s.index for s in states] == [-1, 0, 1] and states[1].shape == (16, 128)
    with pytest.raises(PreconditionError, match="connected across timesteps already"):
        ConnectTimesteps(sites, "timestep", 10, 1000)(gm)


def test_the_first_step_rule_is_the_unconnected_model_and_a_previous_step_changes_the_output(connected):
    plain, gm, inputs, _ = connected
    with torch.no_grad():
        reference = plain(**inputs).sample
        first, _ = gm(**inputs, **stateless_inputs(state_inputs(gm), 4))
        assert torch.equal(first.sample, reference)
        noisier = {**inputs, "hidden_states": inputs["hidden_states"] * 1.5, "timestep": inputs["timestep"] + 10}
        _, states = gm(**noisier, **stateless_inputs(state_inputs(gm), 4))
        other = [s.flip(0) for s in states]   # the same input after another previous step
        continued = gm(**inputs, tes_valid=torch.ones(4), tes_state_0=states[0], tes_state_1=states[1])[0]
        elsewhere = gm(**inputs, tes_valid=torch.ones(4), tes_state_0=other[0], tes_state_1=other[1])[0]
    assert not torch.equal(continued.sample, reference) and not torch.equal(continued.sample, elsewhere.sample)


def test_zero_coefficients_are_exactly_the_unconnected_model(connected):
    plain, _, inputs, sites = connected
    gm = copy_graph(plain)
    ConnectTimesteps(sites, "timestep", 10, 1000, lambdas={s: torch.zeros(10) for s in sites})(gm)
    with torch.no_grad():
        _, states = gm(**inputs, **stateless_inputs(state_inputs(gm), 4))
        out = gm(**inputs, tes_valid=torch.ones(4), tes_state_0=states[0] + 3, tes_state_1=states[1] - 1)[0]
        assert torch.equal(out.sample, plain(**inputs).sample)


def test_a_u_net_connects_its_up_blocks():
    model = small_unet()
    call = ((), {"sample": torch.randn(2, 1, 8, 8), "timestep": torch.tensor([5, 9]),
                 "class_labels": torch.tensor([1, 2])})
    captured = capture(model, call)
    gm = captured.graph_module
    sites = block_sites(gm, analyse(gm, captured.sample_input, captured.timestep_input).sample_dependent)
    paths = {dq.graph.module_path(n) for n in gm.graph.nodes if n.name in sites}
    assert sites and all(p.startswith("up_blocks.") for p in paths)


@pytest.fixture(scope="module")
def bidm():
    model, scheduler = zoo.load("dit-digits"), zoo.scheduler("dit-digits")
    calibration = from_sampler(model, scheduler, num_inference_steps=10, guidance_scale=2.0, num_trajectories=8,
                               steps=5, samples_per_step=8, progress=False)
    compiled = dq.compile(model, dq.Recipe.from_dict(BIDM), calibration=calibration, progress=False, cache_dir=False)
    return compiled, scheduler, calibration


def test_a_compiled_trajectory_checks_its_order_and_a_new_one_starts_empty(bidm):
    compiled, _, calibration = bidm
    x, labels = calibration.inputs[:2], torch.tensor([1, 2])
    compiled.reset_trajectory()
    first = compiled(x, torch.tensor([500, 500]), labels).sample
    second = compiled(x, torch.tensor([400, 400]), labels).sample            # continues: has a previous step
    with pytest.raises(TrajectoryError, match=r"row 0 is called at timestep 600 after timestep 400.*reset_traj"):
        compiled(x, torch.tensor([600, 600]), labels)
    with pytest.raises(TrajectoryError, match=r"batch of 1 rows, the trajectory in progress has 2"):
        compiled(x[:1], torch.tensor([300]), labels[:1])
    compiled.reset_trajectory()
    fresh = compiled(x, torch.tensor([400, 400]), labels).sample
    assert not torch.equal(second, fresh)          # same input and timestep, another (no) previous step
    compiled.reset_trajectory()
    assert torch.equal(compiled(x, torch.tensor([500, 500]), labels).sample, first)


def test_onnx_runtime_threads_the_state_and_a_loaded_artifact_samples_the_same(bidm, tmp_path):
    """Along a 10-step trajectory, ONNX Runtime (its own state threaded through) gives each step's output within
    35 dB of the reference on the same inputs. (Run free, the two trajectories part: a float rounding difference
    that puts an activation on the other side of its threshold flips a sign, and a W1A1 model carries the
    flip on.)"""
    from ditq_compiler.backends.ort import OrtModel
    from ditq_compiler.quant import sqnr_db
    compiled, scheduler, _ = bidm
    settings = dict(num_inference_steps=10, guidance_scale=2.0, progress=False)
    calls = []
    reference = sample(compiled, scheduler, torch.arange(4), **settings,
                       record=lambda i, t, x, y, out: calls.append((x.clone(), t.clone(), y.clone(), out.clone())))
    ort = OrtModel(compiled.export_onnx(tmp_path / "bidm.onnx"), threads=1)
    ort.reset_trajectory()
    steps = [sqnr_db(out, ort(x, t, y).sample) for x, t, y, out in calls]
    assert len(steps) == 10 and min(steps) >= 35, steps
    compiled.save(tmp_path / "art")
    loaded = dq.load(tmp_path / "art")
    assert loaded.stateful and torch.equal(sample(loaded, scheduler, torch.arange(4), **settings), reference)


def test_in_a_pipeline_a_call_that_does_not_continue_the_run_starts_a_new_one(bidm):
    """A diffusers pipeline cannot reset the trajectory: its denoiser wrapper starts a new one when a call does not
    continue the one in progress (the next run's first, high timestep), so a second run equals the first."""
    from ditq_compiler.diffusers import CompiledDenoiser

    compiled, _, calibration = bidm
    denoiser = CompiledDenoiser(compiled)
    x, labels = calibration.inputs[:2], torch.tensor([1, 2])
    runs = [[denoiser(x, torch.tensor([t, t]), labels).sample for t in (500, 400, 300)] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    compiled.reset_trajectory()
    assert not torch.equal(runs[0][1], compiled(x, torch.tensor([400, 400]), labels).sample)   # state was used
