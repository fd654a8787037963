"""StableDiffusionXLImg2ImgPipeline (img2img and the refiner) against diffusers' on tiny SDXL checkpoints, and the
base -> refiner hand-off in latents (denoising_end, then denoising_start)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import random_image, run_both, seeded

from rapiddiff import DiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

IMG2IMG = {"prompt": "a red cube on a table", "num_inference_steps": 4, "output_type": "np"}


def loaded(cls_name: str, folder):
    ref = getattr(diffusers, cls_name).from_pretrained(folder, add_watermarker=False)
    ours = DiffusionPipeline.from_pretrained(folder)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


@pytest.fixture(scope="module")
def refiner(tiny_sdxl_refiner_dir):
    return loaded("StableDiffusionXLImg2ImgPipeline", tiny_sdxl_refiner_dir)


@pytest.fixture(scope="module")
def base(tiny_sdxl_dir):
    return loaded("StableDiffusionXLPipeline", tiny_sdxl_dir)


@pytest.fixture(scope="module")
def img2img(base):
    """SDXL img2img on the base checkpoint's components (from_pipe, in both libraries)."""
    ref, ours = base
    return diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(ref), StableDiffusionXLImg2ImgPipeline.from_pipe(ours)


def close(ref_out, our_out, atol: float = 2e-3) -> None:
    np.testing.assert_allclose(our_out.images, ref_out.images, rtol=0, atol=atol)


def test_refiner_loads_with_its_config(refiner):
    _, ours = refiner
    assert type(ours) is StableDiffusionXLImg2ImgPipeline and ours.text_encoder is None and ours.tokenizer is None
    assert ours.config.requires_aesthetics_score is True and ours.config.force_zeros_for_empty_prompt is False


def test_img2img_matches_diffusers(img2img):
    image = random_image(32, 48)
    ref, ours = run_both(img2img, defaults=IMG2IMG, image=image, strength=0.6)
    assert ours.images.shape == (1, 32, 48, 3)
    close(ref, ours)


def test_img2img_batch_prompt_lists_micro_conditioning(img2img):
    ref, ours = run_both(
        img2img,
        seed=[1, 2, 3, 4],
        defaults=IMG2IMG,
        prompt=["a red cube", "a blue sphere"],
        prompt_2=["photo", "painting"],
        negative_prompt=["blurry", "dark"],
        image=[random_image(40, 32, seed=1), random_image(40, 32, seed=2)],
        num_images_per_prompt=2,
        strength=0.8,
        original_size=(64, 64),
        crops_coords_top_left=(8, 0),
        negative_original_size=(32, 32),
        negative_target_size=(16, 16),
    )
    assert ours.images.shape == (4, 40, 32, 3)
    close(ref, ours)


def test_refiner_matches_diffusers(refiner):
    ref, ours = run_both(
        refiner, defaults=IMG2IMG, image=random_image(32, 32), strength=0.5, aesthetic_score=7.0, guidance_rescale=0.3
    )
    close(ref, ours)


def test_base_to_refiner_hand_off(base, refiner):
    """Ensemble of experts: the base denoises 80 % of the schedule and hands its latents to the refiner."""
    kw = dict(prompt=["a castle", "a lighthouse"], num_inference_steps=10)
    ref_latents, our_latents = run_both(base, defaults={}, output_type="latent", denoising_end=0.8, **kw)
    torch.testing.assert_close(our_latents.images, ref_latents.images, rtol=0, atol=1e-4)
    steps = []
    hook = refiner[1].unet.register_forward_pre_hook(lambda m, args: steps.append(1))
    try:
        ref, ours = [
            pipe(image=latents.images, denoising_start=0.8, output_type="np", generator=seeded(0), **kw)
            for pipe, latents in zip(refiner, (ref_latents, our_latents))
        ]
    finally:
        hook.remove()
    assert len(steps) == refiner[1].num_timesteps == 2 and refiner[1].denoising_start == 0.8
    assert base[1].num_timesteps == 8
    close(ref, ours)


def test_refiner_size_mismatch_and_fraction_errors(refiner, tiny_sdxl_refiner_dir):
    _, ours = refiner
    wrong = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_refiner_dir, requires_aesthetics_score=False)
    with pytest.raises(ValueError, match=r"set requires_aesthetics_score=True"):
        wrong("a", image=random_image(32, 32))
    with pytest.raises(ValueError, match="denoising_start=0.8 must be smaller than denoising_end=0.5"):
        ours("a", image=random_image(32, 32), denoising_start=0.8, denoising_end=0.5)
    with pytest.raises(
        ValueError, match=r"denoising_start=1.0 leaves no steps; allowed: None or a fraction in \(0, 1\)"
    ):
        ours("a", image=random_image(32, 32), denoising_start=1.0)
    with pytest.raises(ValueError, match="image is required"):
        ours("a")
    assert not isinstance(ours, StableDiffusionXLPipeline)
