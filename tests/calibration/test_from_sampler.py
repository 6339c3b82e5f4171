"""Calibration sets recorded from the FP sampler (ditq_compiler.calibration.from_sampler)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

import ditq_compiler as dq
from ditq_compiler.calibration import CalibrationSet, from_sampler
from ditq_compiler.calibration.sampler import config_null_class
from ditq_compiler.sampling import make_scheduler, sample

STEPS = 10          # sampler steps
TRAJECTORIES = 4
NULL = 10


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000)


def _uniform(model, scheduler, **overrides):
    args = dict(num_inference_steps=STEPS, num_trajectories=TRAJECTORIES, steps=5, samples_per_step=3,
                batch_size=4, guidance_scale=1.0, progress=False) | overrides
    return from_sampler(model, scheduler, **args)


@pytest.fixture(scope="module")
def uniform_set(dit, scheduler):
    return _uniform(dit, scheduler)


def _tensors(cal: CalibrationSet) -> dict[str, torch.Tensor]:
    return dict(inputs=cal.inputs, timesteps=cal.timesteps, class_labels=cal.class_labels, step_index=cal.step_index)


def test_uniform_selection_counts(uniform_set, scheduler):
    cal = uniform_set
    assert cal.num_samples == 5 * 3 and cal.inputs.shape == (15, 4, 8, 8)
    steps, counts = cal.step_index.unique(return_counts=True)
    assert steps.tolist() == [0, 2, 4, 7, 9] and counts.tolist() == [3] * 5
    sampler_timesteps = make_scheduler(scheduler, "ddpm", STEPS).timesteps
    assert torch.equal(cal.timesteps, sampler_timesteps[cal.step_index])
    assert not torch.equal(cal.step_index, cal.step_index.sort().values)   # shuffled across steps
    assert cal.sample_name == "hidden_states" and cal.selection["selection"] == "uniform"


def test_iterates_as_model_calls(uniform_set, dit):
    batches = list(uniform_set)
    assert len(batches) == len(uniform_set) == 4
    assert [len(kwargs["timestep"]) for _, kwargs in batches] == [4, 4, 4, 3]
    args, kwargs = batches[0]
    assert args == () and set(kwargs) == {"hidden_states", "timestep", "class_labels"}
    assert dit(**kwargs).sample.shape == kwargs["hidden_states"].shape


def test_records_exactly_what_the_sampler_feeds_the_model(dit, scheduler):
    cal = _uniform(dit, scheduler, steps=STEPS, samples_per_step=2 * TRAJECTORIES, guidance_scale=2.0, seed=5)
    seen = []
    sample(dit, scheduler, torch.arange(TRAJECTORIES) % 10, num_inference_steps=STEPS, guidance_scale=2.0,
           shape=(4, 8, 8), seed=5, progress=False, record=lambda step, t, x, y, out: seen.append((x, y)))
    assert cal.num_samples == STEPS * 2 * TRAJECTORIES
    recorded = {(bytes(x.numpy()), int(y)) for xs, ys in seen for x, y in zip(xs, ys, strict=True)}
    selected = {(bytes(x.numpy()), int(y)) for x, y in zip(cal.inputs, cal.class_labels, strict=True)}
    assert selected == recorded
    assert int((cal.class_labels == NULL).sum()) == STEPS * TRAJECTORIES    # the null-class half is recorded


def test_time_groups_are_contiguous_and_inside_their_ranges(dit, scheduler):
    cal = from_sampler(dit, scheduler, num_inference_steps=STEPS, num_trajectories=TRAJECTORIES,
                       selection="time_groups", groups=3, samples_per_group=5, batch_size=4, guidance_scale=1.0,
                       progress=False)
    assert cal.num_samples == 3 * 5
    for rows, (first, last) in zip(cal.step_index.split(5), [(0, 3), (4, 6), (7, 9)], strict=True):
        assert rows.min() >= first and rows.max() <= last
        assert torch.equal(rows, rows.sort().values)      # in step order within a group
    assert cal.selection | {"groups": 3, "samples_per_group": 5} == cal.selection


def test_guided_records_include_the_null_class(dit, scheduler):
    cal = from_sampler(dit, scheduler, num_inference_steps=STEPS, num_trajectories=TRAJECTORIES,
                       guidance_scale=4.0, selection="time_groups", groups=2, samples_per_group=20, progress=False)
    assert (cal.class_labels == NULL).any() and (cal.class_labels != NULL).any()
    unguided = from_sampler(dit, scheduler, num_inference_steps=STEPS, num_trajectories=TRAJECTORIES,
                            selection="time_groups", groups=2, samples_per_group=20, guidance_scale=1.0,
                            progress=False)
    assert not (unguided.class_labels == NULL).any()


def test_deterministic_under_seed(uniform_set, dit, scheduler):
    again = _uniform(dit, scheduler)
    for name, tensor in _tensors(uniform_set).items():
        assert torch.equal(tensor, getattr(again, name)), name
    other = _uniform(dit, scheduler, seed=1)
    assert not torch.equal(other.inputs, uniform_set.inputs)           # the sampler's noise follows the seed
    assert not torch.equal(other.step_index, uniform_set.step_index)   # and so do the selection's draws


def test_too_few_recorded_samples_warns_and_takes_all(dit, scheduler):
    with pytest.warns(UserWarning, match=r"step 0 \(4 of 100\), step 9 \(4 of 100\)"):
        cal = _uniform(dit, scheduler, steps=2, samples_per_step=100)
    assert cal.num_samples == 2 * TRAJECTORIES


def test_explicit_labels_and_unet_defaults(unet, scheduler):
    cal = from_sampler(unet, scheduler, num_inference_steps=4, class_labels=[3, 3, 7], steps=2, samples_per_step=3,
                       guidance_scale=1.0, progress=False)
    assert cal.sample_name == "sample" and cal.inputs.shape == (6, 1, 8, 8)
    assert sorted(cal.class_labels.tolist()) == [3, 3, 3, 3, 7, 7]


def test_save_load_round_trip(uniform_set, tmp_path):
    path = tmp_path / "calibration.safetensors"
    uniform_set.save(path)
    loaded = CalibrationSet.load(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]       # no temporary file left behind
    for name, tensor in _tensors(uniform_set).items():
        assert torch.equal(getattr(loaded, name), tensor) and getattr(loaded, name).dtype == tensor.dtype, name
    assert (loaded.sample_name, loaded.batch_size, loaded.selection) == \
        (uniform_set.sample_name, uniform_set.batch_size, uniform_set.selection)


def test_load_rejects_broken_files(uniform_set, tmp_path):
    metadata = {"format": "ditq-calibration-set", "version": "1", "sample_name": "hidden_states", "batch_size": "4"}
    tensors = _tensors(uniform_set)
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "step_index"}, str(missing), metadata=metadata)
    with pytest.raises(ValueError, match="missing step_index"):
        CalibrationSet.load(missing)
    short = tmp_path / "short.safetensors"
    save_file(tensors | {"timesteps": tensors["timesteps"][:-1].clone()}, str(short), metadata=metadata)
    with pytest.raises(ValueError, match="timesteps has 14 rows but inputs has 15"):
        CalibrationSet.load(short)
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, str(foreign))
    with pytest.raises(ValueError, match="not a ditq calibration set"):
        CalibrationSet.load(foreign)


def test_compile_with_a_sampler_calibration_set(uniform_set, dit):
    compiled = dq.compile(dit, "w8a8-minmax", calibration=uniform_set, progress=False)
    assert compiled.output_sqnr_db is not None and compiled.output_sqnr_db > 30
    _, kwargs = next(iter(uniform_set))
    assert torch.isfinite(compiled(**kwargs).sample).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(selection="random"), "'random'.*uniform.*time_groups"),
    (dict(steps=STEPS + 1), "steps=11"),
    (dict(selection="time_groups", groups=STEPS + 1), "groups=11"),
    (dict(samples_per_step=0), "samples_per_step"),
])
def test_invalid_arguments(dit, scheduler, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _uniform(dit, scheduler, **kwargs)


def test_shape_is_required_without_a_config(scheduler):
    class Bare(torch.nn.Module):
        def forward(self, x, timestep, class_labels):
            return torch.zeros_like(x)

    with pytest.raises(ValueError, match="pass shape"):
        from_sampler(Bare(), scheduler, num_inference_steps=2, steps=2, guidance_scale=1.0, progress=False)
    cal = from_sampler(Bare(), scheduler, num_inference_steps=2, num_trajectories=2, steps=2, samples_per_step=2,
                       shape=(2, 4, 4), guidance_scale=1.0, progress=False)
    assert cal.sample_name == "x" and cal.inputs.shape == (4, 2, 4, 4)


def test_each_row_carries_the_noise_that_pairs_it_with_its_trajectorys_final_sample(dit, scheduler):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, with x_0 the final sample of the row's trajectory."""
    labels = torch.arange(TRAJECTORIES) % 10
    cal = from_sampler(dit, scheduler, num_inference_steps=STEPS, class_labels=labels, guidance_scale=2.0,
                       selection="time_groups", groups=2, samples_per_group=STEPS * TRAJECTORIES, seed=3,
                       progress=False)
    final = sample(dit, scheduler, labels, num_inference_steps=STEPS, guidance_scale=2.0, shape=(4, 8, 8), seed=3,
                   progress=False)
    abar = scheduler.alphas_cumprod[cal.timesteps].reshape(-1, 1, 1, 1)
    x0 = (cal.inputs - (1 - abar).sqrt() * cal.noise) / abar.sqrt()
    matches = (x0[:, None] - final[None]).flatten(2).abs().amax(-1) < 1e-3    # (rows, trajectories)
    assert bool((matches.sum(1) == 1).all())                                   # every row: exactly one trajectory
    trajectory = matches.float().argmax(1)
    assert torch.equal(labels[trajectory][cal.class_labels != NULL], cal.class_labels[cal.class_labels != NULL])
    assert cal.noise_batches()[0].shape == (cal.batch_size, 4, 8, 8)
    assert torch.equal(torch.cat(cal.noise_batches()), cal.noise)


