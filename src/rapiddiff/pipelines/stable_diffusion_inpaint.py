"""Inpainting with Stable Diffusion: Diffusers' `StableDiffusionInpaintPipeline`, with a 9-channel inpainting UNet or
a plain 4-channel one."""

from __future__ import annotations

from typing import Any

import torch

from .checks import batch_repeats, check_finite, check_unet_in_channels, required
from .denoise import Conditioning, StepEndCallback
from .image_processor import PipelineImageInput, VaeImageProcessor
from .stable_diffusion import StableDiffusionPipeline, StableDiffusionPipelineOutput
from .stable_diffusion_img2img import ImageToImageBase, InpaintArgs
from .template import LoopStart


class InpaintingMixin:
    """What SD and SDXL inpainting share: image and mask checks, the initial latents (noise, or the noised image below
    strength 1), the mask channels of a 9-channel inpainting UNet or the known region pasted back after each step of
    a plain 4-channel one. Its pipelines supply `encode_image_latents` and `start_noised`."""

    def make_mask_processor(self) -> None:
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    def start_noised(self, args: InpaintArgs) -> bool:
        """Whether the loop starts from noise (or the noised image); SDXL's `denoising_start` starts from the image's
        latents as they are."""
        return True

    def check_inpaint_inputs(self, args: InpaintArgs) -> None:
        """The checks after the family's: sizes, UNet channels, latents, image and mask, masked image latents."""
        self.resolve_size(args)
        channels = self.vae.config.latent_channels
        check_unet_in_channels(
            self.unet,
            {channels: "a plain UNet", 2 * channels + 1: "an inpainting UNet: latents + mask + masked image latents"},
        )
        latent_shape = self.latent_shape(args.batch_size, channels, args.height, args.width)
        self.check_latents(args.latents, latent_shape)
        args.image, args.mask_image = self.preprocess_image_and_mask(
            required("image", args.image),
            required("mask_image", args.mask_image),
            args.height,
            args.width,
            args.batch_size,
            args.masked_image_latents is not None,
        )
        check_finite("image", args.image)
        self.check_masked_image_latents(args.masked_image_latents, latent_shape)

    def prepare_denoising(
        self, args: InpaintArgs, timesteps: torch.Tensor, conditioning: Conditioning, device: torch.device
    ) -> LoopStart:
        dtype = conditioning["prompt_embeds"].dtype
        plain_unet = self.unet.config.in_channels == self.vae.config.latent_channels
        # Generators are consumed in Diffusers' order: image latents, noise, masked image latents.
        start = timesteps[:1].repeat(args.batch_size)
        latents, noise, image_latents = self.prepare_inpaint_latents(
            args.image,
            start,
            args.strength,
            plain_unet,
            dtype,
            device,
            args.generator,
            args.latents,
            add_noise=self.start_noised(args),
        )
        masked_image_latents = args.masked_image_latents
        if masked_image_latents is None:
            masked_image = (args.image * (args.mask_image < 0.5)).to(device=device, dtype=dtype)
            masked_image_latents = self.encode_image_latents(masked_image, args.generator)
        mask_latents = self.prepare_mask_latents(args.mask_image, masked_image_latents, args.batch_size, dtype, device)

        def with_mask_channels(
            x: torch.Tensor, t: torch.Tensor, i: int, cond: Conditioning
        ) -> tuple[torch.Tensor, dict[str, Any]]:
            return torch.cat([x, cond["mask"], cond["masked_image_latents"]], dim=1), {}

        def paste_known_region(latents: torch.Tensor, t: torch.Tensor, i: int, cond: Conditioning) -> torch.Tensor:
            mask = cond["mask"].chunk(2)[0] if self.do_classifier_free_guidance else cond["mask"]
            known = image_latents
            if i < len(timesteps) - 1:  # noised to the level the next step starts from
                known = self.scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
            return (1 - mask) * known + mask * latents

        if plain_unet:
            return LoopStart(latents, after_step=paste_known_region, conditioning=mask_latents)
        return LoopStart(latents, model_inputs=with_mask_channels, conditioning=mask_latents)

    def prepare_inpaint_latents(
        self,
        image: torch.Tensor,
        timestep: torch.Tensor,
        strength: float,
        need_image_latents: bool,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        add_noise: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(initial latents, noise, image latents or None). Strength 1: pure noise; below 1: the image's latents
        noised to `timestep`; given `latents` are taken as the noise (Diffusers' rule, whatever the strength).
        add_noise=False (SDXL's denoising_start): the image's latents as they are (noise is still drawn)."""
        batch_size = timestep.shape[0]
        channels = self.vae.config.latent_channels
        given_latents = image.shape[1] == channels  # `image` given as latents: used as they are, not encoded
        image_latents = None
        if need_image_latents or not add_noise or (latents is None and strength < 1):
            image = image.to(device=device, dtype=dtype)
            image_latents = image if given_latents else self.encode_image_latents(image, generator)
            image_latents = image_latents.repeat(batch_repeats("image", image_latents.shape[0], batch_size), 1, 1, 1)
        height, width = (s * self.vae_scale_factor if given_latents else s for s in image.shape[-2:])
        noise = self.draw_noise(batch_size, channels, height, width, dtype, device, generator, latents)
        if not add_noise:
            return image_latents, noise, image_latents
        if latents is None and strength < 1:
            return self.scheduler.add_noise(image_latents, noise, timestep), noise, image_latents
        return noise * self.scheduler.init_noise_sigma, noise, image_latents

    def preprocess_image_and_mask(
        self,
        image: PipelineImageInput,
        mask_image: PipelineImageInput,
        height: int,
        width: int,
        batch_size: int,
        masked_image_latents_given: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image in [-1, 1], binary mask), both (B, C, height, width) float32; sizes and batches checked. An image
        given as latents (B, latent_channels, height/f, width/f) is returned as it is, as Diffusers takes it; the
        masked image's latents must then be given too (there are no pixels to mask)."""
        init_image = self.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        given_latents = init_image.shape[1] == self.vae.config.latent_channels
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        if given_latents and not masked_image_latents_given:
            raise ValueError(
                f"image: got latents {tuple(init_image.shape)}; inpainting masks the image in pixels, so with image "
                "latents pass the masked image's latents as masked_image_latents too"
            )
        if given_latents and tuple(init_image.shape[-2:]) != latent_size:
            raise ValueError(
                f"image: latents of size {tuple(init_image.shape[-2:])} do not fit height={height}, width={width} "
                f"(latents of {latent_size[0]}x{latent_size[1]})"
            )
        image_size, mask_size = self.image_processor.input_size(image), self.mask_processor.input_size(mask_image)
        if not given_latents and image_size != mask_size:
            raise ValueError(
                f"mask_image is {mask_size[0]}x{mask_size[1]} (height x width) but image is "
                f"{image_size[0]}x{image_size[1]}: the mask must have the image's size"
            )
        mask = self.mask_processor.preprocess(mask_image, height=height, width=width)
        n_image, n_mask = init_image.shape[0], mask.shape[0]
        if n_image != n_mask and 1 not in (n_image, n_mask):
            raise ValueError(
                f"mask_image has a batch of {n_mask} masks for {n_image} images; allowed: one mask, or one per image"
            )
        batch_repeats("image", n_image, batch_size)
        batch_repeats("mask_image", n_mask, batch_size)
        return init_image, mask

    def check_masked_image_latents(self, masked_image_latents: torch.Tensor | None, latent_shape: tuple) -> None:
        if masked_image_latents is None:
            return
        if not isinstance(masked_image_latents, torch.Tensor) or masked_image_latents.shape[1:] != latent_shape[1:]:
            got = getattr(masked_image_latents, "shape", type(masked_image_latents).__name__)
            raise ValueError(
                f"masked_image_latents must have shape (batch, {', '.join(map(str, latent_shape[1:]))}), got {got}"
            )
        batch_repeats("masked_image_latents", masked_image_latents.shape[0], latent_shape[0])

    def prepare_mask_latents(
        self,
        mask: torch.Tensor,
        masked_image_latents: torch.Tensor,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        """The mask at latent size and the masked image's latents, repeated to the batch (and doubled with guidance,
        as the UNet input is), by callback name."""
        mask = torch.nn.functional.interpolate(mask, size=masked_image_latents.shape[-2:]).to(
            device=device, dtype=dtype
        )
        mask = mask.repeat(batch_repeats("mask_image", mask.shape[0], batch_size), 1, 1, 1)
        masked = masked_image_latents.to(device=device, dtype=dtype)
        masked = masked.repeat(batch_repeats("masked_image_latents", masked.shape[0], batch_size), 1, 1, 1)
        copies = 2 if self.do_classifier_free_guidance else 1
        return {"mask": torch.cat([mask] * copies), "masked_image_latents": torch.cat([masked] * copies)}


class StableDiffusionInpaintPipeline(InpaintingMixin, ImageToImageBase):
    """Inpainting with Stable Diffusion: Diffusers' `StableDiffusionInpaintPipeline`.

    White mask pixels are repainted, black ones kept. A 9-channel inpainting UNet sees the mask and the masked image's
    latents next to the noisy latents; a plain 4-channel UNet is used by pasting the (re-noised) known region back
    after every step.
    """

    __init__ = StableDiffusionPipeline.__init__
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents")
    _legacy_scheduler_fixes = ("steps_offset", "skip_prk_steps", "clip_sample")

    def _register(self, requires_safety_checker: bool, **components: Any) -> None:
        super()._register(requires_safety_checker, **components)
        self.make_mask_processor()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput | None = None,
        mask_image: PipelineImageInput | None = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
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
        """Repaint the white region of `mask_image` in `image` (both resized to height x width, the UNet's size by
        default) following `prompt`.

        strength < 1 starts from the noised image instead of pure noise. masked_image_latents: (B, 4, h, w) latents of
        the masked image, instead of encoding it. padding_mask_crop is not supported (must be None).
        """
        return self.generate(InpaintArgs.from_locals(locals()))

    def check_inputs(self, args: InpaintArgs) -> None:
        super().check_inputs(args)
        self.check_inpaint_inputs(args)
