"""StableDiffusionPipeline against diffusers' on a tiny checkpoint: same seed -> same image (2e-3 on "np" output)."""

from __future__ import annotations

import json
import shutil

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import PIPELINE_ATOL, assert_same_images, run_both, seeded, tiny_sd_components
from transformers import CLIPConfig, CLIPImageProcessor

import rapiddiff
from rapiddiff import DiffusionPipeline, StableDiffusionPipeline
from rapiddiff.pipelines.stable_diffusion import StableDiffusionPipelineOutput

PROMPT = "a red cube on a table"


@pytest.fixture(scope="module")
def loaded(tiny_sd_dir):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    ours = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


@pytest.fixture
def pipes(loaded, tiny_sd_dir):
    """(diffusers, rapiddiff) pipelines, each test starting from the checkpoint's PNDM scheduler."""
    ref, ours = loaded
    ref.scheduler = diffusers.PNDMScheduler.from_pretrained(tiny_sd_dir / "scheduler")
    ours.scheduler = rapiddiff.PNDMScheduler.from_pretrained(tiny_sd_dir / "scheduler")
    return ref, ours


# --- parity ----------------------------------------------------------------------------------------------------------
def test_text_to_image_matches_diffusers(pipes):
    ref, ours = run_both(pipes)
    assert isinstance(ours, StableDiffusionPipelineOutput)
    assert ours.images.shape == (1, 32, 32, 3)  # unet sample_size 16 x vae_scale_factor 2
    assert ours.nsfw_content_detected is None
    assert_same_images(ref, ours)


def test_prompt_list_negatives_images_per_prompt_non_square(pipes):
    ref, ours = run_both(
        pipes,
        prompt=["a red cube", "a blue sphere"],
        negative_prompt=["blurry", "dark"],
        num_images_per_prompt=2,
        height=32,
        width=48,
    )
    assert ours.images.shape == (4, 32, 48, 3)
    assert_same_images(ref, ours)


def test_string_negative_prompt(pipes):
    assert_same_images(*run_both(pipes, negative_prompt="low quality", guidance_scale=5.0))


def test_no_guidance_runs_one_unet_pass(pipes):
    batches = []
    hook = pipes[1].unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        ref, ours = run_both(pipes, guidance_scale=1.0, negative_prompt="ignored without guidance")
    finally:
        hook.remove()
    assert batches == [1] * pipes[1].num_timesteps  # PNDM runs 3 model calls for 2 steps
    assert_same_images(ref, ours)


def test_guidance_rescale(pipes):
    assert_same_images(*run_both(pipes, guidance_rescale=0.7))


def test_prompt_embeds(pipes):
    ref, ours = pipes
    embeds, negative = ref.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="blurry")
    our_embeds, our_negative = ours.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="blurry")
    torch.testing.assert_close(our_embeds, embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_negative, negative, rtol=0, atol=1e-5)
    outs = run_both(pipes, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    assert_same_images(*outs)
    no_negative = run_both(pipes, prompt=None, prompt_embeds=embeds)  # guidance against ""
    assert_same_images(*no_negative)


def test_clip_skip(pipes):
    ref, ours = pipes
    tokens = ours.tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ours.text_encoder(tokens.input_ids, output_hidden_states=True).hidden_states[-2]
        # Diffusers' rule (its own code reaches the norm through `text_model`, which transformers 5 removed)
        expected = ours.text_encoder.final_layer_norm(hidden)
    actual, negative = ours.encode_prompt(PROMPT, "cpu", 2, False, clip_skip=1)
    assert negative is None and actual.shape == (2, 77, 32)
    torch.testing.assert_close(actual, expected.expand(2, -1, -1), rtol=0, atol=1e-5)
    _, ref_negative = ref.encode_prompt(PROMPT, "cpu", 1, True)  # negative prompts never skip layers
    ref_out = ref(prompt_embeds=expected, negative_prompt_embeds=ref_negative, num_inference_steps=2,
                  output_type="np", generator=seeded(0))  # fmt: skip
    our_out = ours(PROMPT, clip_skip=1, num_inference_steps=2, output_type="np", generator=seeded(0))
    assert_same_images(ref_out, our_out)


def test_list_of_generators(pipes):
    ref, ours = run_both(pipes, prompt=["a cat", "a dog"], seed=[3, 4], num_images_per_prompt=1)
    assert_same_images(ref, ours)
    single = pipes[1]("a dog", num_inference_steps=2, output_type="np", generator=seeded(4)).images
    np.testing.assert_allclose(ours.images[1:], single, rtol=0, atol=1e-5)  # each image from its own generator


def test_latents_given(pipes):
    latents = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(7))
    ref, ours = run_both(pipes, latents=latents, num_images_per_prompt=2, height=32, width=48)
    assert_same_images(ref, ours)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("EulerDiscreteScheduler", {}),
        ("EulerAncestralDiscreteScheduler", {}),
        ("DDIMScheduler", {"eta": 0.5}),
        ("DPMSolverMultistepScheduler", {}),
    ],
)
def test_scheduler_swap(pipes, name, kw):
    for p, lib in zip(pipes, (diffusers, rapiddiff)):
        p.scheduler = getattr(lib, name).from_config(p.scheduler.config)
    assert_same_images(*run_both(pipes, num_inference_steps=3, **kw))


