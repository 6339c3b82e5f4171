"""Quantization-aware distillation: the BiDM+ loss, block outputs, training lowers the loss, and the
rewritten graph reproduces the trained student exactly (parity with the fake-quant reference)."""

import dataclasses

import pytest
import torch

import ditq_compiler as dq
from ditq_compiler.annotate import annotate
from ditq_compiler.capture import capture
from ditq_compiler.graph import analyse, module_path
from ditq_compiler.passes.insert_hadamard import InsertHadamard
from ditq_compiler.passes.quantize_linears import QuantizeLinears
from ditq_compiler.graph import unit_of
from ditq_compiler.graph import block_outputs
from ditq_compiler.train.distill import Distiller, salience_residual


def test_salience_residual_is_bidm_plus_eq_19():
    fp = torch.tensor([[1.0, -2.0, 3.0, 4.0]])
    q = torch.tensor([[1.5, -2.0, 2.0, 0.0]])
    error = torch.tensor([[0.5, 0.0, 1.0, 4.0]])
    torch.testing.assert_close(salience_residual(fp, q, leniency=0.0), fp.abs() * error)   # Eq. 18
    # 50th percentile (nearest rank, per sample) of |error| = 0.5: errors up to it are forgiven
    torch.testing.assert_close(salience_residual(fp, q, leniency=50.0), fp.abs() * (error - 0.5).clamp_min(0))
    two = salience_residual(torch.cat([fp, 10 * fp]), torch.cat([q, 10 * q]), 50.0)
    torch.testing.assert_close(two[1], 100 * two[0])                        # the percentile is per sample


def test_block_outputs_are_the_residual_stream_after_each_dit_block(dit):
    captured = capture(dit, None)
    analysis = analyse(captured.graph_module, captured.sample_input, captured.timestep_input)
    blocks = sorted({unit_of(i.name) for i in analysis.layers.values() if i.role in ("qkv", "fc2")})
    assert blocks == ["transformer_blocks.0", "transformer_blocks.1"]
    names = block_outputs(captured.graph_module, blocks, analysis.sample_dependent)
    nodes = {n.name: n for n in captured.graph_module.graph.nodes}
    assert [module_path(nodes[n]) for n in names] == blocks                 # one value per block
    assert all(nodes[n].meta["val"].shape[-1] == 128 for n in names)


def _setup(model, batches, recipe):
    captured = capture(model, batches[0])
    gm = captured.graph_module
    analysis = analyse(gm, captured.sample_input, captured.timestep_input)
    annotations = annotate(gm, analysis, recipe)
    layers = {n: i for n, i in analysis.layers.items() if i.role in recipe.rotation.roles}
    InsertHadamard(layers, {n: i.name for n, i in analysis.layers.items()})(gm)
    inputs = [captured.bind(a, k) for a, k in batches]
    return captured, gm, analysis, annotations, inputs


@pytest.mark.parametrize("block_weight", [0.0, 1.0])
def test_training_lowers_the_loss_and_the_rewritten_graph_matches_the_student(dit, dit_batches, block_weight):
    recipe = dq.Recipe.load("robuq-w1.58a4")
    spec = dataclasses.replace(recipe.distillation, iterations=40, batch_size=8, lr=1e-3, block_weight=block_weight)
    captured, gm, analysis, annotations, inputs = _setup(dit, dit_batches, recipe)
    distiller = Distiller(gm, annotations, {}, inputs, analysis.sample_dependent, with_blocks=block_weight > 0)
    assert len(distiller.student_taps) == (2 if block_weight else 0)
    before = distiller.evaluate(spec)
    distiller.train(spec, spec.iterations, progress=False)
    after = distiller.evaluate(spec)
    assert after < 0.8 * before
    result = distiller.result()
    assert set(result.weights) == set(annotations) and set(result.token_clips) == set(annotations)
    assert all(set(codes.unique().tolist()) <= {-1, 0, 1} for codes, _, _ in result.weights.values())
    assert any(abs(float(c) - 1.0) > 1e-3 for c in result.token_clips.values())       # clipping was learned
    # parity: the graph of ditq::quant_linear ops with the trained codes, clips and biases is the student
    quantized = QuantizeLinears(result)(gm).graph_module
    with torch.no_grad():
        for inputs_ in inputs[:2]:
            torch.testing.assert_close(quantized(**inputs_)[0], distiller.student(**inputs_)[0],
                                       atol=1e-5, rtol=1e-4)


def test_compile_distils_and_reports_the_time_and_never_touches_the_model(dit, dit_batches):
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    recipe = dq.Recipe.load("robuq-w1.58a4")
    recipe = dataclasses.replace(recipe, distillation=dataclasses.replace(recipe.distillation, iterations=20))
    compiled = dq.compile(dit, recipe, calibration=dit_batches[:2], progress=False)
    assert "distillation" in compiled.stage_seconds and "distillation" in compiled.summary()
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in before.items())
    text = compiled.summary()
    assert "ternary absmean per-channel" in text and "int4 asym per-token" in text and "dynamic x" in text
    ptq = dq.compile(dit, "w1.58a4-minmax", calibration=dit_batches[:2], progress=False)
    assert compiled.output_sqnr_db > ptq.output_sqnr_db
