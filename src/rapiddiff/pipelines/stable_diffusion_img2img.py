"""Image-to-image with Stable Diffusion (Diffusers' `StableDiffusionImg2ImgPipeline`) and what it shares with
inpainting: the image's latents, the `strength` share of the schedule, the call's extra arguments."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..utils.torch_utils import randn_tensor
from .checks import batch_repeats, check_finite, check_number, check_unet_in_channels, required
from .denoise import Conditioning, Scheduler, StepEndCallback, retrieve_timesteps, truncate_timesteps
from .image_processor import PipelineImageInput
from .stable_diffusion import StableDiffusionBase, StableDiffusionPipeline, StableDiffusionPipelineOutput
from .template import CallArgs, LoopStart


def encode_image_latents(
    vae: Any, image: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> latents scaled by `scaling_factor`, the VAE posterior sampled as Diffusers'
    `retrieve_latents` does: with the one generator, or with generator i for image i."""
    if isinstance(generator, list):
        generator = generator[: image.shape[0]]
    return vae.encode(image).latent_dist.sample(generator) * vae.config.scaling_factor


def strength_timesteps(
    scheduler: Scheduler,
    num_inference_steps: int,
    device: torch.device,
    timesteps: Sequence[int] | None,
    sigmas: Sequence[float] | None,
    strength: float,
) -> tuple[torch.Tensor, int]:
    """Set the schedule and keep its last `strength` share, starting the scheduler there; (timesteps, steps run)."""
    _, steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
    timesteps, steps_run = truncate_timesteps(scheduler, steps, strength)
    if steps_run < 1:
        raise ValueError(
            f"strength={strength} runs no denoising step of num_inference_steps={steps}: int(steps x strength) is 0; "
            f"allowed: strength >= {1 / steps:g}, or more steps"
        )
    return timesteps, steps_run


@dataclasses.dataclass(kw_only=True)
class Img2ImgArgs(CallArgs):
    """img2img's call: the image and the share of the schedule that runs."""

    image: PipelineImageInput | None
    strength: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("strength", self.strength, 0.0, 1.0)


@dataclasses.dataclass(kw_only=True)
class InpaintArgs(Img2ImgArgs):
    """Inpainting's call: img2img's plus the mask."""

    mask_image: PipelineImageInput | None
    masked_image_latents: torch.Tensor | None
    padding_mask_crop: int | None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.padding_mask_crop is not None:
            raise ValueError(f"padding_mask_crop={self.padding_mask_crop!r} is not supported by rapiddiff; pass None")
        check_finite("masked_image_latents", self.masked_image_latents)


class ImageToImageBase(StableDiffusionBase):
    """What img2img and inpainting share: the call runs the last `strength` share of the schedule."""

    def encode_image_latents(
        self, image: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """Pixels -> scaled latents, in the VAE's dtype (as Diffusers' SD pipelines)."""
        return encode_image_latents(self.vae, image, generator)

    def prepare_timesteps(self, args: Img2ImgArgs, device: torch.device) -> tuple[torch.Tensor, int]:
        """A call with a `strength` (img2img, inpainting) runs the last `strength` share of the schedule."""
        return strength_timesteps(
            self.scheduler, args.num_inference_steps, device, args.timesteps, args.sigmas, args.strength
        )


class StableDiffusionImg2ImgPipeline(ImageToImageBase):
    """Image-to-image with Stable Diffusion: Diffusers' `StableDiffusionImg2ImgPipeline`.

    The image is encoded, noised to the timestep where the last `strength` share of the schedule starts, and denoised
    from there: strength 1 ignores the image's content, strength 0.3 keeps most of it.
    """

    __init__ = StableDiffusionPipeline.__init__
    _legacy_scheduler_fixes = StableDiffusionPipeline._legacy_scheduler_fixes

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - Diffusers' default
        **kwargs: Any,
    ) -> StableDiffusionPipelineOutput | tuple[Any, list[bool] | None]:
        """Transform `image` (PIL, array or tensor in [0, 1], or (B, 4, h, w) latents) following `prompt`.

        strength in [0, 1]: the share of the `num_inference_steps` schedule that runs. Other arguments as
        text-to-image (no height/width: the image's size, rounded down to a multiple of the VAE factor).
        """
        return self.generate(Img2ImgArgs.from_locals(locals()))

    def check_inputs(self, args: Img2ImgArgs) -> None:
        super().check_inputs(args)
        check_unet_in_channels(self.unet, {self.vae.config.latent_channels: "the VAE's latent channels"})
        args.image = self.image_processor.preprocess(required("image", args.image))
        check_finite("image", args.image)
        batch_repeats("image", args.image.shape[0], args.batch_size)

    def prepare_denoising(
        self, args: Img2ImgArgs, timesteps: torch.Tensor, conditioning: Conditioning, device: torch.device
    ) -> LoopStart:
        start = timesteps[:1].repeat(args.batch_size)
        dtype = conditioning["prompt_embeds"].dtype
        return LoopStart(self.prepare_image_latents(args.image, start, args.batch_size, dtype, device, args.generator))

    def prepare_image_latents(
        self,
        image: torch.Tensor,
        timestep: torch.Tensor,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> torch.Tensor:
        """The image's latents (encoded unless `image` already is latents), repeated to the batch, noised to
        `timestep` with `scheduler.add_noise`. Generators are consumed in Diffusers' order: the same seed, the same
        image."""
        image = image.to(device=device, dtype=dtype)
        if image.shape[1] == self.vae.config.latent_channels:
            latents = image
        else:
            if isinstance(generator, list):  # one generator per output image: duplicate the images first
                image = image.repeat(batch_repeats("image", image.shape[0], batch_size), 1, 1, 1)
            latents = encode_image_latents(self.vae, image, generator)
        latents = latents.repeat(batch_repeats("image", latents.shape[0], batch_size), 1, 1, 1)
        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(latents, noise, timestep)
