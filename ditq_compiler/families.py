"""The diffusers denoiser families the compiler is tested on, as tiny random models and pipelines.

Each ``Family`` names a diffusers denoiser class and builds, from seeded random weights and nothing
downloaded, a tiny instance of it (2-channel latents, one or two blocks, 8x8 latents or smaller),
calls of it shaped as its pipeline makes them, and that pipeline (``pipeline()``: the denoiser, a
one-block VAE and a scheduler; text encoders are left out, since calls pass ``prompt_embeds``).
``tests/test_families.py`` runs every family through compile, ONNX export and ``quantize_pipeline``;
the README's family table lists what each was tested for.

    from ditq_compiler.families import FAMILIES
    family = FAMILIES["flux"]
    model, calls = family.model(), family.calls()
    pipe = family.pipeline()                     # FluxPipeline(transformer=model, vae=..., scheduler=...)
    pipe(**family.pipeline_call())               # the arguments of one tiny generation

Building a text-conditioned pipeline needs ``transformers`` (diffusers imports it for those classes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Batch = tuple[tuple, dict]
LATENT = 2          # latent channels of every family
TEXT = 16           # width of the (made-up) text embeddings
TOKENS = 5          # text tokens per prompt


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


# ---- denoisers ---------------------------------------------------------------------------------------

def tiny_dit(seed: int = 0):
    """DiTTransformer2DModel: 1 block, 2 heads x 8, 8x8x2 latents, 1000 classes (null 1000), learned sigma."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=LATENT,
                                 out_channels=2 * LATENT, num_layers=1, sample_size=8, patch_size=2,
                                 num_embeds_ada_norm=1000).eval()


def tiny_pixart(seed: int = 0):
    """PixArtTransformer2DModel: 1 block, 2 heads x 8, 8x8x2 latents, captions of width 16."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=LATENT,
                                    out_channels=2 * LATENT, num_layers=1, sample_size=8, patch_size=2,
                                    cross_attention_dim=16, caption_channels=TEXT).eval()


def tiny_sd3(seed: int = 0):
    """SD3Transformer2DModel: 2 joint blocks (the last one's context pre-only), 2 heads x 8, 8x8x2 latents."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=LATENT, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=TEXT, caption_projection_dim=16,
                                 pooled_projection_dim=TEXT, out_channels=LATENT, pos_embed_max_size=8).eval()


def tiny_flux(seed: int = 0):
    """FluxTransformer2DModel: 1 double and 1 single block, 2 heads x 8, 2x2-packed 8x8x2 latents (16 tokens of 8)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT,
                                  pooled_projection_dim=TEXT, axes_dims_rope=(2, 2, 4)).eval()


def tiny_wan(seed: int = 0):
    """WanTransformer3DModel: 1 block, 2 heads x 8, video latents (B, 2, 2 frames, 8, 8), patch (1, 2, 2)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=LATENT,
                                 out_channels=LATENT, text_dim=TEXT, freq_dim=16, ffn_dim=32, num_layers=1,
                                 rope_max_seq_len=16).eval()


def tiny_unet(seed: int = 0):
    """UNet2DModel: one 16-channel level with attention, 8x8x2 input."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=LATENT, out_channels=LATENT, block_out_channels=(16,),
                       down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",), layers_per_block=1,
                       norm_num_groups=4, attention_head_dim=8).eval()


def tiny_unet_condition(seed: int = 0):
    """UNet2DConditionModel: one 16-channel level with cross-attention transformer blocks, no mid block, 8x8x2."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=LATENT, out_channels=LATENT, block_out_channels=(16,),
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                mid_block_type=None, layers_per_block=1, norm_num_groups=4, cross_attention_dim=TEXT,
                                attention_head_dim=8).eval()


# ---- calls, as each pipeline makes them --------------------------------------------------------------

