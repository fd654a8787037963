"""torch.compile: every model as one graph, pipelines without recompiles, no host syncs in the loop, dynamic sizes, the
whole-step graph, warm-start caches.

CPU only: the "eager" / "aot_eager" backends where the point is graph capture and recompiles, inductor for the parity
checks. Every test is marked `compile` (deselected by default): `pytest -m compile tests/test_compile.py`.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
import torch._dynamo
from conftest import PIPELINE_ATOL, assert_close_rel, random_image, seeded
from test_controlnet import randomise_output_layers
from test_unet import IF_I, IF_II, INPAINT, SD1, SD2, X4, inputs, single_thread  # noqa: F401 (autouse fixture)
from torch._dynamo.testing import CompileCounter

import rapiddiff
import rapiddiff.cli
from rapiddiff.compile import (
    HostSyncError,
    compile_pipeline,
    forbid_host_syncs,
    forbid_host_syncs_in_loop,
    load_compile_cache,
    save_compile_cache,
)
from rapiddiff.models.attention_processor import Attention
from rapiddiff.presets import PRESETS_DIR

pytestmark = pytest.mark.compile

CONFIGS = PRESETS_DIR
PROMPT = "a red cube on a table"
VAE = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled graphs live on code objects shared by every instance of a class: each test starts from none."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def no_recompiles() -> contextlib.AbstractContextManager:
    return torch._dynamo.config.patch(error_on_recompile=True)


# --- every model compiles as one graph -------------------------------------------------------------------------------
def unet_case(config: dict):
    torch.manual_seed(0)
    model = rapiddiff.UNet2DConditionModel(**config).eval()
    kw = inputs(config)
    return model, lambda m: m(**kw, return_dict=False)[0]


def controlnet_case():
    torch.manual_seed(0)
    unet = rapiddiff.UNet2DConditionModel(**SD1)
    net = rapiddiff.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    net = randomise_output_layers(net, 0)
    kw = inputs(SD1)
    cond = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    scale = torch.tensor(0.7)

    def call(m):
        down, mid = m(kw["sample"], kw["timestep"], kw["encoder_hidden_states"], cond, scale, return_dict=False)
        return torch.cat([*(d.flatten() for d in down), mid.flatten()])

    return net, call


def vae_case(part: str):
    torch.manual_seed(0)
    vae = rapiddiff.AutoencoderKL(**VAE).eval()
    g = torch.Generator().manual_seed(1)
    if part == "decode":
        z = torch.randn(2, 4, 12, 10, generator=g)
        return vae, lambda m: m.decode(z).sample
    x = torch.randn(2, 3, 24, 20, generator=g)
    return vae, lambda m: m.encode(x).latent_dist.parameters


MODEL_CASES = {
    "sd": lambda: unet_case(SD1),
    "sd2": lambda: unet_case(SD2),
    "inpaint-9ch": lambda: unet_case(INPAINT),
    "if-i": lambda: unet_case(IF_I),
    "if-ii": lambda: unet_case(IF_II),
    "x4": lambda: unet_case(X4),
    "controlnet": controlnet_case,
    "vae-decode": lambda: vae_case("decode"),
    "vae-encode": lambda: vae_case("encode"),
}


def set_processors(model: torch.nn.Module, kind: str) -> None:
    for layer in model.modules():
        if isinstance(layer, Attention):
            layer.set_processor(layer.default_processor() if kind == "sdpa" else layer.vanilla_processor())


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_every_model_is_one_graph_in_both_layouts_and_processors(name):
    """fullgraph=True in contiguous and channels_last layout, with vanilla and SDPA attention: the eager result.

    Graph capture is the point (the "eager" backend); inductor's numerics are checked on the recipe below."""
    model, run = MODEL_CASES[name]()
    with torch.no_grad():
        expected = run(model)
        # The layout changes no Python path, the processor does: two runs cover both of each.
        for memory_format, kind in ((torch.contiguous_format, "vanilla"), (torch.channels_last, "sdpa")):
            model.to(memory_format=memory_format)
            set_processors(model, kind)
            torch._dynamo.reset()
            counter = CompileCounter()
            out = torch.compile(lambda: run(model), backend=counter, fullgraph=True)()
            assert_close_rel(out, expected, what=f"{name} {memory_format} {kind}")
            assert counter.frame_count == 1


