"""Image-to-image with Stable Diffusion XL, and the SDXL refiner: Diffusers' `StableDiffusionXLImg2ImgPipeline`.

As the refiner of a base -> refiner hand-off ("ensemble of experts") it takes the base's latents
(`output_type="latent"`, `denoising_end=f`) and runs the schedule from the same point (`denoising_start=f`), without
noising them again. The refiner's UNet reads an aesthetic score among its time ids (`requires_aesthetics_score`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..utils.torch_utils import randn_tensor
from .checks import batch_repeats, check_finite, check_number, check_unet_in_channels, required
from .denoise import Conditioning, Scheduler, StepEndCallback, retrieve_timesteps
from .image_processor import PipelineImageInput
from .stable_diffusion_img2img import Img2ImgArgs, encode_image_latents, strength_timesteps
from .stable_diffusion_xl import (
    StableDiffusionXLBase,
    StableDiffusionXLPipelineOutput,
    XLArgs,
    check_denoising_fraction,
    training_cutoff,
)
from .template import LoopStart


@dataclasses.dataclass(kw_only=True)
class XLImg2ImgArgs(XLArgs, Img2ImgArgs):
    """SDXL img2img's call: SDXL's and img2img's arguments, the start of the schedule and the aesthetic scores."""

    denoising_start: float | None
    aesthetic_score: float
    negative_aesthetic_score: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check_denoising_fraction("denoising_start", self.denoising_start, one_allowed=False)
        check_number("aesthetic_score", self.aesthetic_score)
        check_number("negative_aesthetic_score", self.negative_aesthetic_score)
        start, end = self.denoising_start, self.denoising_end
        if start is not None and end is not None and end < 1 and start >= end:
            raise ValueError(f"denoising_start={start} must be smaller than denoising_end={end}")


