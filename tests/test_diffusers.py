"""dq.diffusers.quantize_pipeline on real diffusers pipelines built from tiny random parts."""

import numpy as np
import pytest
import torch

import ditq_compiler as dq
from ditq_compiler.diffusers import CompiledDenoiser, default_call, quantize_pipeline


def tiny_dit_pipeline():
    """diffusers' own DiTPipeline: DiT with 1000 classes (null class 1000) and learned sigma, a 1-block VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, sample_size=8).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, **call):
    return pipe(generator=torch.Generator().manual_seed(0), output_type="np", **call).images


def test_dit_pipeline_runs_as_before_with_the_compiled_transformer():
    pipe = tiny_dit_pipeline()
    call = dict(class_labels=[1, 7], num_inference_steps=8)
    fp_images = images(pipe, **call)
    fp = pipe.transformer
    state = {k: v.clone() for k, v in fp.state_dict().items()}

    calibration_call = {"class_labels": [1, 2, 3], "num_inference_steps": 10}
    returned = quantize_pipeline(pipe, "w8a8-minmax", calibration=calibration_call,
                                 steps=5, progress=False)
    assert returned is pipe and isinstance(pipe.transformer, CompiledDenoiser)
    assert not fp._forward_pre_hooks and all(torch.equal(v, state[k]) for k, v in fp.state_dict().items())
    q_images = images(pipe, **call)
    assert q_images.shape == fp_images.shape == (2, 8, 8, 3)
    assert np.abs(q_images - fp_images).max() < 0.05

    calibration = pipe.transformer.compiled.provenance.calibration
    assert calibration["source"] == "pipeline" and calibration["denoiser_calls"] == 10
    assert len(calibration["steps"]) == 5
    assert calibration["samples"] == 5 * 6 and calibration["seed"] == 0          # 3 labels + 3 null, guided
    denoiser = pipe.transformer
    assert denoiser.config.out_channels == 8 and denoiser.sample_size == 8          # config fields, as diffusers models
    assert denoiser.dtype == torch.float32 and denoiser.device == torch.device("cpu") and pipe.dtype == torch.float32
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 1000])
    as_tuple = denoiser(x, timestep=t, class_labels=y, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], denoiser(x, timestep=t, class_labels=y).sample)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_pipeline(pipe, "w8a8-minmax")


def test_ddpm_pipeline_with_default_calibration_and_a_saved_artifact(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    assert default_call(pipe, unet, 0) == {"batch_size": 4, "num_inference_steps": 50}
    fp_images = images(pipe, batch_size=2, num_inference_steps=10)

    quantize_pipeline(pipe, "w8a8-minmax", progress=False)                          # timestep is a 0-d tensor here
    assert pipe.unet.compiled.provenance.calibration["denoiser_calls"] == 50
    assert np.abs(images(pipe, batch_size=2, num_inference_steps=10) - fp_images).max() < 0.1

    path = pipe.unet.compiled.save(tmp_path / "unet")
    reloaded = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))
    reloaded.set_progress_bar_config(disable=True)
    dq.diffusers.install(reloaded, dq.load(path))
    np.testing.assert_array_equal(images(reloaded, batch_size=2, num_inference_steps=10),
                                  images(pipe, batch_size=2, num_inference_steps=10))


def test_default_calibration_spreads_class_labels_and_refuses_to_invent_prompts():
    pipe = tiny_dit_pipeline()
    call = default_call(pipe, pipe.transformer, 0)
    assert call["class_labels"][0] == 0 and call["class_labels"][-1] == 999 and len(call["class_labels"]) == 10

    class TextPipeline:
        def __init__(self, transformer):
            self.transformer = transformer

        def __call__(self, prompt, num_inference_steps=30):
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="is text-conditioned: pass the prompts"):
        quantize_pipeline(TextPipeline(pipe.transformer), "w8a8")
    with pytest.raises(ValueError, match="has no denoiser to quantize"):
        quantize_pipeline(object(), "w8a8")
