"""Architectures and training settings of the zoo models (one place, used by train and load)."""

from __future__ import annotations

from dataclasses import dataclass

from ditq_compiler.zoo.data import NUM_CLASSES


@dataclass(frozen=True)
class ModelSpec:
    kind: str                 # 'dit' | 'unet' | 'classifier'
    steps: int                # optimiser steps
    batch_size: int
    lr: float
    ema_decay: float = 0.999

    def diffusers_class(self):
        import diffusers

        return {"dit": diffusers.DiTTransformer2DModel, "unet": diffusers.UNet2DModel}[self.kind]


MODELS = {
    "dit-digits": ModelSpec("dit", steps=5000, batch_size=128, lr=3e-4),
    "unet-digits": ModelSpec("unet", steps=4000, batch_size=128, lr=3e-4),
    "digit-classifier": ModelSpec("classifier", steps=3000, batch_size=128, lr=1e-3, ema_decay=0.0),
}


def build_model(name: str):
    kind = MODELS[name].kind
    if kind == "dit":
        from diffusers import DiTTransformer2DModel

        # 6 blocks, hidden 4 x 32 = 128, 16 tokens of 2x2 patches; the label table has a
        # null row (index 10) that diffusers' label dropout (10%) trains in train mode.
        return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1,
                                     num_layers=6, sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES)
    if kind == "unet":
        from diffusers import UNet2DModel

        return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                           num_class_embeds=NUM_CLASSES + 1, norm_num_groups=8, attention_head_dim=16)
    from ditq_compiler.zoo.classifier import DigitClassifier

    return DigitClassifier()


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=True)