@pytest.mark.parametrize(
    "name, config",
    [
        ("UniPCMultistepScheduler", {}),
        ("DEISMultistepScheduler", {}),
        ("DPMSolverSinglestepScheduler", {}),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
        ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}),
        ("LCMScheduler", {}),
        ("TCDScheduler", {}),
    ],
)
def test_solver_scheduler_swap(pipes, name, config):
    """The schedulers of issue 12 swapped in with `from_config`, as Diffusers' guides do."""
    for p, lib in zip(pipes, (diffusers, rapiddiff)):
        p.scheduler = getattr(lib, name).from_config(p.scheduler.config, **config)
    assert_same_images(*run_both(pipes, num_inference_steps=4))


def test_checkpoint_naming_a_solver_scheduler_loads(tiny_sd_dir, tmp_path):
    """model_index.json and scheduler_config.json naming UniPC: `from_pretrained` builds rapiddiff's UniPC."""
    folder = tmp_path / "unipc"
    shutil.copytree(tiny_sd_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "UniPCMultistepScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(config | {"_class_name": "UniPCMultistepScheduler"})
    )
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe.scheduler) is rapiddiff.UniPCMultistepScheduler
    assert pipe.scheduler.config.beta_schedule == config["beta_schedule"]


@pytest.mark.parametrize("output_type", ["pt", "latent", "pil"])
def test_output_types(pipes, output_type):
    ref, ours = run_both(pipes, output_type=output_type, num_images_per_prompt=2)
    if output_type == "pil":
        assert isinstance(ours.images, list) and all(isinstance(i, PIL.Image.Image) for i in ours.images)
        actual = np.stack([np.asarray(i, dtype=np.int16) for i in ours.images])
        expected = np.stack([np.asarray(i, dtype=np.int16) for i in ref.images])
        assert np.abs(actual - expected).max() <= 1
    else:
        assert isinstance(ours.images, torch.Tensor)
        shape = (2, 3, 32, 32) if output_type == "pt" else (2, 4, 16, 16)
        assert ours.images.shape == shape
        torch.testing.assert_close(ours.images, ref.images, rtol=0, atol=PIPELINE_ATOL)


def test_return_dict_false_and_indexing(pipes):
    ours = pipes[1]
    out = ours(PROMPT, num_inference_steps=2, output_type="np", generator=seeded(0))
    images, nsfw = ours(PROMPT, num_inference_steps=2, output_type="np", generator=seeded(0), return_dict=False)
    np.testing.assert_array_equal(images, out.images)
    assert nsfw is None and out[0] is out.images and out["images"] is out.images


