"""StableDiffusionInpaintPipeline against diffusers' on tiny checkpoints: the 9-channel inpainting UNet and a plain
4-channel SD UNet (known region pasted back after every step); same seed -> same image (2e-3 on "np" output)."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import assert_same_images, random_image, run_both, seeded, tiny_sd_components, use_scheduler

import rapiddiff
from rapiddiff import DiffusionPipeline, StableDiffusionInpaintPipeline, cli
from rapiddiff.presets import PRESETS_DIR

CONFIGS = PRESETS_DIR
IMAGE = random_image(32, 48)  # non-square; the tiny VAE's factor is 2
_mask = np.zeros((32, 48), np.uint8)
_mask[8:24, 12:36] = 255
MASK = PIL.Image.fromarray(_mask)  # white: repaint
SIZE = dict(height=32, width=48)


def _load(folder):
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder)
    ours = StableDiffusionInpaintPipeline.from_pretrained(folder)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory):
    """A diffusers StableDiffusionInpaintPipeline with a 9-channel tiny UNet, saved."""
    pipe = diffusers.StableDiffusionInpaintPipeline(
        **tiny_sd_components(unet_in_channels=9),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = tmp_path_factory.mktemp("tiny-inpaint") / "checkpoint"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded9(inpaint_dir):
    return _load(inpaint_dir)


@pytest.fixture(scope="module")
def loaded4(tiny_sd_dir):
    return _load(tiny_sd_dir)


@pytest.fixture
def pipes9(loaded9, inpaint_dir):
    use_scheduler(loaded9, "PNDMScheduler", inpaint_dir)
    return loaded9


@pytest.fixture
def pipes4(loaded4, tiny_sd_dir):
    use_scheduler(loaded4, "PNDMScheduler", tiny_sd_dir)
    return loaded4


def inpaint(pipes, **kwargs):
    return run_both(pipes, **(dict(image=IMAGE, mask_image=MASK, **SIZE) | kwargs))


# --- parity: 9-channel inpainting UNet -------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_unet_matches_diffusers(pipes9, strength):
    ref, ours = inpaint(pipes9, strength=strength, num_inference_steps=4)
    assert ours.images.shape == (1, 32, 48, 3)
    assert_same_images(ref, ours)


def test_inpainting_unet_batch_and_ancestral_scheduler(pipes9, inpaint_dir):
    use_scheduler(pipes9, "EulerAncestralDiscreteScheduler", inpaint_dir)
    ref, ours = inpaint(
        pipes9, prompt=["a red cube", "a blue sphere"], negative_prompt=["dark", "blurry"], num_images_per_prompt=2,
        seed=[1, 2, 3, 4],
    )  # fmt: skip
    assert ours.images.shape == (4, 32, 48, 3)
    assert_same_images(ref, ours)


@pytest.mark.parametrize("which", ["pipes9", "pipes4"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_image_given_as_latents(which, strength, request):
    """Diffusers' test_stable_diffusion_inpaint_mask_latents: image latents (used as they are, not encoded) with the
    masked image's latents and the mask in pixels."""
    pipes = request.getfixturevalue(which)
    generator = torch.Generator().manual_seed(5)
    image_latents = torch.randn(1, 4, 16, 24, generator=generator)
    masked = torch.randn(1, 4, 16, 24, generator=generator)
    mask = pipes[1].mask_processor.preprocess(MASK)
    kwargs = dict(image=image_latents, masked_image_latents=masked, mask_image=mask, strength=strength)
    assert_same_images(*inpaint(pipes, **kwargs))


def test_masked_image_latents_and_latents_given(pipes9):
    generator = torch.Generator().manual_seed(5)
    masked = torch.randn(1, 4, 16, 24, generator=generator)
    latents = torch.randn(2, 4, 16, 24, generator=generator)
    kwargs = dict(masked_image_latents=masked, latents=latents, num_images_per_prompt=2, strength=0.7)
    assert_same_images(*inpaint(pipes9, **kwargs))


def test_image_and_mask_batches_as_tensors(pipes9):
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(6))
    mask = torch.from_numpy(_mask / 255.0).float()[None, None]  # one mask for both images
    ref, ours = inpaint(pipes9, prompt=["a", "b"], image=images, mask_image=mask, guidance_scale=1.0)
    assert ours.images.shape == (2, 32, 48, 3)
    assert_same_images(ref, ours)


# --- parity: plain 4-channel UNet ------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_plain_unet_matches_diffusers(pipes4, strength):
    assert_same_images(*inpaint(pipes4, strength=strength, num_inference_steps=4))


def test_plain_unet_dpm_without_guidance_and_batch(pipes4, tiny_sd_dir):
    use_scheduler(pipes4, "DPMSolverMultistepScheduler", tiny_sd_dir)
    assert_same_images(*inpaint(pipes4, guidance_scale=1.0, num_inference_steps=3, num_images_per_prompt=2))


