"""Stable Diffusion pipelines (Diffusers' call signatures, same seed -> same image).

`StableDiffusionBase` is the model family on the call template (`template.py`): CLIP prompt encoding, latent noise,
classifier-free guidance, VAE decoding with the safety checker. Each pipeline writes its signature, its checks and
its hooks (`prepare_timesteps`, `prepare_denoising`); the rest is `DenoisingPipeline.generate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch

from ..loaders.ip_adapter import IPAdapterMixin
from ..loaders.lora import StableDiffusionLoraLoaderMixin
from ..loaders.textual_inversion import TextualInversionLoaderMixin
from ..models import lora_layers
from ..models.embeddings import guidance_scale_embedding
from ..utils.torch_utils import randn_tensor
from .call_signature import pipeline_call, pipeline_init
from .call_state import CallState
from .checks import check_generator, check_number, check_positive_int
from .denoise import (
    Conditioning,
    Guidance,
    Scheduler,
    extra_step_kwargs,
)
from .image_processor import VaeImageProcessor
from .memory import StableDiffusionMixin
from .pipeline_utils import BaseOutput
from .prompt import check_clip_skip, encode_prompt
from .safety_checker import check_safety_components, run_safety_checker
from .template import CallArgs, DenoisingPipeline, LoopStart

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StableDiffusionPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None


class StableDiffusionBase(
    StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin, StableDiffusionMixin, DenoisingPipeline
):
    """The Stable Diffusion family on the call template; subclasses define `__init__` (their components), their
    `__call__` signature, checks and hooks."""

    _optional_components = ("safety_checker", "feature_extractor", "image_encoder")
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds")
    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"  # Diffusers' offload order and exclusions
    _exclude_from_cpu_offload = ("safety_checker",)
    deprecated_step_callback = True  # `callback=` / `callback_steps=` run with Diffusers' FutureWarning
    # The outdated scheduler-config keys this pipeline's `__init__` rewrites (`fix_legacy_scheduler`): Diffusers'
    # text-to-image, img2img and inpainting pipelines do, its ControlNet and upscaler pipelines do not.
    _legacy_scheduler_fixes: ClassVar[tuple[str, ...]] = ()

    def callback_step_order(self) -> int:
        """An older `callback` gets step `i // scheduler.order`, as Diffusers' SD pipelines count."""
        return self.scheduler.order

    def register_components(self, components: dict[str, Any], config: dict[str, Any]) -> None:
        """What every SD `__init__` does with its components and config."""
        fix_legacy_scheduler(components["scheduler"], self._legacy_scheduler_fixes)
        check_safety_components(
            type(self).__name__,
            components.get("safety_checker"),
            components.get("feature_extractor"),
            config["requires_safety_checker"],
        )
        self.register_modules(**components)
        self.register_to_config(**config)
        vae = components.get("vae")
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # --- argument checks --------------------------------------------------------------------------------------------
    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The UNet's trained size in pixels for whichever of height/width is not given."""
        size = self.unet.config.sample_size
        default_h, default_w = (size, size) if isinstance(size, int) else size
        return (
            default_h * self.vae_scale_factor if height is None else height,
            default_w * self.vae_scale_factor if width is None else width,
        )

    def check_size(self, height: Any, width: Any) -> None:
        for name, value in (("height", height), ("width", width)):
            check_positive_int(name, value)
            if value % 8:
                raise ValueError(f"{name} must be divisible by 8, got {value}")

    def check_inputs(self, args: CallArgs) -> None:
        super().check_inputs(args)
        check_clip_skip(args.clip_skip, self.text_encoder)
        check_cross_attention_kwargs(args.cross_attention_kwargs)
        if uses_ip_adapter(args):
            self.ip_adapter_projections()  # loaded, else a ValueError (IPAdapterMixin)

    def call_scope(self, state: CallState) -> contextlib.AbstractContextManager[None]:
        """The call's LoRA scale on the UNet's adapters (a buffer update: no recompile), back to 1.0 when the call
        ends, error or not."""
        scale = state.lora_scale
        return lora_layers.call_scale(getattr(self, "unet", None), 1.0 if scale is None else scale)

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
        """Diffusers' method: (prompt_embeds, negative_prompt_embeds); see `prompt.encode_prompt`.

        lora_scale scales the text encoder's LoRA adapters while encoding; multi-vector textual-inversion tokens are
        expanded in the prompts (`maybe_convert_prompt`).
        """
        if lora_scale is not None:
            check_number("lora_scale", lora_scale)
        unet = getattr(self, "unet", None)
        if self.tokenizer is not None:
            prompt = self.maybe_convert_prompt(prompt, self.tokenizer) if prompt is not None else None
            negative_prompt = (
                self.maybe_convert_prompt(negative_prompt, self.tokenizer) if negative_prompt else negative_prompt
            )
        with lora_layers.call_scale(self.text_encoder, lora_scale):
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

    def encode_conditioning(self, args: CallArgs, device: torch.device) -> dict[str, torch.Tensor | None]:
        """The call's LoRA scale (`cross_attention_kwargs["scale"]`) goes to the text encoder (the UNet's: `call_scope`)."""
        lora_scale = self.call_state.lora_scale
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            args.prompt,
            device,
            args.num_images_per_prompt,
            self.do_classifier_free_guidance,
            args.negative_prompt,
            args.prompt_embeds,
            args.negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        conditioning = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        if uses_ip_adapter(args):  # one tensor per adapter, batched as prompt_embeds
            conditioning[IP_ADAPTER_EMBEDS] = self.prepare_ip_adapter_image_embeds(
                args.ip_adapter_image,
                args.ip_adapter_image_embeds,
                device,
                args.batch_size,
                self.do_classifier_free_guidance,
            )
        return conditioning

    # --- LCM-distilled UNets (time_cond_proj_dim): the guidance scale is an input, not a second UNet pass ------------
    @property
    def lcm_distilled(self) -> bool:
        """Whether the UNet takes the guidance scale as an input (`time_cond_proj_dim`), as LCM-distilled ones do."""
        unet = getattr(self, "unet", None)
        return unet is not None and getattr(unet.config, "time_cond_proj_dim", None) is not None

    @property
    def do_classifier_free_guidance(self) -> bool:
        """As Diffusers' SD pipelines: never with an LCM-distilled UNet, which takes the guidance scale embedded."""
        return super().do_classifier_free_guidance and not self.lcm_distilled

    def get_guidance_scale_embedding(
        self, w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Diffusers' method: sinusoidal features (len(w), embedding_dim) of guidance scales w."""
        return guidance_scale_embedding(w, embedding_dim, dtype)

    def guidance(self, state: CallState) -> Guidance:
        """An LCM-distilled UNet runs once per step: no classifier-free guidance batch."""
        return Guidance(1.0) if self.lcm_distilled else super().guidance(state)

    def model_extras(self, state: CallState, conditioning: Conditioning) -> dict[str, Any]:
        """An LCM-distilled UNet also gets `timestep_cond`: the embedding of guidance_scale - 1 (the call's value at
        the start, as Diffusers computes it once), one row per image. With IP-Adapter images, the UNet gets their
        embeddings (`added_cond_kwargs`) and the call's `ip_adapter_masks`."""
        extras: dict[str, Any] = {}
        if IP_ADAPTER_EMBEDS in conditioning:
            extras["added_cond_kwargs"] = {"image_embeds": conditioning[IP_ADAPTER_EMBEDS]}
            masks = (state.cross_attention_kwargs or {}).get("ip_adapter_masks")
            if masks is not None:
                extras["cross_attention_kwargs"] = {"ip_adapter_masks": masks}
        if not self.lcm_distilled:
            return extras
        embeds = conditioning["prompt_embeds"]
        w = torch.tensor(state.guidance_scale - 1).repeat(embeds.shape[0])
        cond = guidance_scale_embedding(w, self.unet.config.time_cond_proj_dim)
        return {**extras, "timestep_cond": cond.to(device=embeds.device, dtype=embeds.dtype)}

    def latent_shape(self, batch_size: int, num_channels_latents: int, height: int, width: int) -> tuple[int, ...]:
        return (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def check_latents(self, latents: torch.Tensor | None, shape: tuple[int, ...]) -> None:
        if latents is not None and (not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must have shape {shape} (batch, channels, height/8, width/8), got {got}")

    def prepare_denoising(
        self, args: CallArgs, timesteps: torch.Tensor, conditioning: Conditioning, device: torch.device
    ) -> LoopStart:
        """Text-to-image's start, the family default: noise drawn as Diffusers draws it; no step hooks."""
        latents = self.prepare_latents(
            args.batch_size,
            self.unet.config.in_channels,
            args.height,
            args.width,
            conditioning["prompt_embeds"].dtype,
            device,
            args.generator,
            args.latents,
        )
        return LoopStart(latents)

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
        noise = self.draw_noise(batch_size, num_channels_latents, height, width, dtype, device, generator, latents)
        return noise * self.scheduler.init_noise_sigma

    def draw_noise(
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
        """The unscaled initial noise: `latents` if given, else drawn as Diffusers draws it (inpainting keeps it to
        re-noise the known region)."""
        shape = self.latent_shape(batch_size, num_channels_latents, height, width)
        check_generator(generator, batch_size)
        self.check_latents(latents, shape)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=dtype)

    def prepare_extra_step_kwargs(self, generator: Any, eta: float) -> dict[str, Any]:  # Diffusers' method
        return extra_step_kwargs(self.scheduler, generator, eta)

    # --- latents to images ------------------------------------------------------------------------------------------
    def run_safety_checker(
        self, image: torch.Tensor | np.ndarray, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor | np.ndarray, list[bool] | None]:
        return run_safety_checker(self.safety_checker, self.feature_extractor, image, device, dtype)

    def to_output(
        self, latents: torch.Tensor, args: CallArgs, dtype: torch.dtype
    ) -> StableDiffusionPipelineOutput | tuple[Any, list[bool] | None]:
        """VAE decode, safety check (flagged images come back black), post-process to `output_type`."""
        if args.output_type == "latent":
            image, nsfw = latents, None
        else:
            # In the VAE's dtype like Diffusers' SD pipelines; float32 again only if float16 overflowed (force_upcast).
            image = self.vae.decode_finite((latents / self.vae.config.scaling_factor).to(self.vae.dtype))
            image, nsfw = self.run_safety_checker(image, latents.device, dtype)
        denormalize = None if nsfw is None else [not flagged for flagged in nsfw]
        image = self.image_processor.postprocess(image, output_type=args.output_type, do_denormalize=denormalize)
        return StableDiffusionPipelineOutput(image, nsfw) if args.return_dict else (image, nsfw)


# The call's IP-Adapter image embeddings in its conditioning (one tensor per adapter; not a callback tensor).
IP_ADAPTER_EMBEDS = "ip_adapter_image_embeds"


def uses_ip_adapter(args: CallArgs) -> bool:
    return args.ip_adapter_image is not None or args.ip_adapter_image_embeds is not None


def check_cross_attention_kwargs(cross_attention_kwargs: Any) -> None:
    """Supported: the LoRA scale, {"scale": number}, and IP-Adapter's {"ip_adapter_masks": [...]} (checked by the
    IP-Adapter layers), or None."""
    if cross_attention_kwargs is None:
        return
    if not isinstance(cross_attention_kwargs, dict) or set(cross_attention_kwargs) - {"scale", "ip_adapter_masks"}:
        raise ValueError(
            f"cross_attention_kwargs={cross_attention_kwargs!r}: rapiddiff supports only the LoRA scale, "
            '{"scale": number}, and IP-Adapter masks, {"ip_adapter_masks": [...]}, or None (no custom '
            "attention-processor arguments)"
        )
    if "scale" in cross_attention_kwargs:
        check_number('cross_attention_kwargs["scale"]', cross_attention_kwargs["scale"])


# Outdated scheduler-config values Diffusers' SD pipelines rewrite in `__init__`: key -> (outdated when, rewritten to).
LEGACY_SCHEDULER_FIXES: dict[str, tuple[Callable[[Any], bool], Any]] = {
    "steps_offset": (lambda v: v != 1, 1),
    "clip_sample": (lambda v: v is True, False),
    "skip_prk_steps": (lambda v: v is False, True),
}


def fix_legacy_scheduler(scheduler: Scheduler | None, keys: Sequence[str]) -> None:
    """Rewrite the outdated values of `keys` in the scheduler's config, in place, as Diffusers' SD pipelines do.

    As in Diffusers, a rewritten key stays listed in `_use_default_values` when it was defaulted (a later swap with
    `from_config` gives the new scheduler its own default), and a key the scheduler keeps aside for swaps is rewritten
    there."""
    if scheduler is None:
        return
    config = scheduler.config
    fixes = {}
    for key in keys:
        outdated, value = LEGACY_SCHEDULER_FIXES[key]
        if key in config and outdated(config[key]):
            fixes[key] = value
    if not fixes:
        return
    logger.warning("outdated scheduler config: using %s as Diffusers does; please update scheduler_config.json", fixes)
    own = {k: v for k, v in fixes.items() if k in config._field_names()}
    hidden = {**config.hidden, **{k: v for k, v in fixes.items() if k not in own}}
    scheduler.config = config.replace(**own).with_extras(hidden, config.defaulted)


class StableDiffusionPipeline(IPAdapterMixin, StableDiffusionBase):
    """Text-to-image with Stable Diffusion 1.x/2.x: Diffusers' `StableDiffusionPipeline`."""

    _legacy_scheduler_fixes = ("steps_offset", "clip_sample")

    __init__ = pipeline_init(
        "vae text_encoder tokenizer unet scheduler safety_checker feature_extractor image_encoder=None "
        "requires_safety_checker=True"
    )

    __call__ = pipeline_call(
        CallArgs,
        """Generate images from `prompt` (or `prompt_embeds`); arguments and defaults as in Diffusers.

        guidance_scale <= 1 turns classifier-free guidance off (one UNet pass per step). output_type: "pil", "np",
        "pt" or "latent". Returns StableDiffusionPipelineOutput(images, nsfw_content_detected), or that tuple.
        """,
        "prompt height width num_inference_steps timesteps sigmas guidance_scale negative_prompt "
        "num_images_per_prompt eta generator latents prompt_embeds negative_prompt_embeds ip_adapter_image "
        "ip_adapter_image_embeds output_type return_dict cross_attention_kwargs guidance_rescale clip_skip "
        "callback_on_step_end callback_on_step_end_tensor_inputs",
        returns="StableDiffusionPipelineOutput | tuple[Any, list[bool] | None]",
        var_kwargs=True,
    )

    def check_inputs(self, args: CallArgs) -> None:
        super().check_inputs(args)
        self.resolve_size(args)
        channels = self.unet.config.in_channels
        self.check_latents(args.latents, self.latent_shape(args.batch_size, channels, args.height, args.width))
