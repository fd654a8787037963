"""Stable Diffusion pipelines (Diffusers' call signatures, same seed -> same image).

`StableDiffusionBase` is the model family on the call template (`template.py`): CLIP prompt encoding, latent noise,
classifier-free guidance, VAE decoding with the safety checker. Each pipeline writes its signature, its checks and
its hooks (`prepare_timesteps`, `prepare_denoising`); the rest is `DenoisingPipeline.generate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..loaders.lora import StableDiffusionLoraLoaderMixin
from ..loaders.textual_inversion import TextualInversionLoaderMixin
from ..models import lora_layers
from ..utils.torch_utils import randn_tensor
from .call_state import CallState
from .checks import check_finite, check_generator, check_number, check_positive_int
from .denoise import (
    Conditioning,
    Scheduler,
    StepEndCallback,
    extra_step_kwargs,
    retrieve_timesteps,
    truncate_timesteps,
)
from .image_processor import PipelineImageInput, VaeImageProcessor
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

    def callback_step_order(self) -> int:
        """An older `callback` gets step `i // scheduler.order`, as Diffusers' SD pipelines count."""
        return self.scheduler.order

    def _register(self, requires_safety_checker: bool, **components: Any) -> None:
        """What every SD `__init__` does after naming its components."""
        components["scheduler"] = _fix_legacy_scheduler(components["scheduler"])
        check_safety_components(
            type(self).__name__,
            components.get("safety_checker"),
            components.get("feature_extractor"),
            requires_safety_checker,
        )
        self.register_modules(**components)
        self.register_to_config(requires_safety_checker=requires_safety_checker)
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

    def prepare_timesteps(self, args: CallArgs, device: torch.device) -> tuple[torch.Tensor, int]:
        """A call with a `strength` (img2img, inpainting) runs the last `strength` share of the schedule."""
        if isinstance(args, Img2ImgArgs):
            return strength_timesteps(
                self.scheduler, args.num_inference_steps, device, args.timesteps, args.sigmas, args.strength
            )
        return super().prepare_timesteps(args, device)

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


def check_cross_attention_kwargs(cross_attention_kwargs: Any) -> None:
    """Only the LoRA scale is supported: {"scale": number} or None."""
    if cross_attention_kwargs is None:
        return
    if not isinstance(cross_attention_kwargs, dict) or set(cross_attention_kwargs) - {"scale"}:
        raise ValueError(
            f"cross_attention_kwargs={cross_attention_kwargs!r}: rapiddiff supports only the LoRA scale, "
            '{"scale": number}, or None (no custom attention-processor arguments)'
        )
    if "scale" in cross_attention_kwargs:
        check_number('cross_attention_kwargs["scale"]', cross_attention_kwargs["scale"])


def _fix_legacy_scheduler(scheduler: Scheduler | None) -> Scheduler | None:
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
        scheduler: Scheduler,
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
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - Diffusers' default
        **kwargs: Any,
    ) -> StableDiffusionPipelineOutput | tuple[Any, list[bool] | None]:
        """Generate images from `prompt` (or `prompt_embeds`); arguments and defaults as in Diffusers.

        guidance_scale <= 1 turns classifier-free guidance off (one UNet pass per step). output_type: "pil", "np",
        "pt" or "latent". Returns StableDiffusionPipelineOutput(images, nsfw_content_detected), or that tuple.
        """
        return self.generate(CallArgs.from_locals(locals()))

    def check_inputs(self, args: CallArgs) -> None:
        super().check_inputs(args)
        self.resolve_size(args)
        channels = self.unet.config.in_channels
        self.check_latents(args.latents, self.latent_shape(args.batch_size, channels, args.height, args.width))

    def prepare_denoising(
        self, args: CallArgs, timesteps: torch.Tensor, conditioning: Conditioning, device: torch.device
    ) -> LoopStart:
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


# --- image-conditioned pipelines: img2img and inpainting ------------------------------------------------------------
def required(name: str, value: Any) -> Any:
    if value is None:
        raise ValueError(f"{name} is required: pass a PIL image, a numpy array, a torch tensor or a list of them")
    return value


