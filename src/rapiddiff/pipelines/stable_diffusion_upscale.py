"""Stable Diffusion x4 upscaler: Diffusers' `StableDiffusionUpscalePipeline`.

The low-resolution image is noised to `noise_level` by `low_res_scheduler` and concatenated to the latents at every
step (UNet in_channels 7 = 4 latents + 3 image), with the noise level as the UNet's class label. The latents have the
input's size; the VAE (scaling factor 0.08333, two upsamplings) decodes them at 4x. It accepts DeepFloyd IF's stage-I
`output_type="pt"` tensor as `image`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from ..utils.torch_utils import randn_tensor
from .call_signature import pipeline_call, pipeline_init
from .checks import check_finite
from .denoise import Conditioning
from .image_processor import PipelineImageInput, VaeImageProcessor
from .safety_checker import check_safety_components, run_safety_checker
from .stable_diffusion import StableDiffusionBase, StableDiffusionPipelineOutput
from .template import CallArgs, LoopStart

logger = logging.getLogger(__name__)

X4_SCALING_FACTOR = 0.08333


@dataclasses.dataclass(kw_only=True)
class UpscaleArgs(CallArgs):
    """The x4 upscaler's call: the low-resolution image (a (B, C, h, w) tensor after the checks) and its noise level."""

    image: PipelineImageInput | None
    noise_level: int


