"""StableDiffusionImg2ImgPipeline against diffusers' on the tiny SD checkpoint: same seed -> same image (2e-3)."""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import assert_same_images, random_image, run_both, use_scheduler

import rapiddiff
import rapiddiff.cli
from rapiddiff import DiffusionPipeline, StableDiffusionImg2ImgPipeline

IMAGE = random_image(32, 48)  # non-square; the tiny VAE's factor is 2


@pytest.fixture(scope="module")
def loaded(tiny_sd_dir):
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd_dir)
    ours = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd_dir)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


@pytest.fixture
def pipes(loaded, tiny_sd_dir):
    """(diffusers, rapiddiff) pipelines, each test starting from the checkpoint's PNDM scheduler."""
    use_scheduler(loaded, "PNDMScheduler", tiny_sd_dir)
    return loaded


# --- parity ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [0.5, 0.75, 1.0])
def test_strengths_match_diffusers(pipes, strength):
    ref, ours = run_both(pipes, image=IMAGE, strength=strength, num_inference_steps=4)
    assert ours.images.shape == (1, 32, 48, 3)
    assert_same_images(ref, ours)
    assert pipes[1].num_timesteps == pipes[0].num_timesteps


@pytest.mark.parametrize(
    "scheduler",
    [
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "LCMScheduler",
        "HeunDiscreteScheduler",  # order 2: the pipeline's begin index is t_start * 2
        "KDPM2AncestralDiscreteScheduler",  # order 2, with step noise from the generator
    ],
)
def test_other_schedulers(pipes, tiny_sd_dir, scheduler):
    use_scheduler(pipes, scheduler, tiny_sd_dir)  # Euler ancestral also draws step noise from the generator
    assert_same_images(*run_both(pipes, image=IMAGE, strength=0.6, num_inference_steps=4))


def test_one_image_for_several_prompts_and_generators(pipes):
    ref, ours = run_both(
        pipes,
        prompt=["a red cube", "a blue sphere"],
        negative_prompt=["blurry", "dark"],
        num_images_per_prompt=2,
        image=IMAGE,
        seed=[3, 4, 5, 6],  # one generator per image: the image is duplicated before encoding, as in Diffusers
    )
    assert ours.images.shape == (4, 32, 48, 3)
    assert_same_images(ref, ours)


def test_image_batch_as_tensor_and_array(pipes):
    batch = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    prompts = ["a red cube", "a blue sphere"]
    assert_same_images(*run_both(pipes, prompt=prompts, image=batch, guidance_scale=1.0))
    array = batch.permute(0, 2, 3, 1).numpy()
    assert_same_images(*run_both(pipes, prompt=prompts, image=array, strength=0.9))


def test_image_given_as_latents(pipes):
    latents = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(2))
    ref, ours = run_both(pipes, image=latents, strength=0.7)
    assert ours.images.shape == (1, 32, 48, 3)
    assert_same_images(ref, ours)


def test_callback_sees_each_step(pipes):
    seen = []

    def on_step_end(pipe, i, t, kwargs):
        seen.append((i, tuple(kwargs["latents"].shape), tuple(kwargs["prompt_embeds"].shape)))
        return {}

    out = pipes[1](
        "a cube",
        image=IMAGE,
        strength=0.5,
        num_inference_steps=4,
        output_type="latent",
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )
    # PNDM (order 1 after its warm-up) runs 2 of the 4 steps plus its extra first model call
    assert [i for i, _, _ in seen] == list(range(pipes[1].num_timesteps)) and len(seen) == 3
    assert seen[0][1:] == ((1, 4, 16, 24), (2, 77, 32))
    assert out.images.shape == (1, 4, 16, 24)


def test_loads_through_diffusion_pipeline_and_shares_components(pipes, tmp_path):
    pipes[0].save_pretrained(tmp_path / "img2img")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "img2img")
    assert type(loaded) is StableDiffusionImg2ImgPipeline
    text2img = rapiddiff.StableDiffusionPipeline(**pipes[1].components)
    assert text2img.unet is pipes[1].unet
    assert type(StableDiffusionImg2ImgPipeline(**text2img.components)) is StableDiffusionImg2ImgPipeline