# --- tiny pipelines of every family ----------------------------------------------------------------------------------
def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def txt2img(tiny_sd_dir):
    return quiet(rapiddiff.DiffusionPipeline.from_pretrained(tiny_sd_dir))


def if_scheduler(name: str, subfolder: str = "scheduler"):
    path = CONFIGS / name / subfolder / "scheduler_config.json"
    return rapiddiff.DDPMScheduler.from_config(json.loads(path.read_text()))


def if_unet(config: dict, seed: int):
    torch.manual_seed(seed)
    return rapiddiff.UNet2DConditionModel(**config).eval()


def if_embeds(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(1, 7, 48, generator=g), negative_prompt_embeds=torch.randn(1, 7, 48, generator=g)
    )


# IF as the benchmark runs it: prompt embeddings given, no text encoder, safety checker or watermark
IF_WITHOUT_TEXT = dict(
    tokenizer=None,
    text_encoder=None,
    safety_checker=None,
    feature_extractor=None,
    watermarker=None,
    requires_safety_checker=False,
)


def make_pipeline(family: str, tiny_sd_dir, tiny_upscaler_dir):
    """A fresh rapiddiff pipeline of `family` on tiny random weights (fresh: compiling changes its modules)."""
    if family == "upscale":
        return quiet(rapiddiff.DiffusionPipeline.from_pretrained(tiny_upscaler_dir))
    if family == "if-i":
        scheduler = if_scheduler("IF-I-M-v1.0")
        return quiet(rapiddiff.IFPipeline(**IF_WITHOUT_TEXT, unet=if_unet(IF_I, 0), scheduler=scheduler))
    if family == "if-ii":
        schedulers = dict(
            scheduler=if_scheduler("IF-II-M-v1.0"),
            image_noising_scheduler=if_scheduler("IF-II-M-v1.0", "image_noising_scheduler"),
        )
        return quiet(rapiddiff.IFSuperResolutionPipeline(**IF_WITHOUT_TEXT, unet=if_unet(IF_II, 1), **schedulers))
    parts = txt2img(tiny_sd_dir).components
    if family == "txt2img":
        return quiet(rapiddiff.StableDiffusionPipeline(**parts))
    if family == "img2img":
        return quiet(rapiddiff.StableDiffusionImg2ImgPipeline(**parts))
    if family == "inpaint":
        torch.manual_seed(0)
        unet = rapiddiff.UNet2DConditionModel.from_config(parts["unet"].config, in_channels=9).eval()
        return quiet(rapiddiff.StableDiffusionInpaintPipeline(**(parts | {"unet": unet})))
    torch.manual_seed(0)
    net = rapiddiff.ControlNetModel.from_unet(parts["unet"], conditioning_embedding_out_channels=(16, 32))
    return quiet(rapiddiff.StableDiffusionControlNetPipeline(**parts, controlnet=randomise_output_layers(net, 0)))