class XLImageToImageBase(StableDiffusionXLBase):
    """What SDXL img2img and inpainting share: the refiner's config value, the schedule's start (`strength` or
    `denoising_start`) and the time ids with the aesthetic score (`requires_aesthetics_score`)."""

    def __init__(
        self,
        vae: Any,
        text_encoder: Any,
        text_encoder_2: Any,
        tokenizer: Any,
        tokenizer_2: Any,
        unet: Any,
        scheduler: Scheduler,
        image_encoder: Any = None,
        feature_extractor: Any = None,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        self._register_xl(
            add_watermarker,
            dict(
                requires_aesthetics_score=requires_aesthetics_score,
                force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            ),
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )

    @property
    def denoising_start(self) -> float | None:
        return self.call_state.denoising_start

    def time_ids_per_image(self) -> int:
        """Original size, crop, then the aesthetic score (refiner) or the target size."""
        return 5 if self.config.requires_aesthetics_score else 6

    def new_call_state(self, args: XLImg2ImgArgs) -> Any:
        return dataclasses.replace(super().new_call_state(args), denoising_start=args.denoising_start)

    def prepare_timesteps(self, args: XLImg2ImgArgs, device: torch.device) -> tuple[torch.Tensor, int]:
        """The last `strength` share of the schedule, or from `denoising_start` on; then `denoising_end`."""
        if args.denoising_start is None:
            timesteps, steps = strength_timesteps(
                self.scheduler, args.num_inference_steps, device, args.timesteps, args.sigmas, args.strength
            )
        else:
            timesteps, steps = self.start_schedule(args, device)
        return self.end_schedule(args, timesteps, steps)

    def start_schedule(self, args: XLImg2ImgArgs, device: torch.device) -> tuple[torch.Tensor, int]:
        """The schedule from `denoising_start` on, as Diffusers cuts it (a 2nd-order scheduler starts on an
        interval's first evaluation)."""
        scheduler = self.scheduler
        timesteps, _ = retrieve_timesteps(scheduler, args.num_inference_steps, device, args.timesteps, args.sigmas)
        steps = int((timesteps < training_cutoff(scheduler, args.denoising_start)).sum())
        if steps == 0:
            raise ValueError(
                f"denoising_start={args.denoising_start} leaves none of the {len(timesteps)} timesteps; allowed: a "
                "smaller fraction or more steps"
            )
        if scheduler.order == 2 and steps % 2 == 0:
            steps += 1
        start = len(timesteps) - steps
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        return timesteps[start:], steps

    def add_time_ids(self, args: XLImg2ImgArgs, dtype: torch.dtype, guided: bool) -> torch.Tensor:
        original, target = self.resolved_sizes(args, args.height, args.width)
        negative_original = args.negative_original_size or original
        negative_target = args.negative_target_size or target
        if self.config.requires_aesthetics_score:
            ids = [*original, *args.crops_coords_top_left, args.aesthetic_score]
            negative = [*negative_original, *args.negative_crops_coords_top_left, args.negative_aesthetic_score]
        else:  # Diffusers' negative row takes the positive crop here
            ids = [*original, *args.crops_coords_top_left, *target]
            negative = [*negative_original, *args.crops_coords_top_left, *negative_target]
        rows = torch.tensor([ids], dtype=dtype).repeat(args.batch_size, 1)
        if not guided:
            return rows
        return torch.cat([torch.tensor([negative], dtype=dtype).repeat(args.batch_size, 1), rows])

    def encode_image_latents(
        self, image: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """Pixels -> scaled latents in the pixels' dtype, encoded in float32 for a `force_upcast` VAE (Diffusers'
        `_encode_vae_image`)."""
        with self.vae.upcast():
            return encode_image_latents(self.vae, image.to(self.vae.dtype), generator).to(image.dtype)


class StableDiffusionXLImg2ImgPipeline(XLImageToImageBase):
    """SDXL image-to-image, and the SDXL refiner (text_encoder=None, requires_aesthetics_score=True).

    The image is encoded (or taken as latents when it has the VAE's latent channels), noised to where the last
    `strength` share of the schedule starts, and denoised from there; with `denoising_start` the schedule starts that
    far through instead and the image (the base's latents) is not noised.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: PipelineImageInput | None = None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - Diffusers' default
        **kwargs: Any,
    ) -> StableDiffusionXLPipelineOutput | tuple[Any]:
        """Transform `image` (PIL, array or tensor in [0, 1], or (B, 4, h, w) latents) following `prompt`.

        strength in [0, 1]: the share of the schedule that runs (not read with denoising_start). denoising_start in
        (0, 1): start that far through the schedule from un-noised latents (the refiner's half of a hand-off).
        aesthetic_score / negative_aesthetic_score: the refiner's conditioning (requires_aesthetics_score=True).
        Other arguments as SDXL text-to-image; `latents`, when given, are the starting latents as they are.
        """
        return self.generate(XLImg2ImgArgs.from_locals(locals()))

    def check_inputs(self, args: XLImg2ImgArgs) -> None:
        super().check_inputs(args)
        channels = self.vae.config.latent_channels
        check_unet_in_channels(self.unet, {channels: "the VAE's latent channels"})
        args.image = self.image_processor.preprocess(required("image", args.image))
        check_finite("image", args.image)
        batch_repeats("image", args.image.shape[0], args.batch_size)
        if args.latents is not None and (
            args.latents.ndim != 4 or args.latents.shape[:2] != (args.batch_size, channels)
        ):
            raise ValueError(
                f"latents must have shape ({args.batch_size}, {channels}, height/8, width/8), "
                f"got {tuple(args.latents.shape)}"
            )
        # The output size, which the micro-conditioning defaults to: the starting latents' size in pixels.
        start = args.latents if args.latents is not None else args.image
        scale = self.vae_scale_factor if start.shape[1] == channels else 1
        args.height, args.width = (start.shape[-2] * scale, start.shape[-1] * scale)

    def prepare_denoising(
        self, args: XLImg2ImgArgs, timesteps: torch.Tensor, conditioning: Conditioning, device: torch.device
    ) -> LoopStart:
        dtype = conditioning["prompt_embeds"].dtype
        if args.latents is not None:
            return LoopStart(args.latents.to(device))
        start = timesteps[:1].repeat(args.batch_size) if args.denoising_start is None else None
        return LoopStart(self.prepare_image_latents(args.image, start, args.batch_size, dtype, device, args.generator))

    def prepare_image_latents(
        self,
        image: torch.Tensor,
        timestep: torch.Tensor | None,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> torch.Tensor:
        """The image's latents (encoded in float32 for a `force_upcast` VAE, unless `image` already is latents),
        repeated to the batch, noised to `timestep` (None: not noised). Generators are consumed in Diffusers'
        order."""
        image = image.to(device=device, dtype=dtype)
        if image.shape[1] == self.vae.config.latent_channels:
            latents = image
        else:
            if isinstance(generator, list):  # one generator per output image: duplicate the images first
                image = image.repeat(batch_repeats("image", image.shape[0], batch_size), 1, 1, 1)
            latents = self.encode_image_latents(image, generator)
        latents = latents.repeat(batch_repeats("image", latents.shape[0], batch_size), 1, 1, 1)
        if timestep is None:
            return latents
        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(latents, noise, timestep)