# --- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=-0.1), "strength must be >= 0.0, got -0.1"),
        (dict(strength=1.5), "strength must be <= 1.0, got 1.5"),
        (dict(strength=0.1, num_inference_steps=4), "strength=0.1 runs no denoising step of num_inference_steps=4"),
        (dict(image=None), "image is required"),
        (dict(image=PIL.Image.new("RGB", (1, 1))), "image of 1x1 pixels .* at least the VAE's scale factor, 2"),
        (dict(prompt=["a", "b"], image=[IMAGE] * 3), "image has a batch of 3, which does not fit the 2 images"),
        (dict(prompt=["a", "b"], num_images_per_prompt=2, image=[IMAGE] * 3), "allowed: a batch that divides 4"),
    ],
)
def test_bad_input(pipes, kwargs, message):
    args = dict(prompt="a cube", image=IMAGE, num_inference_steps=2) | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        pipes[1](**args)


def test_unet_that_does_not_fit(pipes):
    with torch.device("meta"):
        unet = rapiddiff.UNet2DConditionModel.from_config({**pipes[1].unet.config, "in_channels": 9})
    pipe = StableDiffusionImg2ImgPipeline(**{**pipes[1].components, "unet": unet})
    with pytest.raises(ValueError, match="unet.config.in_channels=9 does not fit this pipeline; allowed: 4"):
        pipe("a cube", image=IMAGE)


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_rgba_image_is_an_image_not_latents(pipes):
    """Issue 14: an RGBA init image used to be taken as 4-channel latents (a 32x32 input gave a 64x64 image)."""
    _, ours = pipes
    rgba = IMAGE.convert("RGBA")
    with pytest.warns(UserWarning, match="alpha"):
        out = ours(
            "a cube", image=rgba, num_inference_steps=2, strength=0.5, output_type="np", generator=seeded()
        ).images
    expected = ours("a cube", image=IMAGE, num_inference_steps=2, strength=0.5, output_type="np", generator=seeded())
    expected = expected.images
    assert out.shape == expected.shape == (1, IMAGE.height, IMAGE.width, 3)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_image_is_not_modified(pipes):
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    before = image.clone()
    pipes[1]("a cube", image=image, num_inference_steps=2, output_type="latent")
    assert torch.equal(image, before)
    assert np.array_equal(np.asarray(IMAGE), np.asarray(random_image(32, 48)))


# --- command line ----------------------------------------------------------------------------------------------------
def test_cli_image_runs_img2img(pipes, tiny_sd_dir, tmp_path):
    IMAGE.save(tmp_path / "in.png")
    argv = ["generate", "a cube", "--model", str(tiny_sd_dir), "--image", str(tmp_path / "in.png")]
    assert (
        rapiddiff.cli.main([*argv, "--strength", "0.5", "--steps", "4", "--seed", "7", "-o", str(tmp_path / "out.png")])
        == 0
    )
    expected = pipes[1](
        "a cube", image=IMAGE, strength=0.5, num_inference_steps=4, generator=torch.Generator().manual_seed(7)
    )
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "out.png")), np.asarray(expected.images[0]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mask", "m.png"], "--mask needs --image"),
        (["--strength", "0.5"], "--strength 0.5 applies to --image"),
        (["--image", "in.png", "--height", "32"], "--height / --width do not apply to img2img"),
        (["--controlnet", "cn"], "got 1 --controlnet and 0 --control-image"),
        (["--image", "in.png", "--controlnet", "cn", "--control-image", "c.png"], "--controlnet does not combine"),
        (["--image", "missing.png"], "missing.png"),
    ],
)
def test_cli_rejects_bad_image_inputs(tiny_sd_dir, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    for name in ("in.png", "m.png", "c.png"):
        IMAGE.save(tmp_path / name)
    assert rapiddiff.cli.main(["generate", "a cube", "--model", str(tiny_sd_dir), *extra]) == 2
    assert message in capsys.readouterr().err
