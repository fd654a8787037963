"""The reference page's workloads: each figure (row of the report) is a pipeline class, its components and its call inputs.

Five pipelines, seven figures: DeepFloyd IF reports one figure per stage; SDXL text-to-image runs when named. All inputs are made here (no downloads):
the init image, the inpainting mask, the control (edge) image, and IF's random prompt embeddings of shape
(batch, 2, 4096). As on the reference page, only IF stage I is batched; stages II and III run at batch 1 on a stage-I-sized
image, and the x4 upscaler gets it with noise_level=100.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .backends import Backend
from .components import Component, build_component

if TYPE_CHECKING:
    from .settings import Settings

SD_PROMPT = "ghibli style, a fantasy landscape with castles"
IF_PROMPT = "the blue hulk"
IF_EMBED_SHAPE = (2, 4096)  # T5-XXL embeddings of a 2-token prompt, per image

DENOISERS = ("unet", "controlnet")  # the modules the modes act on (channels_last, attention, compile)


@dataclasses.dataclass(frozen=True)
class Figure:
    name: str  # row of the report and key in the results
    pipeline: str  # the --pipelines name that selects it
    label: str  # as the reference page's tables print it
    pipeline_class: str
    components: Mapping[str, Component]  # constructor argument -> component
    inputs: Callable[[Settings, int], dict[str, Any]]  # (settings, batch) -> call kwargs, without the steps
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # further constructor arguments
    batched: bool = True  # False: measured at batch 1 only

    @property
    def denoisers(self) -> tuple[str, ...]:
        return tuple(name for name in DENOISERS if name in self.components)


def sd_components(checkpoint: str) -> dict[str, Component]:
    return {
        "vae": Component(checkpoint, "vae", "model"),
        "text_encoder": Component(checkpoint, "text_encoder", "text_encoder"),
        "tokenizer": Component(checkpoint, "tokenizer", "tokenizer"),
        "unet": Component(checkpoint, "unet", "model"),
        "scheduler": Component(checkpoint, "scheduler", "scheduler"),
    }


def sdxl_components(checkpoint: str) -> dict[str, Component]:
    return {
        **sd_components(checkpoint),
        "text_encoder_2": Component(checkpoint, "text_encoder_2", "text_encoder"),
        "tokenizer_2": Component(checkpoint, "tokenizer_2", "tokenizer"),
    }


def if_components(checkpoint: str, *extra_schedulers: str) -> dict[str, Component]:
    schedulers = {name: Component(checkpoint, name, "scheduler") for name in ("scheduler", *extra_schedulers)}
    return {"unet": Component(checkpoint, "unet", "model"), **schedulers}


NO_SAFETY = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
NO_TEXT = dict(tokenizer=None, text_encoder=None, watermarker=None, **NO_SAFETY)  # IF takes prompt embeddings


# --- inputs ------------------------------------------------------------------------------------------------------
def init_image(size: int) -> Image.Image:
    """A fixed random RGB image: the init image of img2img / inpainting and IF's stage-I image."""
    pixels = np.random.RandomState(0).rand(size, size, 3) * 255
    return Image.fromarray(pixels.astype(np.uint8))


def mask_image(size: int) -> Image.Image:
    """White (repaint) centre square on black."""
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(mask)


