"""The package's version, the Diffusers release it mirrors, and its table of public names.

Every part of the package that resolves a class by its exported name (model_index.json's `_class_name`, a
scheduler's `compatibles`, single-file loading) reads this table, never the package root: layers point one way.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
# The Diffusers release whose API, checkpoint layout and outputs rapiddiff mirrors (written into saved configs).
DIFFUSERS_VERSION = "0.42.1"

# public name -> submodule that defines it
EXPORTS = {
    # models
    "ModelMixin": "models.modeling_utils",
    "Attention": "models.attention_processor",
    "AttnProcessor": "models.attention_processor",
    "AttnProcessor2_0": "models.attention_processor",
    "AttnAddedKVProcessor": "models.attention_processor",
    "AttnAddedKVProcessor2_0": "models.attention_processor",
    "CustomDiffusionAttnProcessor": "models.custom_diffusion",
    "CustomDiffusionAttnProcessor2_0": "models.custom_diffusion",
    "IPAdapterAttnProcessor": "models.ip_adapter",
    "IPAdapterAttnProcessor2_0": "models.ip_adapter",
    "ImageProjection": "models.ip_adapter",
    "MultiIPAdapterImageProjection": "models.ip_adapter",
    "IPAdapterMixin": "loaders.ip_adapter",
    "UNet2DConditionModel": "models.unet_2d_condition",
    "AutoencoderKL": "models.autoencoder_kl",
    "ControlNetModel": "models.controlnet",
    "MultiControlNetModel": "models.controlnet",
    "DeepCacheConfig": "models.deep_cache",
    # schedulers
    "SchedulerMixin": "schedulers.scheduling_utils",
    "PNDMScheduler": "schedulers.scheduling_pndm",
    "DDIMScheduler": "schedulers.scheduling_ddim",
    "DDPMScheduler": "schedulers.scheduling_ddpm",
    "EulerDiscreteScheduler": "schedulers.scheduling_euler_discrete",
    "EulerAncestralDiscreteScheduler": "schedulers.scheduling_euler_ancestral_discrete",
    "DPMSolverMultistepScheduler": "schedulers.scheduling_dpmsolver_multistep",
    "LMSDiscreteScheduler": "schedulers.scheduling_lms_discrete",
    "HeunDiscreteScheduler": "schedulers.scheduling_heun_discrete",
    "KDPM2DiscreteScheduler": "schedulers.scheduling_k_dpm_2_discrete",
    "KDPM2AncestralDiscreteScheduler": "schedulers.scheduling_k_dpm_2_discrete",
    "EDMEulerScheduler": "schedulers.scheduling_edm_euler",
    "UniPCMultistepScheduler": "schedulers.scheduling_unipc_multistep",
    "DEISMultistepScheduler": "schedulers.scheduling_deis_multistep",
    "DPMSolverSinglestepScheduler": "schedulers.scheduling_dpmsolver_singlestep",
    "DPMSolverSDEScheduler": "schedulers.scheduling_dpmsolver_sde",
    "LCMScheduler": "schedulers.scheduling_lcm",
    "TCDScheduler": "schedulers.scheduling_tcd",
    # pipelines
    "DiffusionPipeline": "pipelines.pipeline_utils",
    "StableDiffusionPipeline": "pipelines.stable_diffusion",
    "StableDiffusionPipelineOutput": "pipelines.stable_diffusion",
    "StableDiffusionImg2ImgPipeline": "pipelines.stable_diffusion_img2img",
    "StableDiffusionInpaintPipeline": "pipelines.stable_diffusion_inpaint",
    "StableDiffusionControlNetPipeline": "pipelines.controlnet",
    "StableDiffusionSafetyChecker": "pipelines.safety_checker",
    "VaeImageProcessor": "pipelines.image_processor",
    "IFPipeline": "pipelines.deepfloyd_if",
    "IFSuperResolutionPipeline": "pipelines.deepfloyd_if",
    "IFPipelineOutput": "pipelines.deepfloyd_if",
    "IFSafetyChecker": "pipelines.deepfloyd_if_safety",
    "IFWatermarker": "pipelines.deepfloyd_if_safety",
    "StableDiffusionUpscalePipeline": "pipelines.stable_diffusion_upscale",
    "StableDiffusionXLPipeline": "pipelines.stable_diffusion_xl",
    "StableDiffusionXLPipelineOutput": "pipelines.stable_diffusion_xl",
    "StableDiffusionXLImg2ImgPipeline": "pipelines.stable_diffusion_xl_img2img",
    "StableDiffusionXLInpaintPipeline": "pipelines.stable_diffusion_xl_inpaint",
    "StableDiffusionXLControlNetPipeline": "pipelines.controlnet_sd_xl",
    "DeepCacheSDHelper": "pipelines.deep_cache",
    # torch.compile recipe
    "compile_pipeline": "compile",
    # lower precision
    "TorchAoConfig": "quantization.config",
    "PipelineQuantizationConfig": "quantization.config",
    "quantize_pipeline": "quantization.static",
}


def export(name: str) -> Any:
    """The public object `name` (imported on first use); KeyError if `name` is not exported."""
    return getattr(importlib.import_module(f"rapiddiff.{EXPORTS[name]}"), name)


def exported_class(name: str, what: str) -> type:
    """The rapiddiff class exported as `name` (a pipeline or a component); `what` names the asker in errors."""
    if name not in EXPORTS:
        known = sorted(n for n in EXPORTS if n[0].isupper())
        raise ValueError(f"{what}: rapiddiff has no class {name!r}. Known classes: {', '.join(known)}.")
    return export(name)