def _flux_ids(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's position ids: (row, column) of each packed latent token, zeros for the text; no batch dim."""
    side = int(tokens ** 0.5)
    image = torch.zeros(tokens, 3)
    image[:, 1], image[:, 2] = torch.arange(tokens) // side, torch.arange(tokens) % side
    return image, torch.zeros(TOKENS, 3)


def _call(family: str, g: torch.Generator, b: int) -> dict[str, Any]:
    t = torch.randint(0, 1000, (b,), generator=g)
    text = _randn(g, b, TOKENS, TEXT)
    if family == "dit":
        return dict(hidden_states=_randn(g, b, LATENT, 8, 8), timestep=t, class_labels=torch.randint(0, 1000, (b,),
                                                                                                    generator=g))
    if family == "pixart":
        return dict(hidden_states=_randn(g, b, LATENT, 8, 8), encoder_hidden_states=text, timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if family == "sd3":
        return dict(hidden_states=_randn(g, b, LATENT, 8, 8), encoder_hidden_states=text,
                    pooled_projections=_randn(g, b, TEXT), timestep=t.float())
    if family == "flux":
        img_ids, txt_ids = _flux_ids(16)
        return dict(hidden_states=_randn(g, b, 16, 4 * LATENT), encoder_hidden_states=text,
                    pooled_projections=_randn(g, b, TEXT), timestep=t.float() / 1000, img_ids=img_ids, txt_ids=txt_ids)
    if family == "wan":
        return dict(hidden_states=_randn(g, b, LATENT, 2, 8, 8), timestep=t, encoder_hidden_states=text)
    if family == "unet":
        return dict(sample=_randn(g, b, LATENT, 8, 8), timestep=t)
    if family == "unet_condition":
        return dict(sample=_randn(g, b, LATENT, 8, 8), timestep=t, encoder_hidden_states=text)
    raise KeyError(family)


# ---- pipelines ---------------------------------------------------------------------------------------

def tiny_vae(latent_channels: int = LATENT, **config: Any):
    """AutoencoderKL with one 8-channel level: latents at the image's size."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=latent_channels,
                         norm_num_groups=4, sample_size=8, **config).eval()


def tiny_wan_vae():
    """AutoencoderKLWan with one level and no temporal downsampling beyond Wan's 4x: 5 frames -> 2 latent frames."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=4, z_dim=LATENT, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                            latents_mean=[0.0] * LATENT, latents_std=[1.0] * LATENT, scale_factor_spatial=2,
                            scale_factor_temporal=4).eval()


def _text(b: int, seed: int = 0, pooled: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embeds = {"prompt_embeds": _randn(g, b, TOKENS, TEXT), "negative_prompt_embeds": _randn(g, b, TOKENS, TEXT)}
    if pooled:
        embeds.update(pooled_prompt_embeds=_randn(g, b, TEXT), negative_pooled_prompt_embeds=_randn(g, b, TEXT))
    return embeds


def _pipeline(family: str, model: torch.nn.Module):
    import diffusers as d

    if family == "dit":
        return d.DiTPipeline(transformer=model, vae=tiny_vae(), scheduler=d.DDIMScheduler())
    if family == "pixart":
        return d.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=model,
                                     scheduler=d.DPMSolverMultistepScheduler())
    if family == "sd3":
        return d.StableDiffusion3Pipeline(transformer=model, scheduler=d.FlowMatchEulerDiscreteScheduler(),
                                          vae=tiny_vae(shift_factor=0.0), text_encoder=None, tokenizer=None,
                                          text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    if family == "flux":
        return d.FluxPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(shift_factor=0.0),
                              text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                              transformer=model)
    if family == "wan":
        return d.WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(),
                             scheduler=d.FlowMatchEulerDiscreteScheduler(), transformer=model)
    if family == "unet":
        return d.DDPMPipeline(unet=model, scheduler=d.DDPMScheduler(num_train_timesteps=100))
    if family == "unet_condition":
        return d.StableDiffusionPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=model,
                                         scheduler=d.DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
    raise KeyError(family)


