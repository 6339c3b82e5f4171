"""Choosing smoothing factors: SmoothQuant's rule, the alpha grid, and a search that never does worse than none."""

import pytest
import torch

import ditq_compiler as dq
from ditq_compiler.calibration.smoothing import coarse_alphas, fine_alphas, smoothing_factor, x_range
from ditq_compiler.toy import random_dit_batches, small_dit


def test_smoothing_factor_is_smoothquant_s_rule():
    x_max, w_max = torch.tensor([4.0, 1.0, 0.25]), torch.tensor([0.5, 2.0, 1.0])
    torch.testing.assert_close(smoothing_factor(x_max, w_max, 0.5), (x_max / w_max).sqrt())
    torch.testing.assert_close(smoothing_factor(x_max, w_max, 1.0), x_max)
    torch.testing.assert_close(smoothing_factor(x_max, w_max, 0.0), 1 / w_max)
    assert bool((smoothing_factor(torch.zeros(3), w_max, 0.5) > 0).all())     # a dead channel divides by no 0


@pytest.mark.parametrize("grid", [21, 22, 41])
def test_the_alpha_grid_has_at_least_grid_values_in_0_1_and_refines_around_the_best(grid):
    coarse = coarse_alphas(grid)
    fine = fine_alphas(grid, coarse[len(coarse) // 2])
    values = set(coarse) | set(fine)
    assert len(values) >= grid - 1 and all(0 <= a <= 1 for a in values)
    assert coarse[0] == 0 and coarse[-1] == 1
    step = coarse[1] - coarse[0]
    assert all(abs(a - coarse[len(coarse) // 2]) < step for a in fine)
    assert len(set(coarse) | set(fine_alphas(grid, 0.0))) < len(values)   # at an end, only the inside half


def test_x_range_max_and_mean_over_timesteps():
    x = torch.tensor([[[1.0, -2.0]], [[3.0, 0.5]], [[-4.0, 1.0]]])         # (samples, tokens, channels)
    timesteps = torch.tensor([10, 10, 20])
    torch.testing.assert_close(x_range(x, False, timesteps, "max"), torch.tensor([4.0, 2.0]))
    torch.testing.assert_close(x_range(x, False, timesteps, "mean"), torch.tensor([(3.0 + 4.0) / 2, (2.0 + 1.0) / 2]))


def test_the_search_never_does_worse_than_no_smoothing_and_records_what_it_chose():
    recipe = dq.Recipe.from_dict({"name": "w6a6-smooth", "weights": {"bits": 6}, "activations": {"bits": 6},
                                  "smoothing": {"metric": "mse"}})
    compiled = dq.compile(small_dit(), recipe, calibration=random_dit_batches(count=2), progress=False,
                          cache_dir=False)
    notes = [n.text for n in compiled.reports.notes if n.stage == "smoothing"]
    assert notes[0] == "4 input(s) smoothed, read by 8 layer(s)"
    applied = [e for n in compiled.graph_module.graph.nodes for e in dq.meta.get(n).applied
               if e["pass"] == "smooth_through_modulation"]
    assert len(applied) == 8 and all(-1 <= e["alpha"] <= 1 and e["s_min"] > 0 for e in applied)


def test_hessian_smoothing_without_calibration_noise_is_refused_before_any_work():
    recipe = dq.Recipe.from_dict({"name": "s", "smoothing": {"metric": "hessian"}})
    with pytest.raises(dq.CalibrationError, match=r"smoothing\.metric: 'hessian' .*from_sampler"):
        dq.compile(small_dit(), recipe, calibration=random_dit_batches(count=1), progress=False, cache_dir=False)


def test_smoothing_needs_quantized_activations_and_valid_fields():
    with pytest.raises(dq.RecipeError, match=r"recipe\.smoothing: needs quantized activations"):
        dq.Recipe.from_dict({"activations": False, "smoothing": True})
    with pytest.raises(dq.RecipeError, match=r"recipe\.smoothing\.grid: expected an integer in \[21, 1001\]"):
        dq.Recipe.from_dict({"smoothing": {"grid": 5}})
    with pytest.raises(dq.RecipeError, match=r"recipe\.smoothing\.sites\[0\]: expected"):
        dq.Recipe.from_dict({"smoothing": {"sites": ["adaln"]}})
    assert dq.Recipe.from_dict({"smoothing": {"alpha": 0.5}}).smoothing.alpha == 0.5
