"""StableDiffusionXLPipeline against diffusers' on a tiny SDXL checkpoint (two text encoders, text_time UNet): same
seed -> same image (2e-3 on "np" output)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import run_both, seeded

import rapiddiff
from rapiddiff import DiffusionPipeline, StableDiffusionXLPipeline
from rapiddiff.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput


@pytest.fixture(scope="module")
def pipes(tiny_sdxl_dir):
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    ours = DiffusionPipeline.from_pretrained(tiny_sdxl_dir)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


def assert_same(ref_out, our_out) -> None:
    assert isinstance(our_out, StableDiffusionXLPipelineOutput) and not hasattr(our_out, "nsfw_content_detected")
    torch.testing.assert_close(torch.as_tensor(our_out.images), torch.as_tensor(ref_out.images), rtol=0, atol=2e-3)


def test_loads_the_sdxl_layout(pipes, tiny_sdxl_dir):
    _, ours = pipes
    assert type(ours) is StableDiffusionXLPipeline
    assert type(ours.text_encoder_2).__name__ == "CLIPTextModelWithProjection" and ours.tokenizer_2 is not None
    assert ours.config.force_zeros_for_empty_prompt is True and ours.watermark is None


def test_text_to_image_matches_diffusers(pipes):
    ref, ours = run_both(pipes)
    assert ours.images.shape == (1, 32, 32, 3)
    assert_same(ref, ours)


def test_prompt_lists_prompt_2_negatives_batch_non_square(pipes):
    ref, ours = run_both(
        pipes,
        prompt=["a red cube", "a blue sphere"],
        prompt_2=["studio light", "in the rain"],
        negative_prompt=["blurry", "dark"],
        negative_prompt_2="low quality",
        num_images_per_prompt=2,
        height=32,
        width=48,
    )
    assert ours.images.shape == (4, 32, 48, 3)
    assert_same(ref, ours)


def test_micro_conditioning(pipes):
    kw = dict(original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(32, 40), num_images_per_prompt=2)
    ref, ours = run_both(pipes, **kw, negative_original_size=(16, 16), negative_target_size=(24, 32))
    assert_same(ref, ours)
    _, plain = run_both(pipes, num_images_per_prompt=2)
    assert abs(plain.images - ours.images).max() > 1e-3  # the numbers reach the UNet


def test_rescale_clip_skip_and_denoising_end(pipes):
    counted = []
    hook = pipes[1].unet.register_forward_pre_hook(lambda m, args: counted.append(1))
    try:
        ref, ours = run_both(pipes, guidance_rescale=0.6, clip_skip=1, denoising_end=0.6, num_inference_steps=5)
    finally:
        hook.remove()
    assert len(counted) == pipes[1].num_timesteps == 3 and pipes[1].denoising_end == 0.6
    assert_same(ref, ours)


def test_latent_output_and_tuple(pipes):
    ref, ours = run_both(pipes, output_type="latent", return_dict=False, guidance_scale=1.0)
    assert isinstance(ours, tuple) and len(ours) == 1 and ours[0].shape == (1, 4, 16, 16)
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-4)


def test_negative_prompts_without_zeros_and_embeds(pipes, tiny_sdxl_dir):
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl_dir, force_zeros_for_empty_prompt=False, add_watermarker=False
    )
    ours = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, force_zeros_for_empty_prompt=False)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    assert_same(*run_both((ref, ours), negative_prompt_2="blurry"))
    # encode_prompt is Diffusers' too, and its outputs drive a call
    kw = dict(prompt=["a red cube", "a cat"], prompt_2=["photo", "3d"], device="cpu", num_images_per_prompt=2)
    expected, got = ref.encode_prompt(**kw), ours.encode_prompt(**kw)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    embeds = {n: t[::2] for n, t in zip(names, got)}  # one per prompt
    assert_same(*run_both((ref, ours), defaults=dict(num_inference_steps=2, output_type="np"), **embeds))


def test_step_end_callback_cuts_guidance(pipes):
    """A callback may replace the conditioning SDXL adds (Diffusers' CFG cut-off: the conditional halves only)."""

    def cutoff(pipe, i, t, tensors):
        if i == 0:
            pipe._guidance_scale = 0.0
            return {k: v.chunk(2)[-1] for k, v in tensors.items() if k != "latents"}
        return {}

    names = ["prompt_embeds", "add_text_embeds", "add_time_ids"]
    ref, ours = run_both(
        pipes, num_inference_steps=3, callback_on_step_end=cutoff, callback_on_step_end_tensor_inputs=names
    )
    assert_same(ref, ours)


def test_errors_before_any_model_runs(pipes):
    _, ours = pipes
    embeds = torch.zeros(1, 77, 64)
    with pytest.raises(ValueError, match="without pooled_prompt_embeds"):
        ours(prompt_embeds=embeds, num_inference_steps=1)
    with pytest.raises(ValueError, match="at most one of prompt_2 and prompt_embeds"):
        ours(prompt_embeds=embeds, pooled_prompt_embeds=torch.zeros(1, 32), prompt_2="x")
    with pytest.raises(ValueError, match="prompt_2 has 1 entries but there are 2 prompts"):
        ours(prompt=["a", "b"], prompt_2=["x"])
    with pytest.raises(ValueError, match="original_size must be a pair"):
        ours("a", original_size=(64,))
    with pytest.raises(ValueError, match="denoising_end"):
        ours("a", denoising_end=1.5)
    refiner_unet = rapiddiff.UNet2DConditionModel(
        **{**ours.unet.config.to_dict(), "projection_class_embeddings_input_dim": 72}
    )
    wrong = StableDiffusionXLPipeline(**(ours.components | {"unet": refiner_unet}))
    with pytest.raises(ValueError, match=r"expects an added embedding of 72 .* makes 32 .* = 80"):
        wrong("a", num_inference_steps=1, generator=seeded(0))


# --- torch.compile -----------------------------------------------------------------------------------------------------
@pytest.mark.compile
@pytest.mark.parametrize("whole_step", [False, True], ids=["models", "whole-step"])
def test_compiled_sdxl_never_recompiles(tiny_sdxl_dir, whole_step):
    """compile_pipeline (fullgraph, channels_last): one graph per model (or per step), the eager images, and no
    recompile for other prompts, micro-conditioning, step counts (and guidance, models compiled alone)."""
    from torch._dynamo.testing import CompileCounter

    from rapiddiff import compile_pipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    calls = [
        dict(prompt="a red cube", num_inference_steps=2),
        dict(prompt="a fox", prompt_2="oil", num_inference_steps=3, original_size=(64, 64)),
        dict(prompt="a cat", negative_prompt="blurry", crops_coords_top_left=(8, 8)),
    ]
    if not whole_step:  # the whole step's graph holds the guidance scale as a constant (see docs/compile.md)
        calls[1] |= dict(guidance_scale=7.0, guidance_rescale=0.5)

    def run(kw):
        return pipe(**{"num_inference_steps": 2, "output_type": "np", "generator": seeded(0)} | kw).images

    expected = [run(kw) for kw in calls]
    counter = CompileCounter()
    compile_pipeline(pipe, backend=counter, whole_step=whole_step)
    np.testing.assert_allclose(run(calls[0]), expected[0], atol=2e-3)
    graphs = counter.frame_count
    assert graphs == 2  # the UNet (or the whole step) and the VAE decoder
    with torch._dynamo.config.patch(error_on_recompile=True):
        for kw, want in zip(calls[1:], expected[1:]):
            np.testing.assert_allclose(run(kw), want, atol=2e-3)
    assert counter.frame_count == graphs
