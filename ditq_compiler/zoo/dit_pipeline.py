"""``DigitsDiTPipeline``: diffusers' ``DiTPipeline`` loop for the zoo's pixel-space ``dit-digits``.

Why not ``diffusers.DiTPipeline`` itself: it decodes latents with a VAE and hard-codes the
classifier-free-guidance null class as 1000 (ImageNet). ``dit-digits`` denoises 8x8 pixels
directly and its null class is 10 (``config.num_embeds_ada_norm``). A stand-in identity VAE would
fix the first, nothing but a fork fixes the second, so this is a small ``DiffusionPipeline`` with
the same call (``class_labels``, ``guidance_scale``, ``num_inference_steps``, ``generator``,
``output_type``, ``return_dict``), the same use of its denoiser (``transformer(x, timestep=t,
class_labels=y).sample`` on the doubled guided batch, ``transformer.config``, ``.dtype``) and the
same guidance rule, ``eps = eps_null + s (eps_cond - eps_null)``. It is built locally; nothing is
downloaded:

    pipe = DigitsDiTPipeline(transformer=zoo.load("dit-digits"), scheduler=zoo.scheduler("dit-digits"))
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=50, output_type="pt").images   # (3, 1, 8, 8) in [0, 1]
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class DigitsDiTPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, class_labels: list[int], guidance_scale: float = 2.0, generator: torch.Generator | None = None,
                 num_inference_steps: int = 50, output_type: str = "pil", return_dict: bool = True):
        config = self.transformer.config
        null_class = config.num_embeds_ada_norm
        labels = torch.as_tensor(class_labels, device=self._execution_device).reshape(-1)
        if bool((labels < 0).any()) or bool((labels >= null_class).any()):
            raise ValueError(f"class_labels must be in [0, {null_class}), got {class_labels}")
        guided = guidance_scale > 1
        labels_input = torch.cat([labels, torch.full_like(labels, null_class)]) if guided else labels
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        x = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.transformer.dtype)
        x = x * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t)
            model_input = torch.cat([model_input, model_input]) if guided else model_input
            timesteps = torch.as_tensor(t, device=x.device).reshape(1).expand(len(model_input))
            eps = self.transformer(model_input, timestep=timesteps, class_labels=labels_input).sample
            eps = eps[:, :config.in_channels]                    # the learned variance, if any, is not used
            if guided:
                cond, null = eps.chunk(2)
                eps = null + guidance_scale * (cond - null)
            x = self.scheduler.step(eps, t, x, generator=generator).prev_sample
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


__all__ = ["DigitsDiTPipeline"]