def test_callback_on_step_end_matches_diffusers(pipes):
    seen = {id(p): [] for p in pipes}

    def callback(pipe, i, t, kwargs):
        seen[id(pipe)].append((i, sorted(kwargs), kwargs["prompt_embeds"].shape[0]))
        if i == 0:  # both latents and the conditioning may be replaced
            kwargs["latents"] = kwargs["latents"] * 0.5
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].flip(0)
        return kwargs

    names = ["latents", "prompt_embeds"]
    ref, ours = run_both(pipes, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=names)
    assert_same_images(ref, ours)
    assert seen[id(pipes[1])] == seen[id(pipes[0])] == [(i, names, 2) for i in range(3)]
    assert pipes[1].num_timesteps == pipes[0].num_timesteps


def test_callback_can_turn_guidance_off(pipes):
    """Diffusers' SDCFGCutoffCallback pattern: set `_guidance_scale` and keep the conditional embeddings only."""

    def cutoff(pipe, i, t, kwargs):
        if i == 0:
            pipe._guidance_scale = 0.0
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
        return kwargs

    outs = run_both(
        pipes, num_inference_steps=3, callback_on_step_end=cutoff, callback_on_step_end_tensor_inputs=["prompt_embeds"]
    )
    assert_same_images(*outs)


def test_custom_timesteps(pipes):
    for p, lib in zip(pipes, (diffusers, rapiddiff)):
        p.scheduler = lib.EulerDiscreteScheduler.from_config(p.scheduler.config)
    assert_same_images(*run_both(pipes, timesteps=[999, 600, 250]))
    assert_same_images(*run_both(pipes, sigmas=[14.0, 3.0, 0.5]))


def test_progress_bar(pipes, capsys):
    ours = pipes[1]
    ours.set_progress_bar_config(disable=False)
    try:
        ours(PROMPT, num_inference_steps=3, output_type="latent")
    finally:
        ours.set_progress_bar_config(disable=True)
    assert "3/3" in capsys.readouterr().err


# --- safety checker --------------------------------------------------------------------------------------------------
def _tiny_safety_checker():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=99)
    vision = dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():  # unreachable thresholds: nothing flagged
        checker.concept_embeds_weights.fill_(2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    return checker.eval()


def test_safety_checker(tmp_path):
    ref = diffusers.StableDiffusionPipeline(
        **tiny_sd_components(),
        safety_checker=_tiny_safety_checker(),
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )
    ref.save_pretrained(tmp_path / "sd")
    ours = DiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert type(ours.safety_checker) is rapiddiff.StableDiffusionSafetyChecker
    assert ours.config["safety_checker"] == ("stable_diffusion", "StableDiffusionSafetyChecker")
    pipes = (ref, ours)
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    ref_out, our_out = run_both(pipes, prompt=["a", "b"])
    assert our_out.nsfw_content_detected == [False, False]
    assert_same_images(ref_out, our_out)
    with torch.no_grad():  # every threshold passed: every image flagged and blacked out
        for p in pipes:
            p.safety_checker.concept_embeds_weights.fill_(-2.0)
    ref_out, our_out = run_both(pipes, prompt=["a", "b"])
    assert our_out.nsfw_content_detected == [True, True]
    assert not our_out.images.any()
    assert_same_images(ref_out, our_out)
    disabled = DiffusionPipeline.from_pretrained(tmp_path / "sd", safety_checker=None)
    disabled.set_progress_bar_config(disable=True)
    assert disabled("a", num_inference_steps=2, output_type="np").nsfw_content_detected is None


# --- bad input: an error naming the argument, before any model runs ----------------------------------------------
BAD_INPUTS = [
    (dict(height=36), ValueError, "height must be divisible by 8"),
    (dict(width=-8), ValueError, "width must be a positive int"),
    (dict(prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "exactly one of prompt and prompt_embeds"),
    (dict(prompt=None), ValueError, "exactly one of prompt and prompt_embeds"),
    (dict(prompt=3), ValueError, "prompt must be a str"),
    (dict(prompt=[]), ValueError, "prompt must be a str"),
    (dict(prompt=None, prompt_embeds=torch.zeros(77, 32)), ValueError, "prompt_embeds must be a tensor of shape"),
    (
        dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32), negative_prompt_embeds=torch.zeros(2, 77, 32)),
        ValueError,
        "same shape",
    ),
    (dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "at most one of negative"),
    (dict(prompt=["a", "b"], negative_prompt="x"), TypeError, "negative_prompt must have the type of prompt"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), ValueError, "negative_prompt has 1 entries but there are 2"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be an int >= 1, got 0"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt must be a positive int"),
    (dict(output_type="jpeg"), ValueError, "output_type='jpeg'"),
    (dict(generator=[torch.Generator()] * 3), ValueError, "list of 3 generators"),
    (dict(generator=0), TypeError, "generator must be a torch.Generator"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), ValueError, r"latents must have shape \(1, 4, 16, 16\)"),
    (dict(guidance_scale="7"), TypeError, "guidance_scale must be a float"),
    (dict(guidance_rescale=1.5), ValueError, "guidance_rescale must be <= 1.0"),
    (dict(clip_skip=5), ValueError, "clip_skip=5"),
    (dict(cross_attention_kwargs={"attention_op": None}), ValueError, "cross_attention_kwargs"),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"]), ValueError, "noise"),
    (dict(callback_on_step_end="not callable"), TypeError, "callback_on_step_end must be callable"),
    (dict(timesteps=[10, 5], sigmas=[1.0, 0.5]), ValueError, "at most one of timesteps and sigmas"),
    (dict(timesteps=[10, 5]), ValueError, "PNDMScheduler.set_timesteps does not accept custom timesteps"),
    (
        dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 64)),
        ValueError,
        r"prompt_embeds has shape \(1, 77, 64\): the UNet reads text embeddings of width 32",
    ),
    (dict(negative_prompt_embeds=torch.zeros(1, 77, 48)), ValueError, "negative_prompt_embeds has shape"),
]


