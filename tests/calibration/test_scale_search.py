"""The Hessian-guided scale search: loss gradients, the candidate grid, per-channel and per-group argmins."""

import dataclasses

import pytest
import torch

from ditq_compiler.activation_sites import ActivationSite
from ditq_compiler.calibration.batches import CalibrationError
from ditq_compiler.calibration.scale_search import (
    SiteQuantizer,
    WeightQuantizer,
    candidate_alphas,
    collect,
    search_scales,
)
from ditq_compiler.capture import capture
from ditq_compiler.quant import QuantSpec, fake_quantize, qparams_from_range
from ditq_compiler.recipe import ScaleSearchSpec

SPEC = QuantSpec(6, False, "tensor", axis=-1)


def _site(quantizer="uniform", grouped=False, kind="linear_input"):
    return ActivationSite("fc", 0, "fc", "input", kind, quantizer, SPEC, grouped)


def test_the_candidate_grid_is_the_authors_widest_first():
    alphas = candidate_alphas(ScaleSearchSpec())
    assert len(alphas) == 101 and alphas[0] == pytest.approx(1.2) and alphas[-1] == pytest.approx(0.01)
    assert torch.allclose(alphas.flip(0)[:3], torch.tensor([0.01, 0.0219, 0.0338]))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)

    def forward(self, x, timestep):
        return self.fc2(torch.relu(self.fc1(x)))


def test_collect_returns_inputs_outputs_and_the_gradient_of_the_diffusion_loss():
    model = MLP()
    x, noise = torch.randn(8, 6), torch.randn(8, 4)
    gm = capture(model, ((x, torch.zeros(8)), {})).graph_module
    fc1, fc2 = [n.name for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    batches = [[x[:5], torch.zeros(5)], [x[5:], torch.zeros(3)]]
    inputs, outputs, grads = collect(gm, {fc1: [0], fc2: [0]}, batches, [noise[:5], noise[5:]])
    h = model.fc1(x)
    y = model.fc2(torch.relu(h))
    grad_y = 2 * (y - noise)                                    # L = sum ||noise - y||^2 (Eq. 11)
    grad_h = (grad_y @ model.fc2.weight) * (h > 0)
    torch.testing.assert_close(inputs[(fc1, 0)], x)
    torch.testing.assert_close(outputs[fc2], y.detach())
    torch.testing.assert_close(grads[fc2], grad_y.detach())
    torch.testing.assert_close(grads[fc1], grad_h.detach())
    _, _, none = collect(gm, {fc1: [0]}, batches, None)         # the plain MSE needs no backward pass
    assert none == {}


def test_weight_search_is_the_per_channel_argmin_over_the_grid():
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(4, 16, generator=g), torch.randn(64, 16, generator=g)
    weight[0, 0] = 8.0                                          # one outlier: clipping it may pay off
    grad = torch.rand(64, 4, generator=g)
    y = x @ weight.T
    spec, alphas = QuantSpec(4, True, "channel"), candidate_alphas(ScaleSearchSpec(eq_n=20))

    def channel_errors(w):
        return ((grad * (x @ w.T - y)) ** 2).sum(0)

    searched = WeightQuantizer(weight, spec, alphas)
    searched.search(channel_errors)
    amax = weight.abs().amax(1)
    for c in range(4):
        errors = []
        for a in alphas:
            s, z = qparams_from_range(-a * amax[c], a * amax[c], spec)
            w = weight.clone()
            w[c] = fake_quantize(weight[c:c + 1], s.reshape(1), z.reshape(1), spec)[0]
            errors.append(float(channel_errors(w)[c]))
        best = min(range(len(errors)), key=lambda i: (errors[i], i))
        torch.testing.assert_close(searched.scale[c], (alphas[best] * amax[c] / spec.qmax).float())


def test_site_search_is_the_argmin_and_the_gradient_decides_it():
    """An outlier on rows whose output gradient is zero: the Hessian-weighted error clips it, the plain one not."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g)
    x[0, 0], x[0, 1] = 60.0, -60.0
    weight = torch.eye(8)
    grad_hessian = torch.ones(40, 8)
    grad_hessian[0] = 0.0                                       # the loss does not care about row 0
    alphas = candidate_alphas(ScaleSearchSpec())
    chosen = {}
    for name, grad in (("mse", None), ("hessian", grad_hessian)):
        site = SiteQuantizer(_site(), x, None, 1, alphas)

        def evaluator(rows, grad=grad):
            def score(value):
                residual = value @ weight.T - x[rows]
                return float(((residual if grad is None else grad[rows] * residual) ** 2).sum())
            return score

        site.search(evaluator)
        brute = [evaluator(slice(None))(site._apply(x, {"scale": s, "zero_point": z.float()}))
                 for s, z in zip(*qparams_from_range(alphas * x.min(), alphas * x.max(), SPEC), strict=True)]
        assert site.tables["scale"][0] == qparams_from_range(alphas * x.min(), alphas * x.max(), SPEC)[0][
            min(range(len(brute)), key=lambda i: (brute[i], i))]
        chosen[name] = float(site.tables["scale"][0])
    assert chosen["hessian"] < 0.3 * chosen["mse"]


def test_each_time_group_is_searched_on_its_own_rows():
    x = torch.cat([torch.rand(20, 1, 8) * 0.1, torch.rand(20, 1, 8)])   # group 0: small values, group 1: large
    row_groups = torch.tensor([0] * 20 + [1] * 20)
    site = SiteQuantizer(_site("softmax_mrq", True, "post_softmax"), x, row_groups, 2, candidate_alphas(
        ScaleSearchSpec()))
    site.search(lambda rows: (lambda value: float(((value - x[rows]) ** 2).sum())))
    s1 = site.tables["s1"]
    assert s1[0] < s1[1]                                        # the small-valued group gets the finer step
    for group, rows in ((0, slice(0, 20)), (1, slice(20, 40))):
        one = SiteQuantizer(_site("softmax_mrq", False, "post_softmax"), x[rows], None, 1, site.alphas)
        one.search(lambda r, rows=rows: (lambda value: float(((value - x[rows][r]) ** 2).sum())))
        assert one.tables["s1"][0] == s1[group]
    assert torch.equal(site.current[:20], site._apply(x[:20], {"s1": s1[0]}))


def test_gelu_sites_search_both_steps():
    x = torch.nn.functional.gelu(torch.randn(50, 16, generator=torch.Generator().manual_seed(1)) * 2)
    site = SiteQuantizer(_site("gelu_mrq", kind="post_gelu"), x, None, 1, candidate_alphas(ScaleSearchSpec()))
    start = {k: v.clone() for k, v in site.tables.items()}
    site.search(lambda rows: (lambda value: float(((value - x[rows]) ** 2).sum())))
    assert site.tables["s_neg"][0] < 0.1 * site.tables["s_pos"][0]   # the short negative tail, a fine step
    assert site.tables["s_neg"][0] != start["s_neg"][0] and site.tables["s_pos"][0] != start["s_pos"][0]


def test_the_hessian_metric_needs_the_noise(planned_dit):
    captured, gm, annotations, plan, flat, _ = planned_dit(time_groups=None)
    spec = dataclasses.replace(ScaleSearchSpec(), eq_n=2, rounds=1)
    with pytest.raises(CalibrationError, match="needs the noise eps of each calibration input"):
        search_scales(gm, annotations, plan, flat, spec, None, 1, progress=False)
    with pytest.raises(CalibrationError, match="2 noise batches for 1 calibration batches"):
        search_scales(gm, annotations, plan, flat[:1], spec, [torch.zeros(4, 4, 8, 8)] * 2, 1, progress=False)
