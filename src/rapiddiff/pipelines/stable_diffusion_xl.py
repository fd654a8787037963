"""Stable Diffusion XL pipelines (Diffusers' call signatures, same seed -> same image).

`StableDiffusionXLBase` is the SDXL family on the call template (`template.py`), on top of the SD family's latents,
guidance and LoRA scale: two CLIP text encoders (the penultimate hidden states of both, concatenated, and the pooled
projection of the second), the micro-conditioning "time ids" (original size, crop, target size or aesthetic score),
given to the UNet at every step as `added_cond_kwargs`, the `denoising_end` cut of the schedule (the base half of
the base -> refiner hand-off) and float32 VAE decoding for `force_upcast` VAEs. Each pipeline writes its signature,
its checks and its hooks, plus its `add_time_ids`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..models import lora_layers
from .call_signature import pipeline_call, pipeline_init
from .checks import check_denoising_fraction, check_finite, check_number, check_size_pair
from .denoise import Conditioning, Scheduler, retrieve_timesteps
from .image_processor import VaeImageProcessor
from .pipeline_utils import BaseOutput
from .prompt import PromptInput, check_clip_skip, check_prompt_inputs, check_text, encode_hidden
from .stable_diffusion import StableDiffusionBase
from .template import CallArgs
from .watermark_xl import make_watermarker

Size = tuple[int, int]


@dataclasses.dataclass
class StableDiffusionXLPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def check_xl_prompt_inputs(
    prompt_2: PromptInput,
    negative_prompt_2: PromptInput,
    prompt_embeds: torch.Tensor | None,
    negative_prompt_embeds: torch.Tensor | None,
    pooled_prompt_embeds: torch.Tensor | None,
    negative_pooled_prompt_embeds: torch.Tensor | None,
    batch: int,
) -> None:
    """SDXL's prompt arguments besides `check_prompt_inputs`' (Diffusers' rules, and list lengths checked)."""
    for name, text, embeds in (
        ("prompt_2", prompt_2, prompt_embeds),
        ("negative_prompt_2", negative_prompt_2, negative_prompt_embeds),
    ):
        if text is None:
            continue
        if embeds is not None:
            raise ValueError(f"pass at most one of {name} and {name[:-2]}_embeds, got both")
        check_text(name, text)
        if isinstance(text, list) and len(text) != batch:
            raise ValueError(f"{name} has {len(text)} entries but there are {batch} prompts: {text!r}")
    for name, embeds, pooled in (
        ("prompt_embeds", prompt_embeds, pooled_prompt_embeds),
        ("negative_prompt_embeds", negative_prompt_embeds, negative_pooled_prompt_embeds),
    ):
        pooled_name = name.replace("prompt_embeds", "pooled_prompt_embeds")
        if embeds is not None and pooled is None:
            raise ValueError(
                f"{name} given without {pooled_name}: pass both, made by the same text encoders (the pooled one is "
                "text_encoder_2's projection)"
            )
        if pooled is not None and (not isinstance(pooled, torch.Tensor) or pooled.ndim != 2 or len(pooled) != batch):
            shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
            raise ValueError(f"{pooled_name} must be a (batch={batch}, width) tensor, got {shape}")


@dataclasses.dataclass(kw_only=True)
class XLArgs(CallArgs):
    """SDXL's call: the second prompts, the pooled embeddings, the micro-conditioning and the schedule's end."""

    prompt_2: PromptInput
    negative_prompt_2: PromptInput
    pooled_prompt_embeds: torch.Tensor | None
    negative_pooled_prompt_embeds: torch.Tensor | None
    original_size: Size | None
    crops_coords_top_left: Size
    target_size: Size | None
    negative_original_size: Size | None
    negative_crops_coords_top_left: Size
    negative_target_size: Size | None
    denoising_end: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_xl_prompt_inputs(
            self.prompt_2,
            self.negative_prompt_2,
            self.prompt_embeds,
            self.negative_prompt_embeds,
            self.pooled_prompt_embeds,
            self.negative_pooled_prompt_embeds,
            self.prompts,
        )
        for name in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
            check_finite(name, getattr(self, name))
        for name in ("original_size", "target_size", "negative_original_size", "negative_target_size"):
            setattr(self, name, check_size_pair(name, getattr(self, name)))
        for name in ("crops_coords_top_left", "negative_crops_coords_top_left"):
            setattr(self, name, check_size_pair(name, getattr(self, name), optional=False))
        check_denoising_fraction("denoising_end", self.denoising_end)


def training_cutoff(scheduler: Scheduler, fraction: float) -> int:
    """The training timestep `fraction` of the way through the schedule (Diffusers' discrete cut-off)."""
    train = scheduler.config.num_train_timesteps
    return int(round(train - fraction * train))


class StableDiffusionXLBase(StableDiffusionBase):
    """The SDXL family on the call template; subclasses define `__init__` (their components and config), their
    `__call__` signature, checks, hooks and `add_time_ids`."""

    _optional_components = (
        "tokenizer",
        "tokenizer_2",
        "text_encoder",
        "text_encoder_2",
        "image_encoder",
        "feature_extractor",
    )
    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae"
    _lora_loadable_modules = ("unet", "text_encoder", "text_encoder_2")

    def register_components(self, components: dict[str, Any], config: dict[str, Any]) -> None:
        """What every SDXL `__init__` does with its components and config (`add_watermarker` is not stored, as in
        Diffusers)."""
        config = dict(config)
        add_watermarker = config.pop("add_watermarker")
        self.register_modules(**components)
        self.register_to_config(**config)
        vae = components.get("vae")
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.watermark = make_watermarker(add_watermarker)

    def fuse_lora(self, components: Sequence[str] = _lora_loadable_modules, **kwargs: Any) -> None:
        """As the SD pipelines', over SDXL's three models by default (Diffusers' default)."""
        super().fuse_lora(components, **kwargs)

    def unfuse_lora(self, components: Sequence[str] = _lora_loadable_modules, **kwargs: Any) -> None:
        super().unfuse_lora(components, **kwargs)

    @property
    def default_sample_size(self) -> int:
        """Diffusers' attribute: the UNet's sample size (128 latents: 1024 pixels for SDXL)."""
        return self.unet.config.sample_size

    @property
    def denoising_end(self) -> float | None:
        return self.call_state.denoising_end

    # --- argument checks --------------------------------------------------------------------------------------------
    def check_inputs(self, args: XLArgs) -> None:
        super().check_inputs(args)
        check_clip_skip(args.clip_skip, self.text_encoder_2)
        if args.prompt is not None and (self.text_encoder_2 is None or self.tokenizer_2 is None):
            raise ValueError(
                "this pipeline has no text_encoder_2/tokenizer_2: pass prompt_embeds and pooled_prompt_embeds "
                "(and their negatives)"
            )
        pooled = args.pooled_prompt_embeds
        width = self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else pooled.shape[-1]
        self.check_time_ids_width(width)

    def check_time_ids_width(self, pooled_width: int) -> None:
        """The pooled text and the time ids must fill the UNet's `add_embedding` input, else the UNet fails deep
        inside: a base checkpoint's UNet in the refiner's pipeline (or the other way round) is named here."""
        config = self.unet.config
        made = pooled_width + self.time_ids_per_image() * config.addition_time_embed_dim
        expected = config.projection_class_embeddings_input_dim
        if made == expected:
            return
        hint = ""
        if abs(made - expected) == config.addition_time_embed_dim and hasattr(self.config, "requires_aesthetics_score"):
            flag = made > expected  # the aesthetic score replaces the two target-size ids
            hint = (
                f"; set requires_aesthetics_score={flag} (`pipe.register_to_config(requires_aesthetics_score={flag})`"
                " or from_pretrained(..., requires_aesthetics_score=...))"
            )
        raise ValueError(
            f"the UNet expects an added embedding of {expected} features (projection_class_embeddings_input_dim), "
            f"this pipeline makes {pooled_width} (pooled text) + {self.time_ids_per_image()} time ids x "
            f"{config.addition_time_embed_dim} = {made}{hint}"
        )

    # --- prompts ----------------------------------------------------------------------------------------------------
    def text_encoders(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs in Diffusers' order: both, or the second alone (the refiner). As in
        Diffusers, the prompts pair up with them in order: without the first encoder `prompt` goes to the second
        and `prompt_2` is not read."""
        pairs = [(self.tokenizer_2, self.text_encoder_2)]
        return [(self.tokenizer, self.text_encoder), *pairs] if self.tokenizer is not None else pairs

    def _encode_texts(
        self,
        texts: Sequence[list[str]],
        names: Sequence[str],
        device: torch.device,
        layer: int,
        pooled: torch.Tensor | None,
        max_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of every encoder concatenated, and the pooled output: `pooled` if given, else the first 2-D
        first output (the CLIPTextModelWithProjection's text_embeds)."""
        hidden = []
        for (tokenizer, encoder), batch, name in zip(self.text_encoders(), texts, names):
            batch = self.maybe_convert_prompt(batch, tokenizer)
            states, first = encode_hidden(
                tokenizer, encoder, batch, device, layer=layer, max_length=max_length, argument=name
            )
            if pooled is None and first.ndim == 2:
                pooled = first
            hidden.append(states)
        if pooled is None:
            raise ValueError(
                f"text_encoder_2 ({type(self.text_encoder_2).__name__}) gives no pooled projection: SDXL needs a "
                "CLIPTextModelWithProjection, or pass pooled_prompt_embeds"
            )
        return torch.cat(hidden, dim=-1), pooled

    def encode_prompt(
        self,
        prompt: PromptInput,
        prompt_2: PromptInput = None,
        device: torch.device | str | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: PromptInput = None,
        negative_prompt_2: PromptInput = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Diffusers' method: (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
        negative_pooled_prompt_embeds), each repeated num_images_per_prompt times; the negatives are None without
        guidance.

        Text features are both encoders' hidden states `clip_skip + 2` layers from the end (the penultimate by
        default; no final layer norm), concatenated; the negatives always take the penultimate. Without a
        negative_prompt and with `force_zeros_for_empty_prompt` (SDXL base) the negatives are zeros, as in Diffusers
        (negative_prompt_2 alone does not count as a negative prompt there either).
        """
        batch = check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        check_xl_prompt_inputs(
            prompt_2,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            batch,
        )
        if lora_scale is not None:
            check_number("lora_scale", lora_scale)
        device = torch.device(device) if device is not None else self._execution_device

        def as_list(text: str | list[str]) -> list[str]:
            return [text] * batch if isinstance(text, str) else text

        with contextlib.ExitStack() as scopes:
            for encoder in (self.text_encoder, self.text_encoder_2):
                scopes.enter_context(lora_layers.call_scale(encoder, lora_scale))
            if prompt_embeds is None:
                layer = -2 if clip_skip is None else -(clip_skip + 2)
                texts = [as_list(prompt), as_list(prompt_2 or prompt)]
                prompt_embeds, pooled_prompt_embeds = self._encode_texts(
                    texts, ("prompt", "prompt_2"), device, layer, pooled_prompt_embeds
                )
            zeros = negative_prompt is None and self.config.force_zeros_for_empty_prompt
            if do_classifier_free_guidance and negative_prompt_embeds is None and zeros:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
            elif do_classifier_free_guidance and negative_prompt_embeds is None:
                negative = negative_prompt or ""
                texts = [as_list(negative), as_list(negative_prompt_2 or negative)]
                negative_prompt_embeds, negative_pooled_prompt_embeds = self._encode_texts(
                    texts,
                    ("negative_prompt", "negative_prompt_2"),
                    device,
                    -2,
                    negative_pooled_prompt_embeds,
                    max_length=prompt_embeds.shape[1],
                )

        dtype = self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype
        n = num_images_per_prompt
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(n, dim=0)
        pooled_prompt_embeds = pooled_prompt_embeds.to(device).repeat_interleave(n, dim=0)
        if not do_classifier_free_guidance:
            return prompt_embeds, None, pooled_prompt_embeds, None
        negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(n, dim=0)
        negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.to(device).repeat_interleave(n, dim=0)
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    # --- conditioning -----------------------------------------------------------------------------------------------
    def encode_conditioning(self, args: XLArgs, device: torch.device) -> dict[str, torch.Tensor | None]:
        """Text features, pooled text ("add_text_embeds") and time ids ("add_time_ids"), each batched [negative;
        positive] when guiding, as Diffusers' callbacks see them."""
        guided = self.do_classifier_free_guidance
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
            args.prompt,
            args.prompt_2,
            device,
            args.num_images_per_prompt,
            guided,
            args.negative_prompt,
            args.negative_prompt_2,
            args.prompt_embeds,
            args.negative_prompt_embeds,
            args.pooled_prompt_embeds,
            args.negative_pooled_prompt_embeds,
            lora_scale=self.call_state.lora_scale,
            clip_skip=self.clip_skip,
        )
        add_time_ids = self.add_time_ids(args, prompt_embeds.dtype, guided).to(device)
        if guided:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            pooled = torch.cat([negative_pooled, pooled])
        return {
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "add_text_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
            "add_time_ids": add_time_ids,
        }

    def time_ids_per_image(self) -> int:
        """The micro-conditioning numbers `add_time_ids` makes per image: original size, crop, target size."""
        return 6

    def add_time_ids(self, args: XLArgs, dtype: torch.dtype, guided: bool) -> torch.Tensor:
        """The micro-conditioning numbers of every image of the UNet batch: (batch x [2 when guided], N)."""
        raise NotImplementedError

    def model_kwargs_from_conditioning(self, conditioning: Conditioning) -> dict[str, Any]:
        """The UNet's `added_cond_kwargs` at each step (a step-end callback may replace the tensors)."""
        return {
            "added_cond_kwargs": {
                "text_embeds": conditioning["add_text_embeds"],
                "time_ids": conditioning["add_time_ids"],
            }
        }

    def resolved_sizes(self, args: XLArgs, height: int, width: int) -> tuple[Size, Size]:
        """(original_size, target_size): the given ones, else the output's (height, width)."""
        return args.original_size or (height, width), args.target_size or (height, width)

    # --- schedule ---------------------------------------------------------------------------------------------------
    def prepare_timesteps(self, args: XLArgs, device: torch.device) -> tuple[torch.Tensor, int]:
        timesteps, steps = retrieve_timesteps(
            self.scheduler, args.num_inference_steps, device, args.timesteps, args.sigmas
        )
        return self.end_schedule(args, timesteps, steps)

    def end_schedule(self, args: XLArgs, timesteps: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
        """`denoising_end` < 1 stops the schedule that far through (the base model's share of a base -> refiner
        hand-off; return latents with output_type="latent")."""
        if args.denoising_end is None or args.denoising_end >= 1:
            return timesteps, steps
        kept = timesteps[: int((timesteps >= training_cutoff(self.scheduler, args.denoising_end)).sum())]
        if len(kept) == 0:
            raise ValueError(
                f"denoising_end={args.denoising_end} stops before the first of the {steps} steps; allowed: a larger "
                "fraction or more steps"
            )
        return kept, len(kept)

    def new_call_state(self, args: XLArgs) -> Any:
        return dataclasses.replace(super().new_call_state(args), denoising_end=args.denoising_end)

    # --- latents to images ------------------------------------------------------------------------------------------
    def to_output(
        self, latents: torch.Tensor, args: CallArgs, dtype: torch.dtype
    ) -> StableDiffusionXLPipelineOutput | tuple[Any]:
        """VAE decode (in float32 for a float16 `force_upcast` VAE, as Diffusers' SDXL pipelines), the watermark
        where installed, post-processing to `output_type`. SDXL has no safety checker."""
        if args.output_type == "latent":
            image = latents
        else:
            image = self.vae.decode_upcast(latents / self.vae.config.scaling_factor)
            if self.watermark is not None:
                image = self.watermark.apply_watermark(image)
            image = self.image_processor.postprocess(image, output_type=args.output_type)
        return StableDiffusionXLPipelineOutput(images=image) if args.return_dict else (image,)


class StableDiffusionXLPipeline(StableDiffusionXLBase):
    """Text-to-image with Stable Diffusion XL: Diffusers' `StableDiffusionXLPipeline`."""

    __init__ = pipeline_init(
        "vae text_encoder text_encoder_2 tokenizer tokenizer_2 unet scheduler image_encoder=None feature_extractor=None "
        "force_zeros_for_empty_prompt=True add_watermarker=None"
    )

    __call__ = pipeline_call(
        XLArgs,
        """Generate images from `prompt` (text encoder 1) and `prompt_2` (text encoder 2, default `prompt`).

        original_size / crops_coords_top_left / target_size: SDXL's micro-conditioning, (height, width) and (top,
        left) in pixels, default the output size and (0, 0); the negative_* ones condition the unconditional half
        (used when both negative sizes are given, as in Diffusers). denoising_end in (0, 1]: stop that far through
        the schedule (hand the latents to the refiner). Returns StableDiffusionXLPipelineOutput(images) or (images,).
        """,
        "prompt prompt_2 height width num_inference_steps timesteps sigmas denoising_end guidance_scale "
        "negative_prompt negative_prompt_2 num_images_per_prompt eta generator latents prompt_embeds "
        "negative_prompt_embeds pooled_prompt_embeds negative_pooled_prompt_embeds ip_adapter_image "
        "ip_adapter_image_embeds output_type return_dict cross_attention_kwargs guidance_rescale original_size "
        "crops_coords_top_left target_size negative_original_size negative_crops_coords_top_left "
        "negative_target_size clip_skip callback_on_step_end callback_on_step_end_tensor_inputs",
        returns="StableDiffusionXLPipelineOutput | tuple[Any]",
        var_kwargs=True,
        guidance_scale=5.0,
    )

    def check_inputs(self, args: XLArgs) -> None:
        super().check_inputs(args)
        self.resolve_size(args)
        channels = self.unet.config.in_channels
        self.check_latents(args.latents, self.latent_shape(args.batch_size, channels, args.height, args.width))

    def add_time_ids(self, args: XLArgs, dtype: torch.dtype, guided: bool) -> torch.Tensor:
        original, target = self.resolved_sizes(args, args.height, args.width)
        ids = torch.tensor([[*original, *args.crops_coords_top_left, *target]], dtype=dtype)
        if guided:
            negative = ids
            if args.negative_original_size is not None and args.negative_target_size is not None:
                negative = torch.tensor(
                    [[*args.negative_original_size, *args.negative_crops_coords_top_left, *args.negative_target_size]],
                    dtype=dtype,
                )
            ids = torch.cat([negative, ids])
        # Diffusers' order: the (negative, positive) pair tiled over the batch, not one half after the other, so with
        # negative sizes and several images the halves mix them; kept for the same images.
        return ids.repeat(args.batch_size, 1)
