"""StableDiffusionUpscalePipeline against diffusers' on a tiny x4 checkpoint (conftest.tiny_upscaler_dir): same seed ->
same image (2e-3 on "np" output)."""

from __future__ import annotations

import copy
import functools
import logging

import conftest
import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import PIPELINE_ATOL, assert_same_images, seeded

from rapiddiff import DiffusionPipeline, StableDiffusionUpscalePipeline
from rapiddiff.pipelines.stable_diffusion import StableDiffusionPipelineOutput

PROMPT = "a red cube on a table"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models: intra-op threads buy nothing on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipes(tiny_upscaler_dir):
    """(diffusers, rapiddiff) pipelines loaded from the same diffusers checkpoint."""
    pair = (
        diffusers.DiffusionPipeline.from_pretrained(tiny_upscaler_dir),
        DiffusionPipeline.from_pretrained(tiny_upscaler_dir),
    )
    for p in pair:
        p.set_progress_bar_config(disable=True)
    return pair


def low_res(batch: int = 1, size: tuple[int, int] = (16, 16), seed: int = 0) -> torch.Tensor:
    """Images in [0, 1], (B, 3, H, W)."""
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


run_both = functools.partial(
    conftest.run_both, defaults={"prompt": PROMPT, "image": low_res(), "num_inference_steps": 3, "output_type": "np"}
)


# --- loading -------------------------------------------------------------------------------------------------------
def test_loads_from_model_index(pipes, tmp_path):
    ref, ours = pipes
    assert type(ours) is StableDiffusionUpscalePipeline
    assert ours.config.max_noise_level == 350 and ours.vae_scale_factor == 4
    assert ours.vae.config.scaling_factor == 0.08333 and ours.unet.config.num_class_embeds == 1000
    assert ours.safety_checker is None and ours.watermarker is None
    assert type(ours.low_res_scheduler).__name__ == "DDPMScheduler" and type(ours.scheduler).__name__ == "DDIMScheduler"
    ours.save_pretrained(tmp_path / "saved")
    again = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(again) is diffusers.StableDiffusionUpscalePipeline and again.config.max_noise_level == 350


def test_wrong_vae_scaling_factor_is_replaced_as_diffusers_does(pipes, caplog):
    _, ours = pipes
    components = dict(ours.components)
    vae = type(ours.vae).from_config({**ours.vae.config, "scaling_factor": 0.18215})
    with caplog.at_level(logging.WARNING):
        pipe = StableDiffusionUpscalePipeline(**(components | {"vae": vae}), max_noise_level=350)
    assert pipe.vae.config.scaling_factor == 0.08333
    assert "scaling_factor=0.18215" in caplog.text


# --- parity --------------------------------------------------------------------------------------------------------
def test_matches_diffusers(pipes):
    ref, ours = run_both(pipes)
    assert isinstance(ours, StableDiffusionPipelineOutput) and ours.nsfw_content_detected is None
    assert ours.images.shape == (1, 64, 64, 3)  # 16 px x vae_scale_factor 4
    assert_same_images(ref, ours)


def test_batch_images_per_prompt_non_square_generator_list(pipes):
    """Diffusers tiles the image batch (not per prompt) and draws the image noise from the first generators."""
    ref, ours = run_both(
        pipes,
        seed=[1, 2, 3, 4],
        prompt=["a red cube", "a blue sphere"],
        negative_prompt=["blurry", "dark"],
        image=low_res(2, (12, 20)),
        num_images_per_prompt=2,
        noise_level=50,
    )
    assert ours.images.shape == (4, 48, 80, 3)
    assert_same_images(ref, ours)


