"""Stable Diffusion's safety checker: CLIP image embeddings compared with fixed "concept" embeddings.

Same weights, config (a transformers CLIPConfig) and folder layout as Diffusers' StableDiffusionSafetyChecker, so a
pipeline's `safety_checker/` folder loads as is. Flagged images are replaced by black images.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from transformers import CLIPConfig, CLIPVisionModel, PreTrainedModel

from .image_processor import VaeImageProcessor

logger = logging.getLogger(__name__)

NSFW_WARNING = (
    "Potential NSFW content was detected in one or more images. A black image will be returned instead."
    " Try again with a different prompt and/or seed."
)


def cosine_distance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(B, D), (N, D) -> (B, N) cosine similarities."""
    return nn.functional.normalize(image_embeds) @ nn.functional.normalize(text_embeds).t()


class StableDiffusionSafetyChecker(PreTrainedModel):
    config_class = CLIPConfig
    main_input_name = "clip_input"
    _no_split_modules = ["CLIPEncoderLayer"]

    def __init__(self, config: CLIPConfig):
        super().__init__(config)
        self.vision_model = CLIPVisionModel(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        # 17 concepts and 3 "special care" concepts, each with its own similarity threshold (the *_weights).
        self.concept_embeds = nn.Parameter(torch.ones(17, config.projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(3, config.projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(17), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(3), requires_grad=False)
        self.post_init()

    @torch.no_grad()
    def detect_nsfw(self, clip_input: torch.Tensor) -> torch.Tensor:
        """clip_input (B, 3, S, S) CLIP pixel values -> (B,) bool, on the device (no host sync)."""
        image_embeds = self.visual_projection(self.vision_model(clip_input)[1])
        # Scores in float32, rounded to 3 decimals before the > 0 test, exactly as Diffusers' thresholds are applied.
        special = cosine_distance(image_embeds, self.special_care_embeds).float()
        concept = cosine_distance(image_embeds, self.concept_embeds).float()
        special_scores = special - self.special_care_embeds_weights.float()
        # Any "special care" concept present makes every concept threshold 0.01 stricter.
        adjustment = (special_scores.round(decimals=3) > 0).any(dim=1, keepdim=True) * 0.01
        concept_scores = concept - self.concept_embeds_weights.float() + adjustment
        return (concept_scores.round(decimals=3) > 0).any(dim=1)

    @torch.no_grad()
    def forward(
        self, clip_input: torch.Tensor, images: torch.Tensor | np.ndarray | list
    ) -> tuple[torch.Tensor | np.ndarray | list, list[bool]]:
        """-> (images with flagged ones black, one bool per image). `images` itself is not modified."""
        has_nsfw = self.detect_nsfw(clip_input).tolist()
        if any(has_nsfw):
            logger.warning(NSFW_WARNING)
        return black_out(images, has_nsfw), has_nsfw


def black_out(images: torch.Tensor | np.ndarray | list, flags: list[bool]) -> torch.Tensor | np.ndarray | list:
    """A copy of the batch (tensor, array, or list of either) with the flagged images set to zero."""
    if not any(flags):
        return images
    if isinstance(images, torch.Tensor):
        mask = torch.tensor(flags, device=images.device).view(-1, *([1] * (images.ndim - 1)))
        return images.masked_fill(mask, 0)
    if isinstance(images, np.ndarray):
        out = images.copy()
        out[np.asarray(flags)] = 0
        return out
    zeros = [torch.zeros_like(i) if isinstance(i, torch.Tensor) else np.zeros_like(i) for i in images]
    return [z if flag else i for i, z, flag in zip(images, zeros, flags)]


def run_safety_checker(
    safety_checker: StableDiffusionSafetyChecker | None,
    feature_extractor,  # transformers CLIPImageProcessor
    image: torch.Tensor | np.ndarray,
    device: torch.device | str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | np.ndarray, list[bool] | None]:
    """What every SD pipeline does after decoding: (images, has_nsfw_concept), or (image, None) without a checker.

    image: the VAE output, a (B, C, H, W) tensor in [-1, 1], or a (B, H, W, C) numpy array in [0, 1].
    dtype: the dtype of the checker's input (Diffusers passes the prompt embeddings' dtype).
    """
    if safety_checker is None:
        return image, None
    if feature_extractor is None:
        raise ValueError("run_safety_checker: a safety_checker needs a feature_extractor (a CLIPImageProcessor)")
    if isinstance(image, torch.Tensor):
        pil_images = VaeImageProcessor().postprocess(image, output_type="pil")
    else:
        pil_images = VaeImageProcessor.numpy_to_pil(image)
    clip_input = feature_extractor(pil_images, return_tensors="pt").pixel_values.to(device=device, dtype=dtype)
    return safety_checker(images=image, clip_input=clip_input)


def check_safety_components(
    owner: str,
    safety_checker: object,
    feature_extractor: object,
    requires_safety_checker: bool,
    license: str = "Stable Diffusion",
) -> None:
    """What a pipeline's `__init__` checks: a checker needs its feature extractor; running without one is warned about
    when `requires_safety_checker` (the model's license asks for the checker in public-facing use)."""
    if safety_checker is not None and feature_extractor is None:
        raise ValueError(
            f"{owner}: a safety_checker needs a feature_extractor (a CLIPImageProcessor); "
            "pass safety_checker=None to turn the checker off"
        )
    if safety_checker is None and requires_safety_checker:
        logger.warning(
            "%s: the safety checker is off (safety_checker=None). Keep it on for anything shown to the public, as the "
            "%s license asks; pass requires_safety_checker=False to silence this warning.",
            owner,
            license,
        )