@pytest.mark.parametrize("kw, error, match", BAD_INPUTS)
def test_bad_inputs_fail_before_any_model_runs(pipes, monkeypatch, kw, error, match):
    ours = pipes[1]

    def no_model(*args, **kwargs):
        raise AssertionError("a model ran before the inputs were checked")

    monkeypatch.setattr(ours, "encode_prompt", no_model)
    monkeypatch.setattr(ours.unet, "forward", no_model)
    with pytest.raises(error, match=match):
        ours(**({"prompt": PROMPT, "num_inference_steps": 2} | kw))


def test_callback_must_return_a_dict(pipes):
    with pytest.raises(TypeError, match="must return a dict"):
        pipes[1](PROMPT, num_inference_steps=2, callback_on_step_end=lambda *a: None)


def test_safety_checker_needs_feature_extractor(pipes):
    components = pipes[1].components | {"safety_checker": object(), "feature_extractor": None}
    with pytest.raises(ValueError, match="feature_extractor"):
        StableDiffusionPipeline(**components)


@pytest.mark.compile
def test_compiled_unet_traces_once_for_all_steps(pipes):
    """The loop hands the UNet the timestep as a tensor, so one graph serves every step."""
    ours = pipes[1]
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager = ours(PROMPT, num_inference_steps=3, output_type="np", generator=seeded(0)).images
    torch._dynamo.reset()
    unet = ours.unet
    ours.unet = torch.compile(unet, backend=counting_backend, fullgraph=True)
    try:
        compiled = ours(PROMPT, num_inference_steps=3, output_type="np", generator=seeded(0)).images
    finally:
        ours.unet = unet
    assert len(graphs) == 1
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=1e-5)


def test_truncation_warnings_name_the_argument_and_stay_short(pipes, caplog):
    """Issue 14: the prompt's warning printed the whole cut-off text; the negative prompt was cut silently."""
    _, ours = pipes
    long_text = " ".join(["castle"] * 2000)
    with caplog.at_level("WARNING", logger="rapiddiff.pipelines.prompt"):
        ours([PROMPT, long_text], negative_prompt=[long_text, "blurry"], num_inference_steps=1, output_type="np")
    messages = [r.getMessage() for r in caplog.records if r.name == "rapiddiff.pipelines.prompt"]
    assert len(messages) == 2, messages
    assert messages[0].startswith("prompt[1] has 2002 tokens; the text encoder takes 77, so the last 1925 were cut")
    assert messages[1].startswith("negative_prompt[0] has 2002 tokens")
    assert all(len(m) < 250 for m in messages)