IMAGE, MASK = random_image(32, 48, seed=1), random_image(32, 48, seed=2, mode="L")
STAGE_1 = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
# Per family: calls that must share every graph after the first: other prompts, seeds, guidance scales, step counts,
# strengths, conditioning scales, noise levels, schedulers ("scheduler": a class name swapped in before the call).
CALLS = {
    "txt2img": [
        dict(prompt=PROMPT),
        dict(prompt="a blue sphere in the rain", seed=1, guidance_scale=3.0, num_inference_steps=3),
        dict(scheduler="EulerDiscreteScheduler", guidance_scale=9.0),  # float32 timesteps where PNDM's are int64
        dict(scheduler="DPMSolverMultistepScheduler", num_inference_steps=4),
    ],
    "img2img": [
        dict(prompt=PROMPT, image=IMAGE, strength=0.8),
        dict(prompt="a blue sphere", image=IMAGE, strength=0.5, seed=2, num_inference_steps=4, guidance_scale=4.0),
        dict(scheduler="EulerAncestralDiscreteScheduler", image=IMAGE, strength=0.9),
    ],
    "inpaint": [
        dict(prompt=PROMPT, image=IMAGE, mask_image=MASK),
        dict(prompt="a hole", image=IMAGE, mask_image=MASK, strength=0.7, seed=3, guidance_scale=5.0),
        dict(scheduler="DDIMScheduler", image=IMAGE, mask_image=MASK, num_inference_steps=3),
    ],
    "controlnet": [  # steps past control_guidance_end skip the ControlNet: the UNet has a graph without residuals
        dict(prompt=PROMPT, image=IMAGE, control_guidance_end=0.5),
        dict(prompt="a cat", image=IMAGE, controlnet_conditioning_scale=0.4, guidance_scale=2.0, seed=1),
        dict(image=IMAGE, controlnet_conditioning_scale=1.3, control_guidance_end=0.7, num_inference_steps=4),
        dict(scheduler="EulerDiscreteScheduler", image=IMAGE, controlnet_conditioning_scale=0.8),
    ],
    "if-i": [
        dict(**if_embeds(0)),
        dict(**if_embeds(1), guidance_scale=3.0, seed=1, num_inference_steps=3),
        dict(**if_embeds(2), scheduler="DPMSolverMultistepScheduler"),
    ],
    "if-ii": [
        dict(**if_embeds(0), image=STAGE_1),
        dict(**if_embeds(1), image=STAGE_1 * 0.5, noise_level=100, guidance_scale=2.0, seed=2),
        dict(**if_embeds(2), image=STAGE_1, num_inference_steps=3, scheduler="DPMSolverMultistepScheduler"),
    ],
    "upscale": [
        dict(prompt=PROMPT, image=random_image(16, 16, seed=4)),
        dict(prompt="a fox", image=random_image(16, 16, seed=5), noise_level=50, guidance_scale=4.0, seed=1),
        dict(prompt=PROMPT, image=random_image(16, 16, seed=4), scheduler="EulerDiscreteScheduler"),
    ],
}
IF_SIZES = {"if-i": dict(height=16, width=16), "if-ii": dict(height=32, width=32)}


def call(pipe, family: str, spec: dict) -> np.ndarray:
    kwargs = dict(spec)
    if "scheduler" in kwargs:
        pipe.scheduler = getattr(rapiddiff, kwargs.pop("scheduler")).from_config(pipe.scheduler.config)
    seed = kwargs.pop("seed", 0)
    if "prompt_embeds" not in kwargs:
        kwargs.setdefault("prompt", PROMPT)
    kwargs = dict(num_inference_steps=2, output_type="np", generator=seeded(seed)) | IF_SIZES.get(family, {}) | kwargs
    return pipe(**kwargs).images


@pytest.mark.parametrize("family", list(CALLS))
def test_pipeline_calls_never_recompile(family, tiny_sd_dir, tiny_upscaler_dir):
    """compile_pipeline, one warm-up call, then every other call under error_on_recompile, same images as eager."""
    pipe = make_pipeline(family, tiny_sd_dir, tiny_upscaler_dir)
    scheduler = pipe.scheduler
    first, *others = CALLS[family]
    expected = [call(pipe, family, spec) for spec in (first, *others)]
    pipe.scheduler = scheduler
    counter = CompileCounter()
    compile_pipeline(pipe, backend=counter)
    # one graph per model (UNet, ControlNet, VAE decoder), and the ControlNet pipeline's UNet without residuals
    models = (pipe.unet, getattr(pipe, "controlnet", None), getattr(pipe, "vae", None))
    graphs = sum(m is not None for m in models) + (family == "controlnet")
    # channels_last changes the convolutions' summation order: the pipelines' tolerance (2e-3), not the models' (1e-4)
    np.testing.assert_allclose(call(pipe, family, first), expected[0], atol=PIPELINE_ATOL)
    assert counter.frame_count == graphs
    with no_recompiles():
        for spec, want in zip(others, expected[1:]):
            np.testing.assert_allclose(call(pipe, family, spec), want, atol=PIPELINE_ATOL)
    assert counter.frame_count == graphs