def edge_image(size: int) -> Image.Image:
    """A canny-like control image: thin white rings on black."""
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2)
    edges = (radius % max(size // 8, 2) < 1).astype(np.uint8) * 255
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def prompt_embeds(settings: Settings, batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(settings.device).manual_seed(0)
    shape = (batch, *IF_EMBED_SHAPE)
    embeds = [torch.randn(shape, generator=g, device=settings.device, dtype=settings.dtype) for _ in range(2)]
    return dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1])


def _sd_call(settings: Settings, batch: int, sized: bool = True, **extra: Any) -> dict[str, Any]:
    size = settings.preset.sd_size
    hw = dict(height=size, width=size) if sized else {}
    generator = torch.Generator(settings.device).manual_seed(0)
    return dict(prompt=SD_PROMPT, num_images_per_prompt=batch, generator=generator, **hw, **extra)


def sd_txt2img_inputs(settings: Settings, batch: int) -> dict[str, Any]:
    return _sd_call(settings, batch)


def sd_img2img_inputs(settings: Settings, batch: int) -> dict[str, Any]:
    # the size comes from the image (one per output); strength stays the pipeline's default (0.8) as on the reference page
    return _sd_call(settings, batch, sized=False, image=[init_image(settings.preset.sd_size)] * batch)


def sd_inpaint_inputs(settings: Settings, batch: int) -> dict[str, Any]:
    size = settings.preset.sd_size
    return _sd_call(settings, batch, image=init_image(size), mask_image=mask_image(size))


def sd_controlnet_inputs(settings: Settings, batch: int) -> dict[str, Any]:
    return _sd_call(settings, batch, image=edge_image(settings.preset.sd_size))


def sdxl_txt2img_inputs(settings: Settings, batch: int) -> dict[str, Any]:
    size = settings.preset.sdxl_size
    return _sd_call(settings, batch, sized=False, height=size, width=size)


def if_stage_1_inputs(settings: Settings, batch: int) -> dict[str, Any]:
    size = settings.preset.if_sizes[0]
    return dict(height=size, width=size, output_type="pt", **prompt_embeds(settings, batch))


def if_stage_2_inputs(settings: Settings, batch: int) -> dict[str, Any]:
    low, high = settings.preset.if_sizes
    return dict(image=init_image(low), height=high, width=high, output_type="pt", **prompt_embeds(settings, batch))


def if_stage_3_inputs(settings: Settings, batch: int) -> dict[str, Any]:
    image = init_image(settings.preset.if_sizes[0])
    return dict(prompt=IF_PROMPT, image=image, noise_level=100, num_images_per_prompt=batch)


FIGURES = (
    Figure("sd_txt2img", "sd_txt2img", "SD - txt2img", "StableDiffusionPipeline", sd_components("sd"),
           sd_txt2img_inputs, NO_SAFETY),
    Figure("sd_img2img", "sd_img2img", "SD - img2img", "StableDiffusionImg2ImgPipeline", sd_components("sd"),
           sd_img2img_inputs, NO_SAFETY),
    Figure("sd_inpaint", "sd_inpaint", "SD - inpaint", "StableDiffusionInpaintPipeline", sd_components("sd_inpaint"),
           sd_inpaint_inputs, NO_SAFETY),
    Figure("sd_controlnet", "sd_controlnet", "SD - controlnet", "StableDiffusionControlNetPipeline",
           {**sd_components("sd"), "controlnet": Component("controlnet", "", "model")}, sd_controlnet_inputs, NO_SAFETY),
    Figure("if_stage_1", "if", "IF - stage I", "IFPipeline", if_components("if_stage_1"), if_stage_1_inputs, NO_TEXT),
    Figure("if_stage_2", "if", "IF - stage II", "IFSuperResolutionPipeline",
           if_components("if_stage_2", "image_noising_scheduler"), if_stage_2_inputs, NO_TEXT, batched=False),
    Figure("if_stage_3", "if", "IF - stage III (x4 upscaler)", "StableDiffusionUpscalePipeline",
           {**sd_components("if_stage_3"), "low_res_scheduler": Component("if_stage_3", "low_res_scheduler", "scheduler")},
           if_stage_3_inputs, batched=False),
    Figure("sdxl_txt2img", "sdxl_txt2img", "SDXL - txt2img", "StableDiffusionXLPipeline", sdxl_components("sdxl"),
           sdxl_txt2img_inputs, dict(add_watermarker=False)),
)  # fmt: skip
FIGURES_BY_NAME = {f.name: f for f in FIGURES}


def figures_of(pipelines: tuple[str, ...]) -> tuple[Figure, ...]:
    """The figures of the selected pipelines, in the reference page's order."""
    return tuple(f for f in FIGURES if f.pipeline in pipelines)


def build_pipeline(figure: Figure, backend: Backend, settings: Settings) -> Any:
    """The figure's pipeline for `backend`, denoisers in channels_last (the reference page's setup), progress bar off."""
    cls = backend.get(figure.pipeline_class)  # first: a missing pipeline costs no model building
    parts = {arg: build_component(c, backend, settings) for arg, c in figure.components.items()}
    pipe = cls(**parts, **figure.options)
    for name in figure.denoisers:
        getattr(pipe, name).to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe
