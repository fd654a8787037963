"""DeepFloyd IF's safety checker (CLIP image embeddings -> NSFW and watermark detections) and its watermarker (the
"IF" mark pasted into the lower right corner of every PIL image), with Diffusers' weights and interfaces; the x4
upscaler uses both."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import nn
from transformers import CLIPConfig, CLIPVisionModelWithProjection, PreTrainedModel

from ..configuration import Config
from ..models.modeling_utils import ModelMixin
from .safety_checker import NSFW_WARNING, black_out

logger = logging.getLogger(__name__)

WATERMARK_WARNING = (
    "Potential watermarked content was detected in one or more images. A black image will be returned instead."
    " Try again with a different prompt and/or seed."
)


# --- safety checker and watermarker ----------------------------------------------------------------------------------
class IFSafetyChecker(PreTrainedModel):
    """CLIP image embeddings through two linear heads: NSFW (p_head) and watermark (w_head). Diffusers' keys."""

    config_class = CLIPConfig
    main_input_name = "clip_input"
    _no_split_modules = ["CLIPEncoderLayer"]

    def __init__(self, config: CLIPConfig):
        super().__init__(config)
        self.vision_model = CLIPVisionModelWithProjection(config.vision_config)
        self.p_head = nn.Linear(config.vision_config.projection_dim, 1)
        self.w_head = nn.Linear(config.vision_config.projection_dim, 1)
        self.post_init()

    @torch.no_grad()
    def detect(
        self, clip_input: torch.Tensor, p_threshold: float = 0.5, w_threshold: float = 0.5
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """clip_input (B, 3, S, S) CLIP pixel values -> (nsfw, watermark), each (B,) bool on the device."""
        image_embeds = self.vision_model(clip_input)[0]
        return self.p_head(image_embeds).flatten() > p_threshold, self.w_head(image_embeds).flatten() > w_threshold

    @torch.no_grad()
    def forward(
        self,
        clip_input: torch.Tensor,
        images: torch.Tensor | np.ndarray | list,
        p_threshold: float = 0.5,
        w_threshold: float = 0.5,
    ) -> tuple[torch.Tensor | np.ndarray | list, list[bool], list[bool]]:
        """-> (images with flagged ones black, nsfw flags, watermark flags). `images` itself is not modified."""
        nsfw, watermark = (flags.tolist() for flags in self.detect(clip_input, p_threshold, w_threshold))
        if any(nsfw):
            logger.warning(NSFW_WARNING)
        if any(watermark):
            logger.warning(WATERMARK_WARNING)
        return black_out(images, [n or w for n, w in zip(nsfw, watermark)]), nsfw, watermark


@dataclasses.dataclass(frozen=True)
class IFWatermarkerConfig(Config):
    """No keys: the mark is the (62, 62, 4) RGBA image stored with the weights."""


class IFWatermarker(ModelMixin):
    """DeepFloyd's visible watermark, pasted into the bottom-right corner of PIL outputs."""

    config_class = IFWatermarkerConfig

    def __init__(self, config: IFWatermarkerConfig | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__()
        self._init_config(config, kwargs)
        self.register_buffer("watermark_image", torch.zeros((62, 62, 4)))

    def apply_watermark(self, images: list[PIL.Image.Image], sample_size: int | None = None) -> list[PIL.Image.Image]:
        """Paste the mark into each image (in place, as Diffusers; the list is returned too).

        DeepFloyd's rule: the mark is 62 px at 1024x1024 scaled with the square root of the area, 14 px (scaled) from
        the right and bottom edges; an image smaller than `sample_size` is measured as if resized up to it.
        """
        h, w = images[0].height, images[0].width
        sample_size = sample_size or h
        coef = min(h / sample_size, w / sample_size)
        img_h, img_w = (int(h / coef), int(w / coef)) if coef < 1 else (h, w)
        k = (img_w * img_h / 1024**2) ** 0.5
        size, right, bottom = int(k * 62), img_w - int(14 * k), img_h - int(14 * k)
        if size < 1:  # below ~17 px a side the mark has no pixels (PIL cannot resize to 0 x 0)
            return images
        mark = PIL.Image.fromarray(self.watermark_image.to(torch.uint8).cpu().numpy(), mode="RGBA")
        mark = mark.resize((size, size), PIL.Image.Resampling.BICUBIC, reducing_gap=None)
        for image in images:
            image.paste(mark, box=(right - size, bottom - size, right, bottom), mask=mark.split()[-1])
        return images
