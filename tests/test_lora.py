"""LoRA adapters: read from peft and diffusers layouts, fused before quantization, or a float branch that swaps."""

import pytest
import torch

import ditq_compiler as dq
from ditq_compiler import lora
from ditq_compiler.toy import random_dit_batches, small_dit

TARGETS = [f"transformer_blocks.{b}.{m}" for b in (0, 1)
           for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")]


def random_adapter(model, seed, rank=4, std=0.05):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module in TARGETS:
        linear = model.get_submodule(module)
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=g) * std
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=g) * std
    return state


def sqnr_db(reference, other):
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - other).pow(2).sum()))


@pytest.fixture(scope="module")
def setup():
    model, batches = small_dit(), random_dit_batches(count=3)
    base = dq.compile(model, "w8a8", calibration=batches[:2], progress=False)
    return model, batches, base


def output(model, batch):
    with torch.no_grad():
        return model(*batch[0], **batch[1]).sample


def test_both_state_dict_layouts_read_the_same_adapter(setup):
    model = setup[0]
    peft = random_adapter(model, 0)
    legacy = {k.replace("transformer.", "unet.").replace("lora_A", "lora.down").replace("lora_B", "lora.up"): v
              for k, v in peft.items()}
    a, b = lora.load(peft), lora.load(legacy)
    assert set(a.layers) == set(TARGETS) == set(b.layers)
    assert all(torch.equal(a.layers[m].delta, b.layers[m].delta) for m in TARGETS)
    with pytest.raises(lora.LoraError, match="not a module of DiTTransformer2DModel"):
        lora.check(model, lora.load({"nowhere.lora_A.weight": torch.zeros(2, 4),
                                     "nowhere.lora_B.weight": torch.zeros(4, 2)}))


def test_fused_and_branch_follow_fp_with_the_adapter_and_the_branch_swaps_without_recalibrating(setup, tmp_path):
    model, batches, base = setup
    first, second = random_adapter(model, 0), random_adapter(model, 1)
    held_out = batches[2]
    fp_first, fp_second = output(lora.fuse(model, lora.load(first)), held_out), \
        output(lora.fuse(model, lora.load(second)), held_out)
    assert sqnr_db(fp_first, output(model, held_out)) < 30          # the adapter changes the output

    fused = dq.compile(model, "w8a8", calibration=batches[:2], lora=first, progress=False)
    assert "fused into the weights" in fused.summary().head
    assert sqnr_db(fp_first, output(fused, held_out)) > 30

    path = lora.load(first).save(tmp_path / "first.safetensors")
    branch = dq.compile(model, "w8a8", calibration=batches[:2], lora=path, lora_mode="branch", progress=False)
    assert sqnr_db(fp_first, output(branch, held_out)) > 30
    # the branch reads the float input beside the quantized base: the same quantized graph as without LoRA
    without = lora.swap(branch, {k: v * 0 for k, v in first.items()})
    torch.testing.assert_close(output(without, held_out), output(base, held_out), rtol=0, atol=1e-6)
    lora.swap(branch, second)                                         # no recalibration
    assert sqnr_db(fp_second, output(branch, held_out)) > 30
    assert [r.name for r in branch.layers] == [r.name for r in base.layers]


def test_a_branch_on_a_transformed_input_is_refused(setup):
    model, batches, _ = setup
    recipe = dq.Recipe.load("ditq-w8a8")          # smoothing folds a division into the layers' inputs
    with pytest.raises(lora.LoraError, match="use lora_mode='fuse'"):
        dq.compile(model, recipe, calibration=batches[:2], lora=random_adapter(model, 0), lora_mode="branch",
                   progress=False)
