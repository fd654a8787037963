"""StableDiffusionXLInpaintPipeline against diffusers' on tiny SDXL checkpoints: a plain 4-channel SDXL UNet (the
known region pasted back) and a 9-channel inpainting one; from_pipe between the SDXL pipelines."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import SDXL_UNET, random_image, run_both

import rapiddiff
from rapiddiff import DiffusionPipeline, StableDiffusionXLInpaintPipeline

INPAINT = {"prompt": "a red cube on a table", "num_inference_steps": 3, "output_type": "np"}


@pytest.fixture(scope="module")
def base(tiny_sdxl_dir):
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    ours = DiffusionPipeline.from_pretrained(tiny_sdxl_dir)
    return ref, ours


@pytest.fixture(scope="module")
def plain(base):
    ref, ours = base
    pipes = diffusers.StableDiffusionXLInpaintPipeline.from_pipe(ref), StableDiffusionXLInpaintPipeline.from_pipe(ours)
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module")
def nine_channel(base, tmp_path_factory):
    ref, ours = base
    torch.manual_seed(3)
    unet = diffusers.UNet2DConditionModel(**SDXL_UNET, in_channels=9)
    path = tmp_path_factory.mktemp("sdxl-inpaint-unet")
    unet.save_pretrained(path)
    pipes = (
        diffusers.StableDiffusionXLInpaintPipeline.from_pipe(ref, unet=unet.eval()),
        StableDiffusionXLInpaintPipeline.from_pipe(ours, unet=rapiddiff.UNet2DConditionModel.from_pretrained(path)),
    )
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    return pipes


def close(ref_out, our_out) -> None:
    np.testing.assert_allclose(our_out.images, ref_out.images, rtol=0, atol=2e-3)


def mask(height: int, width: int):
    return random_image(height, width, seed=5, mode="L")


@pytest.mark.parametrize("strength", [0.9999, 1.0, 0.5])
def test_plain_unet_matches_diffusers(plain, strength):
    ref, ours = run_both(
        plain, defaults=INPAINT, image=random_image(32, 48), mask_image=mask(32, 48), height=32, width=48,
        strength=strength,
    )  # fmt: skip
    assert ours.images.shape == (1, 32, 48, 3)
    close(ref, ours)


def test_nine_channel_unet_batch_and_prompt_lists(nine_channel):
    ref, ours = run_both(
        nine_channel,
        seed=[0, 1, 2, 3],
        defaults=INPAINT,
        prompt=["a red cube", "a blue sphere"],
        prompt_2=["photo", "drawing"],
        image=random_image(32, 32),
        mask_image=mask(32, 32),
        num_images_per_prompt=2,
        original_size=(64, 64),
    )
    assert ours.images.shape == (4, 32, 32, 3)
    close(ref, ours)


def test_denoising_start_continues_from_the_image(plain):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    kw = dict(image=latents, mask_image=mask(32, 32), masked_image_latents=latents, num_inference_steps=10)
    ref, ours = run_both(plain, defaults=INPAINT, denoising_start=0.7, **kw)
    assert plain[1].num_timesteps == 3
    close(ref, ours)
    with pytest.raises(ValueError, match="latents given with denoising_start"):
        plain[1]("a", denoising_start=0.7, latents=latents, **kw)


def test_from_pipe_between_sdxl_pipelines(base, plain):
    _, ours = base
    img2img = rapiddiff.StableDiffusionXLImg2ImgPipeline.from_pipe(plain[1])
    back = rapiddiff.StableDiffusionXLPipeline.from_pipe(img2img)
    assert back.unet is ours.unet and back.text_encoder_2 is ours.text_encoder_2 and img2img.vae is ours.vae
    assert img2img.config.requires_aesthetics_score is False and back.config.force_zeros_for_empty_prompt is True