def test_compile_pipeline_keeps_the_models_usable(tiny_sd_dir, tmp_path):
    pipe = txt2img(tiny_sd_dir)
    unet = pipe.unet
    assert compile_pipeline(pipe, backend="eager") is pipe
    assert pipe.unet is unet and isinstance(pipe.unet, rapiddiff.UNet2DConditionModel)  # compiled in place
    assert pipe.unet.config["in_channels"] == 4 and pipe.unet._compiled_call_impl is not None
    assert pipe.vae.decoder._compiled_call_impl is not None and pipe.vae.encoder._compiled_call_impl is None
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    pipe.to(torch.float32)
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = rapiddiff.DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert reloaded.unet.state_dict().keys() == unet.state_dict().keys()
    torch.testing.assert_close(reloaded.unet.conv_in.weight, unet.conv_in.weight)


def test_compile_pipeline_argument_errors(tiny_sd_dir):
    pipe = txt2img(tiny_sd_dir)
    with pytest.raises(ValueError, match="mode='fast'"):
        compile_pipeline(pipe, mode="fast")
    with pytest.raises(ValueError, match="memory_format"):
        compile_pipeline(pipe, memory_format=torch.preserve_format)
    with pytest.raises(ValueError, match="'controlnet'"):
        compile_pipeline(pipe, components=["unet", "controlnet"])
    with pytest.raises(ValueError, match="'tokenizer'"):
        compile_pipeline(pipe, components=["tokenizer"])
    with pytest.raises(TypeError, match="components"):
        compile_pipeline(pipe, components="unet")
    with pytest.raises(ValueError, match="dynamic"):
        compile_pipeline(pipe, dynamic="yes")
    assert pipe.unet._compiled_call_impl is None  # nothing was touched


def test_cli_compile_flag_compiles_the_pipeline(tiny_sd_dir, tmp_path, monkeypatch):
    """`rapiddiff generate --compile` goes through compile_pipeline (here on the eager backend) and writes the image."""
    import rapiddiff.cli_generate

    seen = []

    def eager_compile(pipe, **kwargs):
        seen.append(pipe)
        return compile_pipeline(pipe, backend="eager", **kwargs)

    monkeypatch.setattr(rapiddiff.cli_generate, "compile_pipeline", eager_compile)
    out = tmp_path / "x.png"
    argv = ["generate", PROMPT, "--model", str(tiny_sd_dir), "-o", str(out), "--compile", "--steps", "2"]
    assert rapiddiff.cli.main(argv) == 0
    assert out.is_file() and len(seen) == 1 and seen[0].unet._compiled_call_impl is not None


# --- inductor parity and the warm-start cache ----------------------------------------------------------------------------
def test_recipe_with_inductor_matches_eager_and_saves_its_cache(tiny_sd_dir, tmp_path):
    """The reference recipe (channels_last, reduce-overhead, fullgraph, inductor; unfrozen, so that inductor caches
    it: frozen CPU graphs are not cached, see test_compile_levers) on the UNet and the VAE decoder."""
    pipe = txt2img(tiny_sd_dir)
    g = torch.Generator().manual_seed(5)
    x, e = torch.randn(2, 4, 16, 24, generator=g), torch.randn(2, 7, 32, generator=g)
    t = torch.tensor(437.0)
    with torch.no_grad():
        unet_expected = pipe.unet(x, t, e).sample
    expected = call(pipe, "txt2img", dict(prompt=PROMPT, height=32, width=48))
    compile_pipeline(pipe, freezing=False)
    images = call(pipe, "txt2img", dict(prompt=PROMPT, height=32, width=48))
    np.testing.assert_allclose(images, expected, atol=1e-3)
    with torch.no_grad():
        assert_close_rel(pipe.unet(x, t, e).sample, unet_expected, rel=1e-4, what="inductor UNet")
    path = save_compile_cache(tmp_path / "cache" / "sd.bin")
    assert path.stat().st_size > 0
    load_compile_cache(path)
    with pytest.raises(FileNotFoundError, match="no cache file"):
        load_compile_cache(tmp_path / "missing.bin")