def test_guidance_off_pil_input(pipes):
    image = PIL.Image.fromarray((low_res()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    ref, ours = run_both(pipes, image=image, guidance_scale=1.0, noise_level=0)
    assert_same_images(ref, ours)


def test_if_stage_one_tensor_in_minus_one_one(pipes):
    """IF's output_type="pt" sample is in [-1, 1]: taken as is (both warn that it is not normalised)."""
    with pytest.warns(FutureWarning):
        ref, ours = run_both(pipes, image=low_res() * 2 - 1, noise_level=100)
    assert_same_images(ref, ours)


def test_prompt_embeds_and_output_types(pipes):
    ref, ours = pipes
    embeds, negative = ours.encode_prompt(PROMPT, "cpu", 1, True)
    kw = dict(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    pt = run_both(pipes, output_type="pt", **kw)
    assert pt[1].images.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(pt[1].images.numpy(), pt[0].images.numpy(), rtol=0, atol=PIPELINE_ATOL)
    latent = run_both(pipes, output_type="latent", **kw)
    assert latent[1].images.shape == (1, 4, 16, 16)
    np.testing.assert_allclose(latent[1].images.numpy(), latent[0].images.numpy(), rtol=0, atol=PIPELINE_ATOL)
    pil = run_both(pipes, output_type="pil", return_dict=False, **kw)
    assert isinstance(pil[1], tuple) and pil[1][1] is None
    expected = np.asarray(pil[0][0][0], dtype=np.int16)
    assert np.abs(np.asarray(pil[1][0][0], dtype=np.int16) - expected).max() <= 1


def test_float16_vae_decodes_in_float32(pipes):
    """A float16 VAE with force_upcast decodes in float32 and is float16 again afterwards (Diffusers' upcast)."""
    full = run_both(pipes[1:])[0]
    originals = [p.vae for p in pipes]
    for p in pipes:
        p.vae = copy.deepcopy(p.vae).to(torch.float16)
    try:
        ref, ours = run_both(pipes)
        assert pipes[1].vae.dtype == torch.float16
    finally:
        for p, vae in zip(pipes, originals):
            p.vae = vae
    assert_same_images(ref, ours)
    assert 0 < np.abs(full.images - ours.images).max() < 5e-3  # only the weights' rounding differs


def test_step_callback(pipes):
    calls: list[list] = [[], []]
    for pipe, log in zip(pipes, calls):
        pipe(
            prompt=PROMPT,
            image=low_res(),
            num_inference_steps=4,
            output_type="latent",
            generator=seeded(0),
            callback=lambda i, t, latents, log=log: log.append((i, int(t), latents.clone())),
            callback_steps=2,
        )
    assert [c[:2] for c in calls[1]] == [c[:2] for c in calls[0]] and len(calls[1]) == 2
    np.testing.assert_allclose(calls[1][-1][2].numpy(), calls[0][-1][2].numpy(), rtol=0, atol=PIPELINE_ATOL)


# --- bad input -----------------------------------------------------------------------------------------------------
@pytest.fixture
def no_unet_calls(pipes):
    """Bad input must be rejected before any heavy work: fails if our UNet ran."""
    calls = []
    hook = pipes[1].unet.register_forward_pre_hook(lambda *a: calls.append(1))
    yield
    hook.remove()
    assert not calls, "the UNet ran before the bad input was rejected"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_level=351), r"noise_level must be an int in \[0, 350\] \(max_noise_level=350\), got 351"),
        (dict(noise_level=-1), "got -1"),
        (dict(noise_level=20.0), "got 20.0"),
        (dict(image=None), "image is required"),
        (dict(image="gray"), "image has 1 channels, this UNet .* takes 3-channel images"),
        (dict(image="two"), "image has batch size 2 but there are 1 prompts"),
        (dict(prompt_embeds="pe"), "exactly one of prompt and prompt_embeds, got both"),
        (dict(prompt=None), "exactly one of prompt and prompt_embeds, got neither"),
        (dict(prompt=None, prompt_embeds="pe", negative_prompt_embeds="ne2"), "must have the same shape"),
        (dict(latents="wrong"), r"latents must have shape \(1, 4, 16, 16\)"),
        (dict(callback_steps=0), "callback_steps must be a positive int, got 0"),
        (dict(output_type="tensor"), "output_type='tensor' is not supported"),
    ],
)
def test_bad_input(pipes, no_unet_calls, kwargs, match):
    embeds = torch.zeros(1, 77, 32)
    values = {
        "gray": torch.rand(1, 1, 16, 16),
        "two": low_res(2),
        "pe": embeds,
        "ne2": embeds.repeat(2, 1, 1),
        "wrong": torch.zeros(1, 4, 8, 8),
    }
    args = dict(prompt=PROMPT, image=low_res(), num_inference_steps=2)
    args |= {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        pipes[1](**args)
