"""SDXL guided by control images: Diffusers' `StableDiffusionXLControlNetPipeline`, the SD ControlNet pipeline's
checks and residual hook on the SDXL family (the ControlNets also get SDXL's `added_cond_kwargs`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..models.controlnet import ControlNetModel, MultiControlNetModel
from .controlnet import ControlNetArgs, StableDiffusionControlNetPipeline
from .denoise import Conditioning, Scheduler, StepEndCallback
from .image_processor import PipelineImageInput
from .stable_diffusion_xl import (
    StableDiffusionXLBase,
    StableDiffusionXLPipeline,
    StableDiffusionXLPipelineOutput,
    XLArgs,
)


@dataclasses.dataclass(kw_only=True)
class XLControlNetArgs(XLArgs, ControlNetArgs):
    """SDXL's call plus the control image(s), scales, guess mode and guidance window."""


class StableDiffusionXLControlNetPipeline(StableDiffusionControlNetPipeline, StableDiffusionXLBase):
    """SDXL text-to-image with one ControlNet, or several (a list, or a MultiControlNetModel: residuals summed)."""

    _optional_components = StableDiffusionXLBase._optional_components
    _callback_tensor_inputs = (
        "latents",
        "prompt_embeds",
        "negative_prompt_embeds",
        "add_text_embeds",
        "add_time_ids",
        "negative_pooled_prompt_embeds",
        "negative_add_time_ids",
        "image",
    )

    def __init__(
        self,
        vae: Any,
        text_encoder: Any,
        text_encoder_2: Any,
        tokenizer: Any,
        tokenizer_2: Any,
        unet: Any,
        controlnet: ControlNetModel | Sequence[ControlNetModel] | MultiControlNetModel,
        scheduler: Scheduler,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        feature_extractor: Any = None,
        image_encoder: Any = None,
    ):
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        self._register_xl(
            add_watermarker,
            dict(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt),
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            controlnet=controlnet,
            scheduler=scheduler,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.make_control_processors()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: PipelineImageInput | list[PipelineImageInput] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        original_size: tuple[int, int] = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - Diffusers' default
        **kwargs: Any,
    ) -> StableDiffusionXLPipelineOutput | tuple[Any]:
        """Generate images from `prompt` guided by `image` (the control image(s); height/width default to its
        size). ControlNet arguments as StableDiffusionControlNetPipeline's, SDXL's as StableDiffusionXLPipeline's.
        With denoising_end the control window is a share of the steps that run (Diffusers: of the whole schedule).
        """
        return self.generate(XLControlNetArgs.from_locals(locals()))

    add_time_ids = StableDiffusionXLPipeline.add_time_ids  # the control image's size is the output's

    def encode_conditioning(self, args: XLControlNetArgs, device: torch.device) -> dict[str, torch.Tensor | None]:
        """SDXL's conditioning plus the negative time ids Diffusers' callbacks may read."""
        conditioning = super().encode_conditioning(args, device)
        ids = conditioning["add_time_ids"]
        return conditioning | {"negative_add_time_ids": ids[:1] if self.do_classifier_free_guidance else None}

    def controlnet_kwargs(self, conditioning: Conditioning, conditional_half: bool) -> dict[str, Any]:
        added = self.model_kwargs_from_conditioning(conditioning)["added_cond_kwargs"]
        if conditional_half:
            added = {k: v.chunk(2)[1] for k, v in added.items()}
        return {"added_cond_kwargs": added}