# --- dynamic sizes ---------------------------------------------------------------------------------------------------
def test_dynamic_sizes_share_one_graph(tiny_sd_dir):
    """dynamic=True: a second (and third) image size reuses the graphs; static shapes recompile."""
    # (On the CPU the convolution backend switches at a size threshold, a guard of its own: sizes stay below it.)
    sizes = [dict(height=48, width=32), dict(height=32, width=64), dict(height=56, width=40)]
    pipe = txt2img(tiny_sd_dir)
    expected = [call(pipe, "txt2img", dict(prompt=PROMPT, **size)) for size in sizes]
    counter = CompileCounter()
    compile_pipeline(pipe, backend=counter, dynamic=True)
    np.testing.assert_allclose(call(pipe, "txt2img", dict(prompt=PROMPT, **sizes[0])), expected[0], atol=1e-4)
    with no_recompiles():
        for size, want in zip(sizes[1:], expected[1:]):
            np.testing.assert_allclose(call(pipe, "txt2img", dict(prompt=PROMPT, **size)), want, atol=1e-4)
    assert counter.frame_count == 2

    static = txt2img(tiny_sd_dir)
    compile_pipeline(static, backend="eager")
    call(static, "txt2img", dict(prompt=PROMPT, **sizes[0]))
    with no_recompiles(), pytest.raises(torch._dynamo.exc.RecompileError):
        call(static, "txt2img", dict(prompt=PROMPT, **sizes[1]))


# --- no host syncs in the loop -----------------------------------------------------------------------------------------
# the schedulers each family's models work with (IF's UNets predict a variance only DDPM and DPM-Solver read)
SCHEDULERS = {
    "txt2img": [
        "PNDMScheduler",
        "DDIMScheduler",
        "DDPMScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "DPMSolverSDEScheduler",
        "LCMScheduler",
        "TCDScheduler",
        "LMSDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "EDMEulerScheduler",
    ],
    "if-i": ["DDPMScheduler", "DPMSolverMultistepScheduler"],
}


def test_forbid_host_syncs_catches_value_reads():
    x = torch.randn(4)
    with forbid_host_syncs():
        y = (x * 2 + 1).softmax(0)  # ordinary ops pass
        for read in (lambda: y[0].item(), lambda: float(y.sum()), lambda: bool(y[0] > 0), lambda: y.nonzero()):
            with pytest.raises(HostSyncError):
                read()
        with pytest.raises(HostSyncError, match="boolean-mask"):
            y[y > 0.2]
    assert y[0].item() == pytest.approx(float(y[0]))  # allowed again outside


@pytest.mark.parametrize("family", ["txt2img", "if-i"])
def test_denoising_loops_make_no_host_syncs(family, tiny_sd_dir, tiny_upscaler_dir):
    """Every scheduler's loop (model, guidance, scheduler step) runs under forbid_host_syncs; an injected .item() fails."""
    pipe = make_pipeline(family, tiny_sd_dir, tiny_upscaler_dir)
    spec = CALLS[family][0]
    for name in SCHEDULERS[family]:
        options = dict(eta=0.5) if name == "DDIMScheduler" else {}  # DDIM's noisy variant
        with forbid_host_syncs_in_loop(pipe):
            call(pipe, family, spec | options | dict(scheduler=name))

    def read_back(module, args, out):  # a Python branch on a model output: a host sync on an accelerator
        if out[0].mean() > 100:
            raise AssertionError("unreachable")

    hook = pipe.unet.register_forward_hook(read_back)
    try:
        call(pipe, family, spec)  # outside the guard the read is allowed
        with forbid_host_syncs_in_loop(pipe), pytest.raises(HostSyncError, match="bool"):
            call(pipe, family, spec)
    finally:
        hook.remove()
    assert pipe.step_runner is None  # the guard is gone