def check_unet_in_channels(unet: Any, allowed: dict[int, str]) -> None:
    """The pipeline's UNet input fits: `allowed` maps each accepted in_channels to what it means."""
    channels = unet.config.in_channels
    if channels not in allowed:
        fits = "; ".join(f"{c} ({what})" for c, what in allowed.items())
        raise ValueError(f"unet.config.in_channels={channels} does not fit this pipeline; allowed: {fits}")


def batch_repeats(name: str, n: int, batch_size: int) -> int:
    """How often a batch of `n` images (or masks) is repeated to `batch_size` (prompts x num_images_per_prompt).

    Diffusers' rule: one image for all, or a batch that divides batch_size and is repeated (tiled).
    """
    if n < 1 or batch_size % n:
        raise ValueError(
            f"{name} has a batch of {n}, which does not fit the {batch_size} images to generate (prompts x "
            f"num_images_per_prompt); allowed: a batch that divides {batch_size}, e.g. 1 or {batch_size}"
        )
    return batch_size // n


def encode_image_latents(
    vae: Any, image: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> latents scaled by `scaling_factor`, the VAE posterior sampled as Diffusers'
    `retrieve_latents` does: with the one generator, or with generator i for image i."""
    if isinstance(generator, list):
        generator = generator[: image.shape[0]]
    return vae.encode(image).latent_dist.sample(generator) * vae.config.scaling_factor


def strength_timesteps(
    scheduler: Scheduler,
    num_inference_steps: int,
    device: torch.device,
    timesteps: Sequence[int] | None,
    sigmas: Sequence[float] | None,
    strength: float,
) -> tuple[torch.Tensor, int]:
    """Set the schedule and keep its last `strength` share, starting the scheduler there; (timesteps, steps run)."""
    _, steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
    timesteps, steps_run = truncate_timesteps(scheduler, steps, strength)
    if steps_run < 1:
        raise ValueError(
            f"strength={strength} runs no denoising step of num_inference_steps={steps}: int(steps x strength) is 0; "
            f"allowed: strength >= {1 / steps:g}, or more steps"
        )
    return timesteps, steps_run


@dataclasses.dataclass(kw_only=True)
class Img2ImgArgs(CallArgs):
    """img2img's call: the image and the share of the schedule that runs."""

    image: PipelineImageInput | None
    strength: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("strength", self.strength, 0.0, 1.0)


@dataclasses.dataclass(kw_only=True)
class InpaintArgs(Img2ImgArgs):
    """Inpainting's call: img2img's plus the mask."""

    mask_image: PipelineImageInput | None
    masked_image_latents: torch.Tensor | None
    padding_mask_crop: int | None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.padding_mask_crop is not None:
            raise ValueError(f"padding_mask_crop={self.padding_mask_crop!r} is not supported by rapiddiff; pass None")
        check_finite("masked_image_latents", self.masked_image_latents)


class StableDiffusionImg2ImgPipeline(StableDiffusionBase):
    """Image-to-image with Stable Diffusion: Diffusers' `StableDiffusionImg2ImgPipeline`.

    The image is encoded, noised to the timestep where the last `strength` share of the schedule starts, and denoised
    from there: strength 1 ignores the image's content, strength 0.3 keeps most of it.
    """

    __init__ = StableDiffusionPipeline.__init__

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
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
        """Transform `image` (PIL, array or tensor in [0, 1], or (B, 4, h, w) latents) following `prompt`.

        strength in [0, 1]: the share of the `num_inference_steps` schedule that runs. Other arguments as
        text-to-image (no height/width: the image's size, rounded down to a multiple of the VAE factor).
        """
        return self.generate(Img2ImgArgs.from_locals(locals()))

    def check_inputs(self, args: Img2ImgArgs) -> None:
        super().check_inputs(args)
        check_unet_in_channels(self.unet, {self.vae.config.latent_channels: "the VAE's latent channels"})
        args.image = self.image_processor.preprocess(required("image", args.image))
        check_finite("image", args.image)
        batch_repeats("image", args.image.shape[0], args.batch_size)

    def prepare_denoising(
        self, args: Img2ImgArgs, timesteps: torch.Tensor, conditioning: Conditioning, device: torch.device
    ) -> LoopStart:
        start = timesteps[:1].repeat(args.batch_size)
        dtype = conditioning["prompt_embeds"].dtype
        return LoopStart(self.prepare_image_latents(args.image, start, args.batch_size, dtype, device, args.generator))

    def prepare_image_latents(
        self,
        image: torch.Tensor,
        timestep: torch.Tensor,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> torch.Tensor:
        """The image's latents (encoded unless `image` already is latents), repeated to the batch, noised to
        `timestep` with `scheduler.add_noise`. Generators are consumed in Diffusers' order: the same seed, the same
        image."""
        image = image.to(device=device, dtype=dtype)
        if image.shape[1] == self.vae.config.latent_channels:
            latents = image
        else:
            if isinstance(generator, list):  # one generator per output image: duplicate the images first
                image = image.repeat(batch_repeats("image", image.shape[0], batch_size), 1, 1, 1)
            latents = encode_image_latents(self.vae, image, generator)
        latents = latents.repeat(batch_repeats("image", latents.shape[0], batch_size), 1, 1, 1)
        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(latents, noise, timestep)


class StableDiffusionInpaintPipeline(StableDiffusionBase):
    """Inpainting with Stable Diffusion: Diffusers' `StableDiffusionInpaintPipeline`.

    White mask pixels are repainted, black ones kept. A 9-channel inpainting UNet sees the mask and the masked image's
    latents next to the noisy latents; a plain 4-channel UNet is used by pasting the (re-noised) known region back
    after every step.
    """

    __init__ = StableDiffusionPipeline.__init__
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents")

    def _register(self, requires_safety_checker: bool, **components: Any) -> None:
        super()._register(requires_safety_checker, **components)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

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
            args.image, start, args.strength, plain_unet, dtype, device, args.generator, args.latents
        )
        masked_image_latents = args.masked_image_latents
        if masked_image_latents is None:
            masked_image = (args.image * (args.mask_image < 0.5)).to(device=device, dtype=dtype)
            masked_image_latents = encode_image_latents(self.vae, masked_image, args.generator)
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(initial latents, noise, image latents or None). Strength 1: pure noise; below 1: the image's latents
        noised to `timestep`; given `latents` are taken as the noise (Diffusers' rule, whatever the strength)."""
        batch_size = timestep.shape[0]
        image_latents = None
        if need_image_latents or (latents is None and strength < 1):
            image_latents = encode_image_latents(self.vae, image.to(device=device, dtype=dtype), generator)
            image_latents = image_latents.repeat(batch_repeats("image", image_latents.shape[0], batch_size), 1, 1, 1)
        height, width = image.shape[-2:]
        channels = self.vae.config.latent_channels
        noise = self.draw_noise(batch_size, channels, height, width, dtype, device, generator, latents)
        if latents is None and strength < 1:
            return self.scheduler.add_noise(image_latents, noise, timestep), noise, image_latents
        return noise * self.scheduler.init_noise_sigma, noise, image_latents

    def preprocess_image_and_mask(
        self, image: PipelineImageInput, mask_image: PipelineImageInput, height: int, width: int, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image in [-1, 1], binary mask), both (B, C, height, width) float32; sizes and batches checked."""
        init_image = self.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        if init_image.shape[1] == self.vae.config.latent_channels:
            raise ValueError(
                f"image: got latents {tuple(init_image.shape)}; inpainting needs the image in pixels (it is masked "
                "before encoding); pass precomputed latents of the masked image as masked_image_latents"
            )
        image_size, mask_size = self.image_processor.input_size(image), self.mask_processor.input_size(mask_image)
        if image_size != mask_size:
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