def test_noise_round_trips_and_files_without_it_still_load(uniform_set, tmp_path):
    assert uniform_set.noise is not None
    path = tmp_path / "calibration.safetensors"
    uniform_set.save(path)
    assert torch.equal(CalibrationSet.load(path).noise, uniform_set.noise)
    metadata = {"format": "ditq-calibration-set", "version": "1", "sample_name": "hidden_states", "batch_size": "4"}
    old = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in _tensors(uniform_set).items()}, str(old), metadata=metadata)
    loaded = CalibrationSet.load(old)
    assert loaded.noise is None and loaded.noise_batches() is None
    with pytest.raises(ValueError, match="noise must be a tensor of the inputs' shape"):
        CalibrationSet(**_tensors(uniform_set), sample_name="x", noise=uniform_set.noise[:3])


def test_guidance_is_not_guessed_and_the_null_class_comes_from_the_config(dit, unet, scheduler):
    with pytest.raises(ValueError, match="pass guidance_scale="):
        from_sampler(dit, scheduler, num_inference_steps=2, steps=2, progress=False)
    from diffusers import DiTTransformer2DModel

    imagenet_like = DiTTransformer2DModel(num_attention_heads=1, attention_head_dim=8, in_channels=1, num_layers=1,
                                          sample_size=4, patch_size=2, num_embeds_ada_norm=1000)
    cal = from_sampler(imagenet_like, scheduler, num_inference_steps=2, num_trajectories=2, steps=2,
                       samples_per_step=4, guidance_scale=2.0, progress=False)
    assert cal.selection["null_class"] == 1000 and cal.selection["guidance_scale"] == 2.0
    assert set(cal.class_labels.tolist()) == {0, 1, 1000}
    assert config_null_class(unet) == 10            # num_class_embeds=11: the last row
