"""Roles and activation sites on diffusers DiT, PixArt, UNet2D and UNet2DCondition graphs."""

from collections import Counter

import torch

from ditq_compiler.capture import capture
from ditq_compiler.graph import analyse
from ditq_compiler.toy import small_pixart, small_unet_condition


def roles_of(model, example=None):
    captured = capture(model, example)
    analysis = analyse(captured.graph_module, captured.sample_input, captured.timestep_input)
    return {info.name: info.role for info in analysis.layers.values()}, analysis


def test_dit_roles(dit):
    roles, analysis = roles_of(dit)
    block = "transformer_blocks.0"
    assert roles["pos_embed.proj"] == "patch_embed"
    assert roles[f"{block}.norm1.emb.timestep_embedder.linear_1"] == "embed"
    assert roles[f"{block}.norm1.emb.timestep_embedder.linear_2"] == "embed"
    assert roles[f"{block}.norm1.linear"] == "adaln"
    assert [roles[f"{block}.attn1.to_{x}"] for x in "qkv"] == ["qkv"] * 3
    assert roles[f"{block}.attn1.to_out.0"] == "attn_out"
    assert roles[f"{block}.ff.net.0.proj"] == "fc1"
    assert roles[f"{block}.ff.net.2"] == "fc2"
    assert roles["proj_out_1"] == "adaln"
    assert roles["proj_out_2"] == "final"
    assert Counter(roles.values())["qkv"] == 6
    assert sorted(analysis.sites.values()) == ["post_gelu", "post_gelu"]


def test_dit_timestep_dependence(dit):
    _, analysis = roles_of(dit)
    layers = {info.name: info for info in analysis.layers.values()}
    assert layers["transformer_blocks.0.norm1.linear"].timestep_dependent
    assert layers["transformer_blocks.0.attn1.to_q"].timestep_dependent  # modulated by adaLN
    assert not layers["pos_embed.proj"].timestep_dependent


def test_pixart_roles_including_cross_attention():
    roles, analysis = roles_of(small_pixart())
    assert roles["pos_embed.proj"] == "patch_embed"
    assert roles["adaln_single.emb.timestep_embedder.linear_2"] == "embed"
    assert roles["adaln_single.linear"] == "adaln"
    assert roles["caption_projection.linear_1"] == roles["caption_projection.linear_2"] == "embed"
    for attn in ("attn1", "attn2"):
        assert [roles[f"transformer_blocks.0.{attn}.to_{x}"] for x in "qkv"] == ["qkv"] * 3
        assert roles[f"transformer_blocks.0.{attn}.to_out.0"] == "attn_out"
    assert roles["transformer_blocks.0.ff.net.2"] == "fc2"
    assert roles["proj_out"] == "final"
    cross_k = next(i for i in analysis.layers.values() if i.name == "transformer_blocks.0.attn2.to_k")
    assert not cross_k.timestep_dependent  # keys of the caption do not see the timestep


def test_unet2d_roles(unet):
    roles, _ = roles_of(unet)
    assert roles["conv_in"] == "conv"  # stride 1: not a patchify
    assert roles["time_embedding.linear_1"] == roles["time_embedding.linear_2"] == "embed"
    assert roles["down_blocks.0.resnets.0.time_emb_proj"] == "adaln"
    assert roles["down_blocks.0.resnets.0.conv1"] == "conv"
    assert [roles[f"mid_block.attentions.0.to_{x}"] for x in "qkv"] == ["qkv"] * 3
    assert roles["mid_block.attentions.0.to_out.0"] == "attn_out"
    assert roles["conv_out"] == "final"


def test_unet2d_condition_roles_with_geglu():
    roles, analysis = roles_of(small_unet_condition())
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert roles[f"{block}.attn2.to_k"] == "qkv"
    assert roles[f"{block}.ff.net.0.proj"] == "fc1"  # GEGLU projection
    assert roles[f"{block}.ff.net.2"] == "fc2"
    assert roles["down_blocks.0.resnets.0.time_emb_proj"] == "adaln"
    assert roles["conv_out"] == "final"
    assert Counter(analysis.sites.values())["post_gelu"] == 4


class DecomposedAttentionBlock(torch.nn.Module):
    """Attention written out as matmul -> softmax -> matmul, then an MLP."""

    def __init__(self, dim=16):
        super().__init__()
        self.q, self.k, self.v, self.out = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x, timestep):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / 4.0
        h = x + self.out(scores.softmax(-1) @ self.v(x))
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))


def test_decomposed_attention_marks_post_softmax():
    example = ((torch.randn(2, 5, 16), torch.tensor([1, 2])), {})
    roles, analysis = roles_of(DecomposedAttentionBlock(), example)
    assert [roles[x] for x in ("q", "k", "v", "out", "fc1", "fc2")] == [
        "qkv", "qkv", "qkv", "attn_out", "fc1", "fc2"]
    assert sorted(analysis.sites.values()) == ["post_gelu", "post_softmax"]