def test_plain_unet_keeps_the_known_region(pipes4):
    """Outside the mask the result is the encoded-decoded image: pasted back at every step."""
    ours = pipes4[1]
    out = inpaint((ours,), num_inference_steps=3, output_type="pt")[0].images
    known = torch.from_numpy(_mask == 0)
    image = ours.image_processor.preprocess(IMAGE)
    with torch.no_grad():
        latents = ours.vae.encode(image).latent_dist.mean
        roundtrip = ours.image_processor.postprocess(ours.vae.decode(latents).sample, output_type="pt")
    inside = (out - roundtrip).abs()[0].amax(dim=0)
    assert inside[known].max() < inside[~known].max()  # kept region far closer to the image than the repainted one


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DDIMScheduler"])
def test_loop_never_reads_tensor_values(pipes4, tiny_sd_dir, scheduler):
    """The re-noising of the known region stays on the device: no host sync inside the denoising loop."""
    compile_module = pytest.importorskip("rapiddiff.compile")
    use_scheduler(pipes4, scheduler, tiny_sd_dir)
    with compile_module.forbid_host_syncs_in_loop(pipes4[1]) as pipe:
        pipe("a cube", image=IMAGE, mask_image=MASK, **SIZE, strength=0.7, num_inference_steps=3, output_type="latent")


def test_callback_reads_mask_tensors(pipes9):
    seen = {}

    def on_step_end(pipe, i, t, kwargs):
        seen.update({k: tuple(v.shape) for k, v in kwargs.items()})
        return {}

    pipes9[1](
        "a cube", image=IMAGE, mask_image=MASK, **SIZE, num_inference_steps=2, output_type="latent",
        callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["mask", "masked_image_latents"],
    )  # fmt: skip
    assert seen == {"mask": (2, 1, 16, 24), "masked_image_latents": (2, 4, 16, 24)}  # doubled for guidance


def test_loads_through_diffusion_pipeline(inpaint_dir):
    pipe = DiffusionPipeline.from_pretrained(inpaint_dir)
    assert type(pipe) is StableDiffusionInpaintPipeline and pipe.unet.config.in_channels == 9
    assert pipe.mask_processor.config.do_binarize and not pipe.mask_processor.config.do_normalize


def test_real_inpainting_unet_config_builds_on_meta():
    config = json.loads((CONFIGS / "stable-diffusion-inpainting" / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = rapiddiff.UNet2DConditionModel.from_config(config)
    assert unet.config.in_channels == 9
    assert unet.num_parameters() == 859_535_364


# --- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=-0.5), "strength must be >= 0.0, got -0.5"),
        (dict(strength=2), "strength must be <= 1.0, got 2"),
        (dict(strength=0.2, num_inference_steps=4), "strength=0.2 runs no denoising step"),
        (dict(mask_image=None), "mask_image is required"),
        (dict(mask_image=MASK.resize((40, 32))), "mask_image is 32x40 .* but image is 32x48"),
        (dict(image=[IMAGE] * 3, mask_image=[MASK] * 2), "mask_image has a batch of 2 masks for 3 images"),
        (dict(prompt=["a", "b"], image=[IMAGE] * 3, mask_image=MASK), "image has a batch of 3, which does not fit"),
        (dict(padding_mask_crop=8), "padding_mask_crop=8 is not supported"),
        (
            dict(masked_image_latents=torch.zeros(1, 4, 8, 8)),
            r"masked_image_latents must have shape \(batch, 4, 16, 24\)",
        ),
        (dict(image=torch.zeros(1, 4, 16, 24)), "with image latents pass the masked image's latents"),
        (
            dict(image=torch.zeros(1, 4, 8, 12), masked_image_latents=torch.zeros(1, 4, 16, 24)),
            r"latents of size \(8, 12\) do not fit height=32, width=48",
        ),
        (dict(height=36), "height must be divisible by 8, got 36"),
    ],
)
def test_bad_input(pipes9, kwargs, message):
    args = dict(prompt="a cube", image=IMAGE, mask_image=MASK, **SIZE, num_inference_steps=2) | kwargs
    with pytest.raises(ValueError, match=message):
        pipes9[1](**args)


def test_unet_that_does_not_fit(pipes9):
    with torch.device("meta"):
        unet = rapiddiff.UNet2DConditionModel.from_config({**pipes9[1].unet.config, "in_channels": 5})
    pipe = StableDiffusionInpaintPipeline(**{**pipes9[1].components, "unet": unet})
    with pytest.raises(ValueError, match=r"in_channels=5 does not fit this pipeline; allowed: 4 \(a plain UNet\); 9"):
        pipe("a cube", image=IMAGE, mask_image=MASK)


def test_cli_image_and_mask_run_inpainting(pipes9, inpaint_dir, tmp_path):
    IMAGE.save(tmp_path / "in.png")
    MASK.save(tmp_path / "mask.png")
    argv = ["generate", "a cube", "--model", str(inpaint_dir), "--image", str(tmp_path / "in.png"), "--mask"]
    argv += [str(tmp_path / "mask.png"), "--height", "32", "--width", "48", "--steps", "2", "--seed", "7"]
    assert cli.main([*argv, "-o", str(tmp_path / "out.png")]) == 0
    expected = pipes9[1]("a cube", image=IMAGE, mask_image=MASK, **SIZE, num_inference_steps=2, generator=seeded(7))
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "out.png")), np.asarray(expected.images[0]))