# --- the whole step as one graph -----------------------------------------------------------------------------------------
WHOLE_STEP_CASES = [
    ("PNDMScheduler", {}, {}),
    ("DDIMScheduler", {}, {}),
    ("DDIMScheduler", {}, dict(eta=0.7)),
    ("DDPMScheduler", {}, {}),
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, solver_type="heun"), {}),
]


def test_whole_step_gives_the_loop_s_images_with_one_graph_per_scheduler(tiny_sd_dir):
    pipe = txt2img(tiny_sd_dir)
    base = pipe.scheduler.config
    runs = [dict(prompt=PROMPT, num_inference_steps=5), dict(prompt="a fox", seed=4, num_inference_steps=7)]

    def images(name, config, kwargs, run):
        pipe.scheduler = getattr(rapiddiff, name).from_config(base, **config)
        return call(pipe, "txt2img", run | kwargs)

    expected = [[images(*case, run) for run in runs] for case in WHOLE_STEP_CASES]
    counter = CompileCounter()
    compile_pipeline(pipe, backend=counter, whole_step=True)
    assert pipe.unet._compiled_call_impl is None  # the UNet runs inside the step's graph
    for case, want in zip(WHOLE_STEP_CASES, expected):
        # (the compiled step's UNet is channels_last, the reference contiguous: a few 1e-4 apart)
        np.testing.assert_allclose(images(*case, runs[0]), want[0], atol=1e-3, err_msg=str(case))
        with no_recompiles():  # another call, other step indices and counts: the same graph
            np.testing.assert_allclose(images(*case, runs[1]), want[1], atol=1e-3, err_msg=str(case))
    assert counter.frame_count == len(WHOLE_STEP_CASES) + 1  # one step graph per case, and the VAE decoder


def test_whole_step_with_learned_variance(tiny_sd_dir, tiny_upscaler_dir):
    """IF stage I's DDPM (learned_range variance, thresholding) through AOTAutograd in the step's graph."""
    pipe = make_pipeline("if-i", tiny_sd_dir, tiny_upscaler_dir)
    expected = call(pipe, "if-i", CALLS["if-i"][0] | dict(num_inference_steps=3))
    compile_pipeline(pipe, backend="aot_eager", whole_step=True)
    np.testing.assert_allclose(call(pipe, "if-i", CALLS["if-i"][0] | dict(num_inference_steps=3)), expected, atol=1e-3)
    with no_recompiles():
        call(pipe, "if-i", CALLS["if-i"][1] | dict(guidance_scale=7.0))


def test_whole_step_errors(tiny_sd_dir, tiny_upscaler_dir):
    pipe = txt2img(tiny_sd_dir)
    compile_pipeline(pipe, backend="eager", whole_step=True)
    pipe.scheduler = rapiddiff.PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=False)
    with pytest.raises(ValueError, match="skip_prk_steps=True"):
        call(pipe, "txt2img", dict(prompt=PROMPT, num_inference_steps=5))
    import diffusers

    pipe.scheduler = diffusers.DDIMScheduler()
    with pytest.raises(TypeError, match="rapiddiff's schedulers"):
        call(pipe, "txt2img", dict(prompt=PROMPT))
    with pytest.raises(ValueError, match="ControlNet"):
        compile_pipeline(make_pipeline("controlnet", tiny_sd_dir, tiny_upscaler_dir), backend="eager", whole_step=True)