class StableDiffusionUpscalePipeline(StableDiffusionBase):
    """Text-guided 4x super-resolution. The optional safety checker and watermarker have IF's interfaces
    (`IFSafetyChecker`, `IFWatermarker`), as in Diffusers."""

    _optional_components = ("watermarker", "safety_checker", "feature_extractor")
    deprecated_step_callback = False  # `callback` / `callback_steps` are regular arguments here, as in Diffusers

    __init__ = pipeline_init(
        "vae text_encoder tokenizer unet low_res_scheduler scheduler safety_checker=None feature_extractor=None "
        "watermarker=None max_noise_level=350"
    )

    def register_components(self, components: dict[str, Any], config: dict[str, Any]) -> None:
        vae = components["vae"]
        check_safety_components(
            type(self).__name__, components["safety_checker"], components["feature_extractor"], False
        )
        if vae is not None and vae.config.scaling_factor != X4_SCALING_FACTOR:
            # Diffusers rewrites the VAE config the same way: the x4 VAE is only ever used at 0.08333.
            logger.warning(
                "the x4 upscaler's vae has scaling_factor=%s; using %s as Diffusers does. Please update vae/config.json",
                vae.config.scaling_factor,
                X4_SCALING_FACTOR,
            )
            vae.config = vae.config.replace(scaling_factor=X4_SCALING_FACTOR)
        self.register_modules(**components)
        self.register_to_config(**config)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic")

    # --- argument checks --------------------------------------------------------------------------------------------
    def check_noise_level(self, noise_level: Any) -> None:
        high = self.config.max_noise_level
        classes = self.unet.config.num_class_embeds
        if classes is not None:  # the noise level indexes the UNet's class embedding
            high = min(high, classes - 1)
        if not isinstance(noise_level, int) or isinstance(noise_level, bool) or not 0 <= noise_level <= high:
            raise ValueError(
                f"noise_level must be an int in [0, {high}] (max_noise_level={self.config.max_noise_level}), "
                f"got {noise_level!r}"
            )

    def check_image(self, image: torch.Tensor, prompts: int) -> None:
        """The preprocessed (B, C, h, w) image must fit the prompts and the UNet's image channels."""
        channels = self.unet.config.in_channels - self.vae.config.latent_channels
        if image.shape[1] != channels:
            raise ValueError(
                f"image has {image.shape[1]} channels, this UNet (in_channels={self.unet.config.in_channels}, "
                f"{self.vae.config.latent_channels} of them latents) takes {channels}-channel images"
            )
        if image.shape[0] != prompts:
            raise ValueError(
                f"image has batch size {image.shape[0]} but there are {prompts} prompts: pass one image per prompt"
            )

    # --- the call ---------------------------------------------------------------------------------------------------
    __call__ = pipeline_call(
        UpscaleArgs,
        """Upscale `image` 4x, guided by `prompt` (or `prompt_embeds`); arguments and defaults as in Diffusers.

        image: PIL images / arrays in [0, 1] / tensors in [0, 1] or [-1, 1] (e.g. IF stage I's "pt" output), one
        per prompt. noise_level: how much noise `low_res_scheduler` adds to it, in [0, max_noise_level].
        output_type: "pil", "np", "pt" or "latent". Returns StableDiffusionPipelineOutput(images,
        nsfw_content_detected), or that tuple.
        """,
        "prompt image num_inference_steps guidance_scale noise_level negative_prompt num_images_per_prompt eta "
        "generator latents prompt_embeds negative_prompt_embeds output_type return_dict callback callback_steps "
        "cross_attention_kwargs clip_skip",
        returns="StableDiffusionPipelineOutput | tuple[Any, list[bool] | None]",
        num_inference_steps=75,
        guidance_scale=9.0,
        noise_level=20,
    )

    def check_inputs(self, args: UpscaleArgs) -> None:
        if args.image is None:
            raise ValueError("image is required: the low-resolution image(s) to upscale")
        super().check_inputs(args)
        self.check_noise_level(args.noise_level)
        args.image = self.image_processor.preprocess(args.image)
        check_finite("image", args.image)
        self.check_image(args.image, args.prompts)
        args.height, args.width = (s * self.vae_scale_factor for s in args.image.shape[2:])  # the output size
        channels = self.vae.config.latent_channels
        self.check_latents(args.latents, self.latent_shape(args.batch_size, channels, args.height, args.width))

    def prepare_denoising(
        self, args: UpscaleArgs, timesteps: torch.Tensor, conditioning: Conditioning, device: torch.device
    ) -> LoopStart:
        """The noised low-resolution image (drawn first, as in Diffusers), the initial noise, and the hook appending
        the image to every model input with its noise level as class label."""
        dtype = conditioning["prompt_embeds"].dtype
        image, levels = self.noised_image(args.image.to(device=device, dtype=dtype), args.noise_level, args.generator)
        # Diffusers tiles the whole batch (not per prompt) for the guidance halves and the images per prompt.
        copies = (2 if self.do_classifier_free_guidance else 1) * args.num_images_per_prompt
        image = image.repeat(copies, 1, 1, 1)
        levels = levels.repeat(image.shape[0])
        channels = self.vae.config.latent_channels
        latents = self.prepare_latents(
            args.batch_size, channels, args.height, args.width, dtype, device, args.generator, args.latents
        )

        def with_image(
            x: torch.Tensor, t: torch.Tensor, i: int, cond: Conditioning
        ) -> tuple[torch.Tensor, dict[str, Any]]:
            return torch.cat([x, image], dim=1), {"class_labels": levels}

        return LoopStart(latents, model_inputs=with_image)

    def noised_image(
        self, image: torch.Tensor, noise_level: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image noised by low_res_scheduler to `noise_level`, the (1,) level). Drawn before the latents; with a list
        of generators Diffusers draws from the first ones, one per image."""
        if isinstance(generator, list):
            generator = generator[: image.shape[0]]
        levels = torch.tensor([noise_level], dtype=torch.int64, device=image.device)
        noise = randn_tensor(image.shape, generator=generator, device=image.device, dtype=image.dtype)
        return self.low_res_scheduler.add_noise(image, noise, levels), levels

    def to_output(
        self, latents: torch.Tensor, args: CallArgs, dtype: torch.dtype
    ) -> StableDiffusionPipelineOutput | tuple[Any, list[bool] | None]:
        """VAE decode (in float32 for a float16 VAE with force_upcast, as Diffusers), safety check, post-process,
        watermark PIL outputs."""
        nsfw = None
        if args.output_type == "latent":
            images = latents
        else:
            # Cast before scaling, in the dtype the VAE decodes in: Diffusers' order, so float16 rounds the same.
            decode_dtype = torch.float32 if self.vae.needs_upcasting else self.vae.dtype
            images = self.vae.decode_upcast(latents.to(decode_dtype) / self.vae.config.scaling_factor)
            if self.safety_checker is not None:
                images, nsfw, _ = run_safety_checker(
                    self.safety_checker, self.feature_extractor, images, self._execution_device, dtype
                )
        denormalize = None if nsfw is None else [not flagged for flagged in nsfw]
        images = self.image_processor.postprocess(images, output_type=args.output_type, do_denormalize=denormalize)
        if args.output_type == "pil" and self.watermarker is not None:
            images = self.watermarker.apply_watermark(images)
        return StableDiffusionPipelineOutput(images, nsfw) if args.return_dict else (images, nsfw)
