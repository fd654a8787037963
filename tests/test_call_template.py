"""The call template (`pipelines/template.py`): arguments as one checked object, one generate path, explicit loop
dependencies, and loud non-finite values (nan/inf inputs are errors before any model runs; a generation that ends
non-finite is reported once, after the loop)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging

import numpy as np
import pytest
import torch
from conftest import random_image

import rapiddiff
from rapiddiff.compile import forbid_host_syncs_in_loop
from rapiddiff.pipelines import denoise as denoise_module
from rapiddiff.pipelines.controlnet import ControlNetArgs
from rapiddiff.pipelines.controlnet_sd_xl import XLControlNetArgs
from rapiddiff.pipelines.deepfloyd_if import IFArgs, IFSuperResolutionArgs
from rapiddiff.pipelines.stable_diffusion_img2img import Img2ImgArgs, InpaintArgs
from rapiddiff.pipelines.stable_diffusion_upscale import UpscaleArgs
from rapiddiff.pipelines.stable_diffusion_xl import XLArgs
from rapiddiff.pipelines.stable_diffusion_xl_img2img import XLImg2ImgArgs
from rapiddiff.pipelines.stable_diffusion_xl_inpaint import XLInpaintArgs
from rapiddiff.pipelines.template import CallArgs, DenoisingPipeline

PROMPT = "a red cube"
ARGS_CLASSES = {
    "StableDiffusionPipeline": CallArgs,
    "StableDiffusionImg2ImgPipeline": Img2ImgArgs,
    "StableDiffusionInpaintPipeline": InpaintArgs,
    "StableDiffusionControlNetPipeline": ControlNetArgs,
    "StableDiffusionUpscalePipeline": UpscaleArgs,
    "IFPipeline": IFArgs,
    "IFSuperResolutionPipeline": IFSuperResolutionArgs,
    "StableDiffusionXLPipeline": XLArgs,
    "StableDiffusionXLImg2ImgPipeline": XLImg2ImgArgs,
    "StableDiffusionXLInpaintPipeline": XLInpaintArgs,
    "StableDiffusionXLControlNetPipeline": XLControlNetArgs,
}


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    pipe = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def no_model_runs(pipe, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model ran before the inputs were checked")

    monkeypatch.setattr(pipe, "encode_prompt", no_model)
    monkeypatch.setattr(pipe.unet, "forward", no_model)


# --- the template ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ARGS_CLASSES))
def test_every_call_argument_travels_in_the_args_object(name):
    """Each `__call__` parameter is a field of its pipeline's CallArgs class (none is dropped on the way)."""
    cls = getattr(rapiddiff, name)
    assert issubclass(cls, DenoisingPipeline)
    fields = {f.name for f in dataclasses.fields(ARGS_CLASSES[name]) if f.init}
    params = set(inspect.signature(cls.__call__).parameters) - {"self", "kwargs"}
    assert params <= fields, f"{name}: {sorted(params - fields)} missing from {ARGS_CLASSES[name].__name__}"
    assert cls.__call__.__doc__  # the signature's documentation stays on the call


def signature_defaults(cls) -> dict:
    """A pipeline's `__call__` parameters with their defaults, as `locals()` holds them first thing in the call."""
    params = inspect.signature(cls.__call__).parameters
    return {n: {} if p.kind is p.VAR_KEYWORD else p.default for n, p in params.items() if n != "self"}


def test_from_locals_refuses_unknown_arguments():
    sd_locals = signature_defaults(rapiddiff.StableDiffusionPipeline) | {"prompt": PROMPT}
    with pytest.raises(TypeError, match=r"no field\(s\) \['strength'\]"):
        CallArgs.from_locals(sd_locals | {"strength": 0.5})
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['foo'\]"):
        CallArgs.from_locals(sd_locals | {"kwargs": {"foo": 1}})
    assert CallArgs.from_locals(sd_locals | {"kwargs": {"callback_steps": 2}}).callback_steps == 2
    with pytest.raises(ValueError, match="ip_adapter_image is not supported"):
        CallArgs.from_locals(sd_locals | {"ip_adapter_image": random_image(8, 8)})
    img2img = signature_defaults(rapiddiff.StableDiffusionImg2ImgPipeline)
    args = Img2ImgArgs.from_locals(img2img | {"prompt": [PROMPT, PROMPT], "strength": 0.5})
    assert (args.strength, args.batch_size, args.image, args.callback) == (0.5, 2, None, None)


@pytest.mark.parametrize("name", sorted(ARGS_CLASSES))
def test_each_argument_is_declared_once(name):
    """A CallArgs field has a default only where some pipeline's signature lacks the argument, and that default is
    what every signature that has the argument says: the signature is where defaults are declared."""
    params = signature_defaults(getattr(rapiddiff, name))
    for field in dataclasses.fields(ARGS_CLASSES[name]):
        if not field.init:
            continue
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            assert field.name in params or field.name in CallArgs.keyword_only_extras, field.name
            continue
        default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
        assert field.name not in params or params[field.name] == default, (name, field.name)


@pytest.mark.parametrize("name", sorted(ARGS_CLASSES))
def test_call_signatures_are_diffusers(name):
    """Argument names, order, kinds and defaults of every pipeline's `__call__` are Diffusers 0.42.1's."""
    import diffusers

    def described(cls):
        params = inspect.signature(cls.__call__).parameters.values()
        return [(p.name, p.kind, p.default) for p in params]

    assert described(getattr(rapiddiff, name)) == described(getattr(diffusers, name))


