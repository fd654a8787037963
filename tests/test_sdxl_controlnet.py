"""SDXL ControlNets (text_time conditioning) and StableDiffusionXLControlNetPipeline against diffusers' on tiny
SDXL-shaped models."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import SDXL_UNET, assert_close_rel, random_image, run_both

import rapiddiff
from rapiddiff import ControlNetModel, DiffusionPipeline, StableDiffusionXLControlNetPipeline

CONTROLNET = {k: v for k, v in SDXL_UNET.items() if k not in ("sample_size", "up_block_types")} | {
    "conditioning_embedding_out_channels": (8, 16)
}


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    torch.manual_seed(2)
    ref = diffusers.ControlNetModel(**CONTROLNET).eval()
    for p in ref.controlnet_down_blocks.parameters():  # zero-initialised: give the residuals something to carry
        torch.nn.init.normal_(p, std=0.2)
    torch.nn.init.normal_(ref.controlnet_mid_block.weight, std=0.2)
    path = tmp_path_factory.mktemp("sdxl-controlnet")
    ref.save_pretrained(path)
    return ref, ControlNetModel.from_pretrained(path)


def test_sdxl_controlnet_model_matches_diffusers(controlnets):
    ref, ours = controlnets
    g = torch.Generator().manual_seed(0)
    kw = dict(
        sample=torch.randn(2, 4, 16, 24, generator=g),
        timestep=torch.tensor(300),
        encoder_hidden_states=torch.randn(2, 7, 64, generator=g),
        controlnet_cond=torch.rand(2, 3, 32, 48, generator=g),
        conditioning_scale=0.7,
        added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.rand(2, 6) * 100},
        return_dict=False,
    )
    with torch.no_grad():
        (down, mid), (ref_down, ref_mid) = ours(**kw), ref(**kw)
    assert len(down) == len(ref_down)
    for a, b in zip((*down, mid), (*ref_down, ref_mid)):
        assert_close_rel(a, b)
    with pytest.raises(ValueError, match="'text_embeds' and 'time_ids'"):
        ours(**kw | {"added_cond_kwargs": None})


@pytest.fixture(scope="module")
def pipes(tiny_sdxl_dir, controlnets):
    ref_net, our_net = controlnets
    ref = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_sdxl_dir, controlnet=ref_net, add_watermarker=False
    )
    ours = DiffusionPipeline.from_pretrained(tiny_sdxl_dir, controlnet=our_net)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


def close(ref_out, our_out) -> None:
    np.testing.assert_allclose(our_out.images, ref_out.images, rtol=0, atol=2e-3)


def test_loads_as_the_sdxl_controlnet_pipeline(pipes):
    assert type(pipes[1]) is StableDiffusionXLControlNetPipeline


@pytest.mark.parametrize("guess_mode", [False, True])
def test_matches_diffusers(pipes, guess_mode):
    ref, ours = run_both(
        pipes,
        prompt=["a red cube", "a blue sphere"],
        image=random_image(32, 48),
        num_images_per_prompt=2,
        guess_mode=guess_mode,
        controlnet_conditioning_scale=0.8,
        control_guidance_end=0.7,
        num_inference_steps=3,
    )
    assert ours.images.shape == (4, 32, 48, 3)
    close(ref, ours)


def test_multi_controlnet_and_micro_conditioning(pipes, controlnets):
    ref, ours = pipes
    multi = (
        diffusers.StableDiffusionXLControlNetPipeline.from_pipe(ref, controlnet=[controlnets[0]] * 2),
        rapiddiff.StableDiffusionXLControlNetPipeline.from_pipe(ours, controlnet=[controlnets[1]] * 2),
    )
    for p in multi:
        p.set_progress_bar_config(disable=True)
    images = [random_image(32, 32, seed=1), random_image(32, 32, seed=2)]
    close(*run_both(multi, image=images, controlnet_conditioning_scale=[0.5, 1.0], original_size=(64, 64)))
