"""Stable Diffusion pipelines (Diffusers' call signatures, same seed -> same image).

`StableDiffusionBase` holds what every CLIP-conditioned latent pipeline shares - the components, prompt encoding,
argument checks, initial noise, the UNet noise predictor with classifier-free guidance, VAE decoding with the safety
checker - so text-to-image, img2img, inpainting and ControlNet each only write their own `__call__`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..utils.torch_utils import randn_tensor
from .denoise import (
    PredictNoise,
    StepEndCallback,
    apply_guidance,
    check_timesteps_args,
    denoise,
    extra_step_kwargs,
    retrieve_timesteps,
)
from .image_processor import VaeImageProcessor
from .pipeline_utils import (
    BaseOutput,
    DiffusionPipeline,
    callback_tensor_names,
    check_generator,
    check_number,
    check_output_type,
    check_positive_int,
)
from .prompt import check_clip_skip, check_prompt_inputs, encode_prompt
from .safety_checker import run_safety_checker

logger = logging.getLogger(__name__)

# (x, t, i) -> (x, extra UNet kwargs): runs on the scaled model input before the UNet (inpainting appends the mask
# channels, ControlNet computes its residuals).
ModelInputs = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, dict[str, Any]]]


@dataclasses.dataclass
class StableDiffusionPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None


class StableDiffusionBase(DiffusionPipeline):
    """Shared pieces of the SD pipelines; subclasses define `__init__` (their components) and `__call__`."""

    _optional_components = ("safety_checker", "feature_extractor", "image_encoder")
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds")

    _guidance_scale: float = 7.5
    _guidance_rescale: float = 0.0
    _clip_skip: int | None = None
    _cross_attention_kwargs: dict[str, Any] | None = None

    def _register(self, requires_safety_checker: bool, **components: Any) -> None:
        """What every SD `__init__` does after naming its components."""
        components["scheduler"] = _fix_legacy_scheduler(components["scheduler"])
        if components.get("safety_checker") is not None and components.get("feature_extractor") is None:
            raise ValueError(
                f"{type(self).__name__}: a safety_checker needs a feature_extractor (a CLIPImageProcessor); "
                "pass safety_checker=None to turn the checker off"
            )
        if components.get("safety_checker") is None and requires_safety_checker:
            logger.warning(
                "%s: the safety checker is off (safety_checker=None). Keep it on for anything shown to the public, "
                "as the Stable Diffusion license asks; pass requires_safety_checker=False to silence this warning.",
                type(self).__name__,
            )
        self.register_modules(**components)
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        vae = components.get("vae")
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # --- call state, read by step-end callbacks (Diffusers' properties) ---------------------------------------------
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def do_classifier_free_guidance(self) -> bool:
        """guidance_scale <= 1 runs the UNet on the conditional batch only (a callback may lower it mid-run)."""
        return self._guidance_scale > 1

    # --- argument checks --------------------------------------------------------------------------------------------
    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The UNet's trained size in pixels for whichever of height/width is not given."""
        size = self.unet.config.sample_size
        default_h, default_w = (size, size) if isinstance(size, int) else size
        return height or default_h * self.vae_scale_factor, width or default_w * self.vae_scale_factor

    def check_size(self, height: Any, width: Any) -> None:
        for name, value in (("height", height), ("width", width)):
            check_positive_int(name, value)
            if value % 8:
                raise ValueError(f"{name} must be divisible by 8, got {value}")

    def check_common_inputs(
        self,
        *,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        num_inference_steps: int,
        timesteps: Sequence[int] | None,
        sigmas: Sequence[float] | None,
        guidance_scale: float,
        guidance_rescale: float,
        num_images_per_prompt: int,
        eta: float,
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        cross_attention_kwargs: dict[str, Any] | None,
        clip_skip: int | None,
        callback_on_step_end: StepEndCallback | None,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> tuple[int, list[str]]:
        """The checks every SD `__call__` shares, before any heavy work; (images in the batch, callback tensor names)."""
        prompts = check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        check_timesteps_args(self.scheduler, num_inference_steps, timesteps, sigmas)
        check_number("guidance_scale", guidance_scale)
        check_number("guidance_rescale", guidance_rescale, 0.0, 1.0)
        check_number("eta", eta, 0.0)
        check_generator(generator, prompts * num_images_per_prompt)
        check_output_type(output_type)
        check_clip_skip(clip_skip, self.text_encoder)
        if cross_attention_kwargs is not None:
            raise ValueError(
                f"cross_attention_kwargs={cross_attention_kwargs!r} is not supported by rapiddiff (no LoRA scale or "
                "custom attention arguments); pass None"
            )
        names = callback_tensor_names(
            callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )
        return prompts * num_images_per_prompt, names

    def _start_call(self, guidance_scale: float, guidance_rescale: float, clip_skip: int | None) -> None:
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = None

    # --- prompt, noise, model ---------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | str,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Diffusers' method: (prompt_embeds, negative_prompt_embeds); see `prompt.encode_prompt`."""
        if lora_scale is not None:
            raise ValueError(f"lora_scale={lora_scale!r}: rapiddiff does not load LoRA weights; pass None")
        unet = getattr(self, "unet", None)
        return encode_prompt(
            self.tokenizer,
            self.text_encoder,
            prompt,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            clip_skip=clip_skip,
            dtype=unet.dtype if unet is not None else None,
        )

    def encode_conditioning(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
    ) -> dict[str, torch.Tensor | None]:
        """The tensors the denoising loop conditions on, by callback name.

        With guidance, "prompt_embeds" is batched [negative; positive] for one UNet pass, as in Diffusers.
        """
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            clip_skip=self.clip_skip,
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}

    def latent_shape(self, batch_size: int, num_channels_latents: int, height: int, width: int) -> tuple[int, ...]:
        return (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def check_latents(self, latents: torch.Tensor | None, shape: tuple[int, ...]) -> None:
        if latents is not None and (not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must have shape {shape} (batch, channels, height/8, width/8), got {got}")

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial noise drawn as Diffusers draws it (so a seed gives its image), scaled by `init_noise_sigma`."""
        shape = self.latent_shape(batch_size, num_channels_latents, height, width)
        check_generator(generator, batch_size)
        self.check_latents(latents, shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(self, generator: Any, eta: float) -> dict[str, Any]:
        return extra_step_kwargs(self.scheduler, generator, eta)

    def unet_noise_predictor(
        self, tensors: dict[str, torch.Tensor | None], model_inputs: ModelInputs | None = None
    ) -> PredictNoise:
        """predict_noise(latents, t, i) for `denoise`: one UNet pass over [unconditional; conditional], guided.

        Reads the text embeddings from `tensors` at each step, so a step-end callback can replace them.
        """

        def predict_noise(latents: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            guided = self.do_classifier_free_guidance
            x = torch.cat([latents] * 2) if guided else latents
            x = self.scheduler.scale_model_input(x, t)
            extra: dict[str, Any] = {}
            if model_inputs is not None:
                x, extra = model_inputs(x, t, i)
            noise = self.unet(x, t, encoder_hidden_states=tensors["prompt_embeds"], return_dict=False, **extra)[0]
            return apply_guidance(noise, self._guidance_scale, self._guidance_rescale) if guided else noise

        return predict_noise

    # --- latents to images ------------------------------------------------------------------------------------------
    def run_safety_checker(
        self, image: torch.Tensor | np.ndarray, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor | np.ndarray, list[bool] | None]:
        return run_safety_checker(self.safety_checker, self.feature_extractor, image, device, dtype)

    def decode_latents_to_output(
        self, latents: torch.Tensor, output_type: str, return_dict: bool, dtype: torch.dtype
    ) -> StableDiffusionPipelineOutput | tuple[Any, list[bool] | None]:
        """VAE decode, safety check (flagged images come back black), post-process to `output_type`."""
        if output_type == "latent":
            image, nsfw = latents, None
        else:
            # In the VAE's dtype, without upcasting: Diffusers' SD pipelines decode float16 VAEs in float16.
            z = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
            image = self.vae.decode(z, return_dict=False)[0]
            image, nsfw = self.run_safety_checker(image, latents.device, dtype)
        denormalize = None if nsfw is None else [not flagged for flagged in nsfw]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        return StableDiffusionPipelineOutput(image, nsfw) if return_dict else (image, nsfw)


def _fix_legacy_scheduler(scheduler: Any) -> Any:
    """Diffusers rewrites outdated SD scheduler configs (steps_offset != 1, clip_sample) on load; so do we."""
    if scheduler is None:
        return None
    fixes = {}
    if scheduler.config.get("steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    if scheduler.config.get("clip_sample", False) is True:
        fixes["clip_sample"] = False
    if not fixes:
        return scheduler
    logger.warning("outdated scheduler config: using %s as Diffusers does; please update scheduler_config.json", fixes)
    return type(scheduler).from_config({**scheduler.config, **fixes})


class StableDiffusionPipeline(StableDiffusionBase):
    """Text-to-image with Stable Diffusion 1.x/2.x: Diffusers' `StableDiffusionPipeline`."""

    def __init__(
        self,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        unet: Any,
        scheduler: Any,
        safety_checker: Any,
        feature_extractor: Any,
        image_encoder: Any = None,
        requires_safety_checker: bool = True,
    ):
        self._register(
            requires_safety_checker,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
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
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> StableDiffusionPipelineOutput | tuple[Any, list[bool] | None]:
        """Generate images from `prompt` (or `prompt_embeds`); arguments and defaults as in Diffusers.

        guidance_scale <= 1 turns classifier-free guidance off (one UNet pass per step). output_type: "pil", "np",
        "pt" or "latent". Returns StableDiffusionPipelineOutput(images, nsfw_content_detected), or that tuple.
        """
        height, width = self.default_size(height, width)
        self.check_size(height, width)
        batch_size, callback_names = self.check_common_inputs(
            prompt=prompt,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            num_images_per_prompt=num_images_per_prompt,
            eta=eta,
            generator=generator,
            output_type=output_type,
            cross_attention_kwargs=cross_attention_kwargs,
            clip_skip=clip_skip,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        channels = self.unet.config.in_channels
        self.check_latents(latents, self.latent_shape(batch_size, channels, height, width))
        self._start_call(guidance_scale, guidance_rescale, clip_skip)
        device = self._execution_device

        tensors = self.encode_conditioning(
            prompt, device, num_images_per_prompt, negative_prompt, prompt_embeds, negative_prompt_embeds
        )
        dtype = tensors["prompt_embeds"].dtype
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        latents = self.prepare_latents(batch_size, channels, height, width, dtype, device, generator, latents)
        latents = denoise(
            self,
            latents,
            timesteps,
            num_inference_steps,
            self.unet_noise_predictor(tensors),
            extra_step_kwargs=self.prepare_extra_step_kwargs(generator, eta),
            tensors=tensors,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_names,
        )
        return self.decode_latents_to_output(latents, output_type, return_dict, dtype)