def test_loop_takes_its_dependencies_explicitly(sd):
    """denoise gets the schedule, the step object, the conditioning, the step runner and the progress reporter; the
    runner is public on the pipeline; the step works on the call's own scheduler, never the configured one."""
    params = list(inspect.signature(denoise_module.denoise).parameters)
    assert params == ["latents", "schedule", "step", "conditioning", "runner", "progress", "on_step_end"]
    seen = []

    def counting_runner(step, x):
        seen.append(x.i)
        assert step.scheduler is not sd.__dict__["scheduler"] and step.scheduler is sd.scheduler  # the call's copy
        return denoise_module.run_step(step, x)

    sd.step_runner = counting_runner
    try:
        out = sd(PROMPT, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        sd.step_runner = None
    assert seen == list(range(sd.num_timesteps)) and len(seen) >= 2
    assert out.images.shape == (1, 4, 16, 16)


# --- non-finite inputs: errors before any model runs -------------------------------------------------------------------
NAN_EMBEDS = torch.zeros(1, 77, 32).index_fill_(1, torch.tensor([3]), float("nan"))
BAD_NUMBERS = [
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number, got inf"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
    (dict(eta=float("nan")), "eta must be a finite number"),
    (dict(guidance_rescale=float("nan")), "guidance_rescale must be a finite number"),
    (dict(prompt=None, prompt_embeds=NAN_EMBEDS), r"prompt_embeds has 32 non-finite value\(s\)"),
    (
        dict(
            negative_prompt_embeds=torch.full((1, 77, 32), float("inf")),
            prompt=None,
            prompt_embeds=torch.zeros(1, 77, 32),
        ),
        "negative_prompt_embeds has 2464 non-finite",
    ),
    (dict(latents=torch.full((1, 4, 16, 16), float("nan"))), "latents has 1024 non-finite"),
    (dict(width=0), "width must be a positive int, got 0"),
    (dict(height=0), "height must be a positive int, got 0"),
]


@pytest.mark.parametrize("kw, match", BAD_NUMBERS)
def test_non_finite_and_zero_inputs_are_errors(sd, monkeypatch, kw, match):
    no_model_runs(sd, monkeypatch)
    with pytest.raises(ValueError, match=match):
        sd(**({"prompt": PROMPT, "num_inference_steps": 2} | kw))


def test_non_finite_strength_image_and_control_scale(sd, monkeypatch):
    img2img = rapiddiff.StableDiffusionImg2ImgPipeline(**sd.components)
    no_model_runs(img2img, monkeypatch)
    with pytest.raises(ValueError, match="strength must be a finite number, got nan"):
        img2img(PROMPT, image=random_image(32, 32), strength=float("nan"))
    image = np.full((1, 32, 32, 3), 0.5, dtype=np.float32)
    image[0, 3, 4, 1] = np.nan
    with pytest.raises(ValueError, match=r"image has 1 non-finite value\(s\)"):
        img2img(PROMPT, image=image, strength=0.5)

    controlnet = rapiddiff.ControlNetModel.from_unet(sd.unet)
    control = rapiddiff.StableDiffusionControlNetPipeline(**sd.components, controlnet=controlnet)
    no_model_runs(control, monkeypatch)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale must be a finite number, got inf"):
        control(PROMPT, image=random_image(32, 32), controlnet_conditioning_scale=float("inf"))


def test_non_finite_noise_level(tiny_upscaler_dir):
    pipe = rapiddiff.StableDiffusionUpscalePipeline.from_pretrained(tiny_upscaler_dir)
    with pytest.raises(ValueError, match="noise_level must be an int"):
        pipe(PROMPT, image=random_image(8, 8), noise_level=float("nan"))


# --- a generation that ends non-finite: reported once, after the loop -------------------------------------------------
@pytest.fixture
def nan_unet_pipe(sd):
    unet = copy.deepcopy(sd.unet)
    with torch.no_grad():
        unet.conv_out.bias[0] = float("nan")
    pipe = rapiddiff.StableDiffusionPipeline(**(sd.components | {"unet": unet}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_non_finite_result_warns_once_after_the_loop(nan_unet_pipe, caplog):
    gen = [torch.Generator().manual_seed(s) for s in (0, 1)]
    # no host read inside the loop: the check runs once, after it
    with forbid_host_syncs_in_loop(nan_unet_pipe), caplog.at_level(logging.WARNING):
        out = nan_unet_pipe([PROMPT] * 2, num_inference_steps=2, output_type="latent", generator=gen)
    warnings = [r.getMessage() for r in caplog.records if "nan/inf" in r.getMessage()]
    assert len(warnings) == 1
    assert "image(s) [0, 1] of the batch of 2" in warnings[0] and "weights" in warnings[0]
    assert out.images.isnan().any()
    assert nan_unet_pipe.non_finite_images == [True, True]


def test_non_finite_result_strict(nan_unet_pipe):
    nan_unet_pipe.strict_non_finite = True
    with pytest.raises(FloatingPointError, match="ended the denoising loop with nan/inf"):
        nan_unet_pipe(PROMPT, num_inference_steps=2, output_type="latent")


def test_finite_result_is_silent(sd, caplog):
    with caplog.at_level(logging.WARNING):
        sd([PROMPT] * 2, num_inference_steps=2, output_type="latent")
    assert not [r for r in caplog.records if "nan/inf" in r.getMessage()]
    assert sd.non_finite_images == [False, False]
