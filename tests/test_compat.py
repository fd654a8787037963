"""Diffusers API behaviours its own test suite relies on, each against Diffusers itself (see docs/compat.md)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import assert_same_images, run_both

import rapiddiff

LIBRARIES = (diffusers, rapiddiff)
# Diffusers' own SD pipeline tests build their DDIM scheduler so: steps_offset left at its default, 0.
DDIM_TEST_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
)


@pytest.fixture(scope="module")
def sd_components(tiny_sd_dir):
    """{library: components} of the tiny SD checkpoint, loaded by diffusers and by rapiddiff."""
    components = {}
    for library in LIBRARIES:
        pipe = library.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
        components[library] = {k: v for k, v in pipe.components.items() if k != "scheduler"}
    return components


def build_both(sd_components, pipeline: str, scheduler: str = "DDIMScheduler", **scheduler_config):
    """(diffusers, rapiddiff) pipelines of class `pipeline` constructed from components and a fresh scheduler, as
    Diffusers' tests build theirs (so the pipelines' `__init__` sees the scheduler's config as given)."""
    pipes = []
    for library in LIBRARIES:
        sched = getattr(library, scheduler)(**scheduler_config)
        pipe = getattr(library, pipeline)(**sd_components[library], scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    return pipes


# --- outdated scheduler configs rewritten by the SD pipelines' __init__ ----------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_txt2img_with_diffusers_test_config(sd_components, eta):
    pipes = build_both(sd_components, "StableDiffusionPipeline", **DDIM_TEST_CONFIG)
    assert pipes[1].scheduler.config.steps_offset == pipes[0].scheduler.config.steps_offset == 1
    assert_same_images(*run_both(pipes, guidance_scale=6.0, eta=eta))


def test_ddim_img2img_several_init_images(sd_components):
    pipes = build_both(sd_components, "StableDiffusionImg2ImgPipeline", **DDIM_TEST_CONFIG)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    for strength in (0.75, 0.5):
        assert_same_images(*run_both(pipes, prompt=["a red cube"] * 2, image=image, strength=strength))


def test_inpaint_rewrites_skip_prk_steps(sd_components):
    """Inpainting also turns PNDM's Runge-Kutta warm-up off, as Diffusers' inpainting pipeline does."""
    pndm_config = {k: v for k, v in DDIM_TEST_CONFIG.items() if k != "clip_sample"}
    pipes = build_both(sd_components, "StableDiffusionInpaintPipeline", "PNDMScheduler", **pndm_config)
    for pipe in pipes:
        assert pipe.scheduler.config.skip_prk_steps is True and pipe.scheduler.config.steps_offset == 1
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    assert_same_images(*run_both(pipes, image=image, mask_image=mask, strength=0.75))


def test_rewrite_is_in_place_and_keeps_defaults_for_swaps(sd_components):
    """The user's scheduler object is rewritten (Diffusers replaces its config dict); a key it had defaulted stays
    listed in `_use_default_values`, so a swap built `from_config` takes its own default again."""
    scheds, swapped = [], []
    for library in LIBRARIES:
        sched = library.DDIMScheduler(**DDIM_TEST_CONFIG)
        pipe = library.StableDiffusionPipeline(**sd_components[library], scheduler=sched)
        assert pipe.scheduler is sched and sched.config["steps_offset"] == 1
        scheds.append(sched)
        swapped.append(library.DDPMScheduler.from_config(sched.config))
    assert "steps_offset" in scheds[1].config["_use_default_values"]
    for sched in swapped:
        assert sched.config.steps_offset == 0
        sched.set_timesteps(4)
    np.testing.assert_array_equal(swapped[1].timesteps.numpy(), swapped[0].timesteps.numpy())


def test_controlnet_and_explicit_configs_are_not_rewritten(sd_components):
    """Diffusers' ControlNet pipeline leaves the scheduler config alone; so does rapiddiff's."""
    controlnet = rapiddiff.ControlNetModel(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=16,
        layers_per_block=1,
        conditioning_embedding_out_channels=(16, 32),
    )
    sched = rapiddiff.DDIMScheduler(**DDIM_TEST_CONFIG)
    rapiddiff.StableDiffusionControlNetPipeline(**sd_components[rapiddiff], controlnet=controlnet, scheduler=sched)
    assert sched.config.steps_offset == 0
