"""DeepFloyd IF: stage I (text -> 64 px) and stage II (super-resolution to 256 px), as Diffusers' IFPipeline and
IFSuperResolutionPipeline, with IF's safety checker and watermarker.

IF denoises pixels directly with DDPM. Its UNet predicts the noise and a learned variance (6 channels: eps, then the
"learned_range" interpolation); classifier-free guidance mixes the noise halves only and keeps the conditional
branch's variance, as Diffusers does. Stage outputs chain as tensors in [-1, 1]: `output_type="pt"` returns the final
sample unclamped, and stage II and the x4 upscaler take that tensor as `image`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..utils.torch_utils import randn_tensor
from .call_signature import pipeline_call, pipeline_init
from .call_state import CallState
from .caption import preprocess_prompt
from .checks import check_finite, check_generator, check_positive_int
from .denoise import Conditioning, Guidance, combine_guidance
from .image_processor import VaeImageProcessor
from .pipeline_utils import BaseOutput
from .prompt import PromptInput, encode_prompt
from .safety_checker import check_safety_components, run_safety_checker
from .template import CallArgs, DenoisingPipeline, LoopStart

logger = logging.getLogger(__name__)

IF_MAX_TOKENS = 77  # IF's T5 was trained on 77 tokens
IF_OUTPUT_TYPES = ("pil", "np", "pt")
LEARNED_VARIANCES = ("learned", "learned_range")


@dataclasses.dataclass(frozen=True)
class LearnedVarianceGuidance(Guidance):
    """IF's guidance: the UNet predicts the noise and a learned variance; the noise channels are guided and the
    variance channels are the conditional branch's, kept for a scheduler that uses them and dropped otherwise."""

    keep_variance: bool = False

    def __call__(self, model_output: torch.Tensor, channels: int) -> torch.Tensor:
        if self.active:
            uncond, cond = model_output.chunk(2)
            guided = combine_guidance(uncond[:, :channels], cond[:, :channels], self.scale)
            model_output = torch.cat([guided, cond[:, channels:]], dim=1)
        return model_output if self.keep_variance else model_output[:, :channels]


@dataclasses.dataclass
class IFPipelineOutput(BaseOutput):
    """images: PIL images, a (B, H, W, 3) array in [0, 1], or for "pt" the (B, 3, H, W) sample in [-1, 1]."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_detected: list[bool] | None
    watermark_detected: list[bool] | None


# --- the pipelines -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(kw_only=True)
class IFArgs(CallArgs):
    """The IF stages' call: the common arguments plus `clean_caption`."""

    clean_caption: bool


@dataclasses.dataclass(kw_only=True)
class IFSuperResolutionArgs(IFArgs):
    """Stage II's call: the stage-I image (a (B, C, h, w) tensor after the checks) and its noise level."""

    image: PIL.Image.Image | np.ndarray | torch.Tensor | list | None
    noise_level: int


class IFPipelineBase(DenoisingPipeline):
    """The DeepFloyd IF family on the call template: T5 prompt encoding, pixel-space noise, guidance of the noise
    channels only (the learned variance is the conditional branch's), IF's safety checker and watermark."""

    _optional_components = ("tokenizer", "text_encoder", "safety_checker", "feature_extractor", "watermarker")
    model_cpu_offload_seq = "text_encoder->unet"  # Diffusers' offload order and exclusions
    _exclude_from_cpu_offload = ("watermarker",)
    output_types = IF_OUTPUT_TYPES
    hook_before_scaling = True

    def register_components(self, components: dict[str, Any], config: dict[str, Any]) -> None:
        check_safety_components(
            type(self).__name__,
            components["safety_checker"],
            components["feature_extractor"],
            config["requires_safety_checker"],
            license="DeepFloyd IF",
        )
        self.register_modules(**components)
        self.register_to_config(**config)

    # --- prompt -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: PromptInput,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        device: torch.device | str | None = None,
        negative_prompt: PromptInput = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clean_caption: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Diffusers' IF method: T5 embeddings of (prompt, negative_prompt), 77 tokens; the text cleaned
        (clean_caption=True, `rapiddiff.pipelines.caption`) or lower-cased and stripped."""
        check_clean_caption(clean_caption)
        return encode_prompt(
            self.tokenizer,
            self.text_encoder,
            preprocess_prompt(prompt, clean_caption),
            device if device is not None else self._execution_device,
            num_images_per_prompt,
            do_classifier_free_guidance,
            preprocess_prompt(negative_prompt, clean_caption),
            prompt_embeds,
            negative_prompt_embeds,
            # Without a text encoder: the UNet's dtype; with neither (an encode-only pipeline), as given
            dtype=self.unet.dtype if getattr(self, "unet", None) is not None else None,
            max_length=IF_MAX_TOKENS,
            attention_mask=True,
        )

    def encode_conditioning(self, args: CallArgs, device: torch.device) -> dict[str, torch.Tensor | None]:
        guided = self.do_classifier_free_guidance
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            args.prompt,
            guided,
            args.num_images_per_prompt,
            device,
            args.negative_prompt,
            args.prompt_embeds,
            args.negative_prompt_embeds,
            clean_caption=args.clean_caption,
        )
        if guided:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}

    # --- argument checks --------------------------------------------------------------------------------------------
    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        size = self.unet.config.sample_size
        default_h, default_w = (size, size) if isinstance(size, int) else size
        return (default_h if height is None else height, default_w if width is None else width)

    def check_size(self, height: Any, width: Any) -> None:
        """IF's UNets halve and double the maps with no size correction: sides must divide by the total factor."""
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        for name, value in (("height", height), ("width", width)):
            check_positive_int(name, value)
            if value % factor:
                raise ValueError(f"{name} must be a multiple of {factor} for this UNet, got {value}")

    def check_inputs(self, args: IFArgs) -> None:
        super().check_inputs(args)
        self.resolve_size(args)
        check_clean_caption(args.clean_caption)
        if args.cross_attention_kwargs is not None:
            raise ValueError(
                f"cross_attention_kwargs={args.cross_attention_kwargs!r} is not supported by rapiddiff's IF pipelines "
                "(no LoRA scale or custom attention arguments); pass None"
            )

    # --- denoising --------------------------------------------------------------------------------------------------
    def prepare_intermediate_images(
        self,
        batch_size: int,
        num_channels: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> torch.Tensor:
        """The initial noise, drawn as Diffusers draws it (same seed -> same image)."""
        check_generator(generator, batch_size)
        noise = randn_tensor((batch_size, num_channels, height, width), generator=generator, device=device, dtype=dtype)
        return noise * self.scheduler.init_noise_sigma

    def guidance(self, state: CallState) -> Guidance:
        """Guidance of the noise channels; the learned variance is kept for a scheduler that uses it."""
        keep = getattr(state.scheduler.config, "variance_type", None) in LEARNED_VARIANCES
        return LearnedVarianceGuidance(state.guidance_scale, keep_variance=keep)

    # --- outputs ----------------------------------------------------------------------------------------------------
    def to_output(
        self, images: torch.Tensor, args: CallArgs, dtype: torch.dtype
    ) -> IFPipelineOutput | tuple[Any, list[bool] | None, list[bool] | None]:
        """ "pt": the sample as is. "np"/"pil": [0, 1], safety-checked (flagged images black); "pil" watermarked."""
        nsfw = watermark = None
        if args.output_type != "pt":
            images = VaeImageProcessor.pt_to_numpy(VaeImageProcessor.denormalize(images))
            if self.safety_checker is not None:
                images, nsfw, watermark = run_safety_checker(
                    self.safety_checker, self.feature_extractor, images, self._execution_device, dtype
                )
            if args.output_type == "pil":
                images = VaeImageProcessor.numpy_to_pil(images)
                if self.watermarker is not None:
                    images = self.watermarker.apply_watermark(images, self.unet.config.sample_size)
        return IFPipelineOutput(images, nsfw, watermark) if args.return_dict else (images, nsfw, watermark)


class IFPipeline(IFPipelineBase):
    """DeepFloyd IF stage I: text to a 64x64 image. Diffusers' `IFPipeline`."""

    __init__ = pipeline_init(
        "tokenizer text_encoder unet scheduler safety_checker feature_extractor watermarker requires_safety_checker=True"
    )

    __call__ = pipeline_call(
        IFArgs,
        """Generate 64x64 images from `prompt` or T5 `prompt_embeds` (B, tokens, 4096); arguments as Diffusers.

        guidance_scale <= 1 turns classifier-free guidance off. output_type "pt" gives the (B, 3, H, W) sample in
        [-1, 1] for stage II / the x4 upscaler; "np" and "pil" are in [0, 1] and safety-checked. clean_caption=True
        (Diffusers' default) cleans text prompts as Diffusers does (needs `rapiddiff[if]`; without it a warning and
        lower-case + strip, as Diffusers). Returns IFPipelineOutput(images, nsfw_detected, watermark_detected), or that tuple.
        """,
        "prompt num_inference_steps timesteps guidance_scale negative_prompt num_images_per_prompt height width "
        "eta generator prompt_embeds negative_prompt_embeds output_type return_dict callback callback_steps "
        "clean_caption cross_attention_kwargs",
        returns="IFPipelineOutput | tuple[Any, list[bool] | None, list[bool] | None]",
        num_inference_steps=100,
        guidance_scale=7.0,
    )

    def prepare_denoising(
        self, args: IFArgs, timesteps: torch.Tensor, conditioning: Conditioning, device: torch.device
    ) -> LoopStart:
        channels = self.unet.config.in_channels
        dtype = conditioning["prompt_embeds"].dtype
        images = self.prepare_intermediate_images(
            args.batch_size, channels, args.height, args.width, dtype, device, args.generator
        )
        return LoopStart(images)


class IFSuperResolutionPipeline(IFPipelineBase):
    """DeepFloyd IF stage II: a stage-I image upscaled (bilinear), noised to `noise_level`, and denoised at 256 px.
    Diffusers' `IFSuperResolutionPipeline`."""

    __init__ = pipeline_init(
        "tokenizer text_encoder unet scheduler image_noising_scheduler safety_checker feature_extractor watermarker "
        "requires_safety_checker=True"
    )

    def register_components(self, components: dict[str, Any], config: dict[str, Any]) -> None:
        unet = components["unet"]
        if unet is not None and unet.config.in_channels != 6:
            logger.warning(
                "IFSuperResolutionPipeline: the unet has in_channels=%d; IF's super-resolution UNets take 6 (the "
                "sample and the upscaled image). Is this a stage-I UNet?",
                unet.config.in_channels,
            )
        super().register_components(components, config)

    def check_noise_level(self, noise_level: Any) -> None:
        limit = self.image_noising_scheduler.config.num_train_timesteps
        if not isinstance(noise_level, int) or isinstance(noise_level, bool) or not 0 <= noise_level < limit:
            raise ValueError(
                f"noise_level must be an int timestep of the image_noising_scheduler, in [0, {limit}), "
                f"got {noise_level!r}"
            )

    def check_image(self, image: torch.Tensor, prompts: int, height: int, width: int) -> None:
        """The stage-I image (already a tensor) must fit the prompts, the UNet and the output size."""
        channels = self.unet.config.in_channels // 2
        b, c, h, w = image.shape
        if c != channels:
            raise ValueError(
                f"image has {c} channels, this UNet (in_channels={self.unet.config.in_channels}) takes {channels}-channel "
                f"images: pass the stage-I output (B, {channels}, H, W)"
            )
        if b != prompts:
            raise ValueError(f"image has batch size {b} but there are {prompts} prompts: pass one image per prompt")
        if h > height or w > width:
            raise ValueError(
                f"image is {h}x{w}, larger than the output height x width {height}x{width}: stage II upscales; pass "
                "the stage-I image, or a larger height/width"
            )

    __call__ = pipeline_call(
        IFSuperResolutionArgs,
        """Upscale stage-I `image` (one per prompt) to height x width (default: the UNet's sample_size).

        image: stage I's output_type="pt" tensor (B, 3, h, w) in [-1, 1]; numpy arrays (B, h, w, 3) are taken as
        they are too, PIL images are mapped from [0, 255] to [-1, 1] (Diffusers' rules). noise_level: the timestep
        of `image_noising_scheduler` the upscaled image is noised to, in [0, num_train_timesteps). Other arguments,
        outputs and clean_caption as `IFPipeline`.
        """,
        "prompt height width image num_inference_steps timesteps guidance_scale negative_prompt "
        "num_images_per_prompt eta generator prompt_embeds negative_prompt_embeds output_type return_dict "
        "callback callback_steps cross_attention_kwargs noise_level clean_caption",
        returns="IFPipelineOutput | tuple[Any, list[bool] | None, list[bool] | None]",
        guidance_scale=4.0,
        noise_level=250,
    )

    def check_inputs(self, args: IFSuperResolutionArgs) -> None:
        super().check_inputs(args)
        self.check_noise_level(args.noise_level)
        args.image = if_image_to_tensor(args.image)
        check_finite("image", args.image)
        self.check_image(args.image, args.prompts, args.height, args.width)

    def prepare_denoising(
        self, args: IFSuperResolutionArgs, timesteps: torch.Tensor, conditioning: Conditioning, device: torch.device
    ) -> LoopStart:
        """The initial noise, then the upscaled stage-I image noised to `noise_level` (Diffusers' order), and the hook
        appending it to every model input (before scaling, as Diffusers) with its noise level as class label."""
        channels = self.unet.config.in_channels // 2
        dtype = conditioning["prompt_embeds"].dtype
        images = self.prepare_intermediate_images(
            args.batch_size, channels, args.height, args.width, dtype, device, args.generator
        )
        upscaled, class_labels = self.noised_upscale(
            args.image, args.num_images_per_prompt, args.height, args.width, args.noise_level, args.generator
        )
        if self.do_classifier_free_guidance:
            upscaled, class_labels = torch.cat([upscaled] * 2), torch.cat([class_labels] * 2)

        def with_upscaled(
            x: torch.Tensor, t: torch.Tensor, i: int, cond: Conditioning
        ) -> tuple[torch.Tensor, dict[str, Any]]:
            return torch.cat([x, upscaled], dim=1), {"class_labels": class_labels}

        return LoopStart(images, model_inputs=with_upscaled)

    def noised_upscale(
        self,
        image: torch.Tensor,
        num_images_per_prompt: int,
        height: int,
        width: int,
        noise_level: int,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(upscaled image noised to `noise_level`, the (B,) noise levels); the noise is drawn after the initial
        sample's, as in Diffusers."""
        device = self._execution_device
        image = image.to(device=device, dtype=self.unet.dtype).repeat_interleave(num_images_per_prompt, dim=0)
        upscaled = F.interpolate(image, (height, width), mode="bilinear", align_corners=True)
        levels = torch.full((upscaled.shape[0],), noise_level, dtype=torch.int64, device=device)
        noise = randn_tensor(upscaled.shape, generator=generator, device=device, dtype=upscaled.dtype)
        return self.image_noising_scheduler.add_noise(upscaled, noise, levels), levels


# --- helpers -------------------------------------------------------------------------------------------------------
def check_clean_caption(clean_caption: Any) -> None:
    if not isinstance(clean_caption, bool):
        raise TypeError(f"clean_caption must be a bool, got {clean_caption!r}")


def if_image_to_tensor(image: Any) -> torch.Tensor:
    """Stage II's `image` -> (B, C, H, W) float tensor, by Diffusers' IF rules: PIL images from [0, 255] to [-1, 1];
    numpy arrays (H, W, C) / (B, H, W, C) and tensors (C, H, W) / (B, C, H, W), or lists of them, as they are."""
    images = image if isinstance(image, list) else [image]
    if not images or not all(isinstance(i, (PIL.Image.Image, np.ndarray, torch.Tensor)) for i in images):
        raise TypeError(
            "image must be a torch.Tensor (stage I's output_type='pt'), a numpy array, a PIL image, or a list of "
            f"one kind of these; got {image!r:.200}"
        )
    if len({type(i) for i in images}) > 1:
        raise TypeError(f"image: a list mixing {sorted({type(i).__name__ for i in images})}")
    first = images[0]
    if isinstance(first, PIL.Image.Image):
        arrays = [np.asarray(i).astype(np.float32) / 127.5 - 1.0 for i in images]
        if {a.ndim for a in arrays} != {3}:
            raise ValueError("image: PIL images must have color channels (e.g. mode 'RGB'), got a grayscale image")
        batch = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2))
    elif isinstance(first, np.ndarray):
        arrays = np.stack(images) if first.ndim == 3 else np.concatenate(images)
        if arrays.ndim != 4:
            raise ValueError(f"image: numpy arrays must be (H, W, C) or (B, H, W, C), got shape {first.shape}")
        batch = torch.from_numpy(arrays.transpose(0, 3, 1, 2))
    else:
        batch = torch.stack(images) if first.ndim == 3 else torch.cat(images)
        if batch.ndim != 4:
            raise ValueError(f"image: tensors must be (C, H, W) or (B, C, H, W), got shape {tuple(first.shape)}")
    if not batch.is_floating_point():
        raise TypeError(f"image: arrays and tensors must be floating point in [-1, 1], got dtype {batch.dtype}")
    return batch
