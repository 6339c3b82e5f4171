"""The standalone activation quantizer ops: row selection by time group, semantics, fake kernels, re-export."""

import pytest
import torch

import ditq_compiler.activation_ops  # noqa: F401
from ditq_compiler.activation_ops import select_rows
from ditq_compiler.quant.multi_region import gelu_two_region, softmax_two_region, uniform

ops = torch.ops.ditq


def test_rows_are_selected_per_sample():
    table = torch.tensor([0.1, 0.2, 0.3])
    x = torch.zeros(4, 5, 6)
    rows = select_rows(table, torch.tensor([2, 0, 0, 1]), x)
    assert rows.shape == (4, 1, 1) and rows.flatten().tolist() == pytest.approx([0.3, 0.1, 0.1, 0.2])
    assert select_rows(torch.tensor([0.5]), None, x).shape == ()
    assert select_rows(table, torch.tensor(1), x).item() == pytest.approx(0.2)      # a scalar timestep


def test_bad_tables_and_group_indices_are_refused():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="a table of 3 time groups needs the group of each sample"):
        select_rows(torch.ones(3), None, x)
    with pytest.raises(ValueError, match="does not match a batch of 4"):
        select_rows(torch.ones(3), torch.zeros(2, dtype=torch.long), x)
    with pytest.raises(ValueError, match="1-D with one row per time group"):
        select_rows(torch.ones(2, 2), None, x)


def test_ops_compute_their_documented_semantics_per_group():
    g = torch.Generator().manual_seed(0)
    x, probs = torch.randn(3, 4, 8, generator=g), torch.rand(3, 4, 8, generator=g)
    group = torch.tensor([1, 0, 1])
    scale, zero_point = torch.tensor([0.05, 0.02]), torch.tensor([3, -2], dtype=torch.int32)
    s1, s_neg, s_pos = torch.tensor([0.004, 0.01]), torch.tensor([0.005, 0.002]), torch.tensor([0.1, 0.05])
    for b, row in enumerate(group.tolist()):
        assert torch.equal(ops.quant_act(x, group, scale, zero_point, 6)[b],
                           uniform(x[b], scale[row], zero_point[row], 6))
        assert torch.equal(ops.quant_softmax_mrq(probs, group, s1, 6)[b], softmax_two_region(probs[b], s1[row], 6))
        assert torch.equal(ops.quant_gelu_mrq(x, group, s_neg, s_pos, 6)[b],
                           gelu_two_region(x[b], s_neg[row], s_pos[row], 6))
    # a one-row table without a group is the static quantizer
    assert torch.equal(ops.quant_act(x, None, scale[:1], zero_point[:1], 6), uniform(x, scale[0], zero_point[0], 6))


class GroupedSoftmax(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("s1", torch.tensor([0.004, 0.01]))
        self.register_buffer("boundaries", torch.tensor([500.0]))

    def forward(self, scores, timestep):
        group = (timestep.unsqueeze(-1) > self.boundaries).sum(-1)
        return ops.quant_softmax_mrq(scores.softmax(-1), group, self.s1, 8)


def test_ops_trace_with_fake_kernels_and_export_with_a_dynamic_batch():
    module = GroupedSoftmax()
    scores, timestep = torch.randn(3, 2, 5, 5), torch.tensor([10, 900, 600])
    program = torch.export.export(module, (scores, timestep),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO}, {0: torch.export.Dim.AUTO}))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert ops.quant_softmax_mrq.default in targets
    fake = next(n for n in program.graph.nodes if n.target is ops.quant_softmax_mrq.default).meta["val"]
    assert tuple(fake.shape[1:]) == (2, 5, 5)
    other = torch.randn(5, 2, 5, 5), torch.tensor([0, 1, 999, 501, 499])
    torch.testing.assert_close(program.module()(*other), module(*other), rtol=0, atol=0)
