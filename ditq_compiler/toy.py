"""Small random diffusers denoisers and calibration batches, built locally (nothing is downloaded).

Used by the demo, the tests and the benchmarks until the trained reference models
(``dq.zoo``) exist. Each factory is seeded, so every caller gets the same weights.
"""

from __future__ import annotations

import torch

Batch = tuple[tuple, dict]


def small_dit(seed: int = 0):
    """DiTTransformer2DModel: 2 blocks, 4 heads x 32, 8x8x4 input, patch 2, 10 classes."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=4, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def small_pixart(seed: int = 0):
    """PixArtTransformer2DModel: 1 block with self- and cross-attention, captions of width 24."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=32,
                                    caption_channels=24).eval()


def small_sd3(seed: int = 0):
    """SD3Transformer2DModel (MMDiT): 2 joint blocks of 2 heads x 16, 8x8x4 input, text of width 24, pooled 16."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8).eval()


def small_unet(seed: int = 0):
    """UNet2DModel with attention blocks, 1x8x8 input, 10 classes plus a null class."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
                       num_class_embeds=11, attention_head_dim=16).eval()


def small_unet_condition(seed: int = 0):
    """UNet2DConditionModel with cross-attention transformer blocks (GEGLU feed-forward)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8).eval()


def _random_batches(sample_name: str, channels: int, classes: int, count: int, batch_size: int,
                    seed: int) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [((), {sample_name: torch.randn(batch_size, channels, 8, 8, generator=g),
                  "timestep": torch.randint(0, 1000, (batch_size,), generator=g),
                  "class_labels": torch.randint(0, classes, (batch_size,), generator=g)})
            for _ in range(count)]


def random_dit_batches(count: int = 8, batch_size: int = 4, seed: int = 1) -> list[Batch]:
    return _random_batches("hidden_states", 4, 10, count, batch_size, seed)


def random_unet_batches(count: int = 8, batch_size: int = 4, seed: int = 1) -> list[Batch]:
    return _random_batches("sample", 1, 11, count, batch_size, seed)


def random_sd3_batches(count: int = 8, batch_size: int = 4, seed: int = 1, tokens: int = 5) -> list[Batch]:
    """Calls of ``small_sd3``: latents, text tokens, pooled text and timesteps."""
    g = torch.Generator().manual_seed(seed)
    return [((), {"hidden_states": torch.randn(batch_size, 4, 8, 8, generator=g),
                  "encoder_hidden_states": torch.randn(batch_size, tokens, 24, generator=g),
                  "pooled_projections": torch.randn(batch_size, 16, generator=g),
                  "timestep": torch.randint(0, 1000, (batch_size,), generator=g)})
            for _ in range(count)]
