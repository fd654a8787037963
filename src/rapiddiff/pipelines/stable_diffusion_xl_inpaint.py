"""Inpainting with Stable Diffusion XL: Diffusers' `StableDiffusionXLInpaintPipeline` (a 9-channel SDXL inpainting
UNet, or a plain 4-channel SDXL UNet with the known region pasted back after each step)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .denoise import Scheduler, StepEndCallback
from .image_processor import PipelineImageInput
from .stable_diffusion_img2img import InpaintArgs
from .stable_diffusion_inpaint import InpaintingMixin
from .stable_diffusion_xl import StableDiffusionXLBase, StableDiffusionXLPipelineOutput
from .stable_diffusion_xl_img2img import XLImageToImageBase, XLImg2ImgArgs


@dataclasses.dataclass(kw_only=True)
class XLInpaintArgs(XLImg2ImgArgs, InpaintArgs):
    """SDXL inpainting's call: SDXL img2img's arguments plus the mask."""


class StableDiffusionXLInpaintPipeline(InpaintingMixin, XLImageToImageBase):
    """SDXL inpainting: white mask pixels are repainted, black ones kept; `denoising_start` continues from the
    image's latents (a base -> refiner hand-off), as in Diffusers."""

    _callback_tensor_inputs = (*StableDiffusionXLBase._callback_tensor_inputs, "mask", "masked_image_latents")

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
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            scheduler,
            image_encoder,
            feature_extractor,
            requires_aesthetics_score,
            force_zeros_for_empty_prompt,
            add_watermarker,
        )
        self.make_mask_processor()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: PipelineImageInput | None = None,
        mask_image: PipelineImageInput | None = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
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
        """Repaint the white region of `mask_image` in `image` (both resized to height x width, the UNet's size by
        default) following `prompt`.

        strength < 1 starts from the noised image (the default 0.9999 keeps a trace of it, as in Diffusers);
        denoising_start in (0, 1) continues from the image's latents that far through the schedule. Other arguments
        as SDXL img2img; padding_mask_crop is not supported (must be None).
        """
        return self.generate(XLInpaintArgs.from_locals(locals()))

    def check_inputs(self, args: XLInpaintArgs) -> None:
        StableDiffusionXLBase.check_inputs(self, args)  # not img2img's: the image is checked with its mask
        self.check_inpaint_inputs(args)
        if args.denoising_start is not None and args.latents is not None:
            raise ValueError(
                "latents given with denoising_start: the loop then starts from the image's latents (Diffusers does "
                "not read `latents`); pass one of them"
            )

    def start_noised(self, args: XLInpaintArgs) -> bool:
        return args.denoising_start is None