def _pipeline_call(family: str, steps: int, seed: int) -> dict[str, Any]:
    """One tiny generation: 2 images (or videos) at 8x8, ``steps`` steps, guidance where the pipeline guides."""
    common = {"num_inference_steps": steps, "output_type": "np"}
    size = {"height": 8, "width": 8}
    if family == "dit":
        return {**common, "class_labels": [1, 7]}
    if family == "pixart":
        masks = {"prompt_attention_mask": torch.ones(2, TOKENS),
                 "negative_prompt_attention_mask": torch.ones(2, TOKENS)}
        return {**common, **size, **_text(2, seed), **masks, "negative_prompt": None, "use_resolution_binning": False}
    if family == "sd3":
        return {**common, **size, **_text(2, seed, pooled=True)}
    if family == "flux":
        text = _text(2, seed, pooled=True)
        return {**common, **size, "prompt_embeds": text["prompt_embeds"],
                "pooled_prompt_embeds": text["pooled_prompt_embeds"]}
    if family == "wan":
        return {**common, "height": 16, "width": 16, "num_frames": 5, **_text(2, seed)}   # latents (2, 8, 8)
    if family == "unet":
        return {**common, "batch_size": 2}
    if family == "unet_condition":
        return {**common, **size, **_text(2, seed)}
    raise KeyError(family)


@dataclass(frozen=True)
class Family:
    """One diffusers denoiser family: a tiny model, calls of it, its pipeline (module docs)."""

    key: str
    model_class: str
    pipeline_class: str
    build: Callable[[int], torch.nn.Module]
    latents: str                                 # what the sample input is, for the README's table
    notes: str = ""
    roles: tuple[str, ...] = field(default=())   # roles its graph must show

    def model(self, seed: int = 0) -> torch.nn.Module:
        return self.build(seed)

    def calls(self, count: int = 2, batch_size: int = 2, seed: int = 1) -> list[Batch]:
        """``count`` random calls of the model, each with ``batch_size`` rows, shaped as its pipeline makes them."""
        g = torch.Generator().manual_seed(seed)
        return [((), _call(self.key, g, batch_size)) for _ in range(count)]

    def pipeline(self, model: torch.nn.Module | None = None):
        """The family's diffusers pipeline around ``model`` (a new tiny one by default), progress bars off."""
        pipe = _pipeline(self.key, model if model is not None else self.model())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_call(self, steps: int = 3, seed: int = 0) -> dict[str, Any]:
        return _pipeline_call(self.key, steps, seed)


_ATTENTION = ("qkv", "attn_out", "fc1", "fc2")
FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family("dit", "DiTTransformer2DModel", "DiTPipeline", tiny_dit, "(B, 2, 8, 8)", "class labels, learned sigma",
           (*_ATTENTION, "adaln", "embed", "patch_embed", "final")),
    Family("pixart", "PixArtTransformer2DModel", "PixArtAlphaPipeline", tiny_pixart, "(B, 2, 8, 8)",
           "captions, shared adaLN-single", (*_ATTENTION, "embed", "patch_embed", "final")),
    Family("sd3", "SD3Transformer2DModel", "StableDiffusion3Pipeline", tiny_sd3, "(B, 2, 8, 8)",
           "joint attention over image and text streams", (*_ATTENTION, "adaln", "embed", "patch_embed", "final")),
    Family("flux", "FluxTransformer2DModel", "FluxPipeline", tiny_flux, "(B, 16 tokens, 8), packed 2x2",
           "joint + single blocks, rotary embeddings; img_ids / txt_ids not batched",
           (*_ATTENTION, "adaln", "embed", "final")),
    Family("wan", "WanTransformer3DModel", "WanPipeline", tiny_wan, "(B, 2, 2 frames, 8, 8), 5-D",
           "video; rotary embeddings; conv3d patch embedding left in float",
           (*_ATTENTION, "embed", "final")),
    Family("unet", "UNet2DModel", "DDPMPipeline", tiny_unet, "(B, 2, 8, 8)", "convs and attention",
           ("qkv", "attn_out", "conv", "embed")),
    Family("unet_condition", "UNet2DConditionModel", "StableDiffusionPipeline", tiny_unet_condition, "(B, 2, 8, 8)",
           "cross-attention transformer blocks, GEGLU", ("qkv", "attn_out", "fc1", "fc2", "conv", "embed")),
)}


__all__ = ["FAMILIES", "Family", "tiny_vae", "tiny_wan_vae"]
