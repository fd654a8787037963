"""Inpainting with Stable Diffusion XL: Diffusers' `StableDiffusionXLInpaintPipeline` (a 9-channel SDXL inpainting
UNet, or a plain 4-channel SDXL UNet with the known region pasted back after each step)."""

from __future__ import annotations

import dataclasses

from .call_signature import pipeline_call
from .stable_diffusion_img2img import InpaintArgs
from .stable_diffusion_inpaint import InpaintingMixin
from .stable_diffusion_xl import StableDiffusionXLBase
from .stable_diffusion_xl_img2img import XLImageToImageBase, XLImg2ImgArgs


@dataclasses.dataclass(kw_only=True)
class XLInpaintArgs(XLImg2ImgArgs, InpaintArgs):
    """SDXL inpainting's call: SDXL img2img's arguments plus the mask."""


class StableDiffusionXLInpaintPipeline(InpaintingMixin, XLImageToImageBase):
    """SDXL inpainting: white mask pixels are repainted, black ones kept; `denoising_start` continues from the
    image's latents (a base -> refiner hand-off), as in Diffusers."""

    _callback_tensor_inputs = (*StableDiffusionXLBase._callback_tensor_inputs, "mask", "masked_image_latents")

    __call__ = pipeline_call(
        XLInpaintArgs,
        """Repaint the white region of `mask_image` in `image` (both resized to height x width, the UNet's size by
        default) following `prompt`.

        strength < 1 starts from the noised image (the default 0.9999 keeps a trace of it, as in Diffusers);
        denoising_start in (0, 1) continues from the image's latents that far through the schedule. Other arguments
        as SDXL img2img; padding_mask_crop is not supported (must be None).
        """,
        "prompt prompt_2 image mask_image masked_image_latents height width padding_mask_crop strength "
        "num_inference_steps timesteps sigmas denoising_start denoising_end guidance_scale negative_prompt "
        "negative_prompt_2 num_images_per_prompt eta generator latents prompt_embeds negative_prompt_embeds "
        "pooled_prompt_embeds negative_pooled_prompt_embeds ip_adapter_image ip_adapter_image_embeds output_type "
        "return_dict cross_attention_kwargs guidance_rescale original_size crops_coords_top_left target_size "
        "negative_original_size negative_crops_coords_top_left negative_target_size aesthetic_score "
        "negative_aesthetic_score clip_skip callback_on_step_end callback_on_step_end_tensor_inputs",
        returns="StableDiffusionXLPipelineOutput | tuple[Any]",
        var_kwargs=True,
        strength=0.9999,
    )

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
