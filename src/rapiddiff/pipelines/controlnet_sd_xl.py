"""SDXL guided by control images: Diffusers' `StableDiffusionXLControlNetPipeline`, the SD ControlNet pipeline's
checks and residual hook on the SDXL family (the ControlNets also get SDXL's `added_cond_kwargs`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..models.controlnet import MultiControlNetModel
from .call_signature import pipeline_call, pipeline_init
from .controlnet import ControlNetArgs, StableDiffusionControlNetPipeline
from .denoise import Conditioning
from .stable_diffusion_xl import (
    StableDiffusionXLBase,
    StableDiffusionXLPipeline,
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

    __init__ = pipeline_init(
        "vae text_encoder text_encoder_2 tokenizer tokenizer_2 unet controlnet scheduler "
        "force_zeros_for_empty_prompt=True add_watermarker=None feature_extractor=None image_encoder=None"
    )

    def register_components(self, components: dict[str, Any], config: dict[str, Any]) -> None:
        if isinstance(components["controlnet"], (list, tuple)):
            components = {**components, "controlnet": MultiControlNetModel(components["controlnet"])}
        super().register_components(components, config)
        self.make_control_processors()

    __call__ = pipeline_call(
        XLControlNetArgs,
        """Generate images from `prompt` guided by `image` (the control image(s); height/width default to its
        size). ControlNet arguments as StableDiffusionControlNetPipeline's, SDXL's as StableDiffusionXLPipeline's.
        With denoising_end the control window is a share of the steps that run (Diffusers: of the whole schedule).
        """,
        "prompt prompt_2 image height width num_inference_steps timesteps sigmas denoising_end guidance_scale "
        "negative_prompt negative_prompt_2 num_images_per_prompt eta generator latents prompt_embeds "
        "negative_prompt_embeds pooled_prompt_embeds negative_pooled_prompt_embeds ip_adapter_image "
        "ip_adapter_image_embeds output_type return_dict cross_attention_kwargs controlnet_conditioning_scale "
        "guess_mode control_guidance_start control_guidance_end original_size crops_coords_top_left target_size "
        "negative_original_size negative_crops_coords_top_left negative_target_size clip_skip "
        "callback_on_step_end callback_on_step_end_tensor_inputs",
        returns="StableDiffusionXLPipelineOutput | tuple[Any]",
        var_kwargs=True,
        guidance_scale=5.0,
    )

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
