"""Diffusers API behaviours its own test suite relies on, each against Diffusers itself (see docs/compat.md)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import assert_close_rel, assert_same_images, run_both, tiny_sd_components

import rapiddiff

LIBRARIES = (diffusers, rapiddiff)
# Diffusers' own SD pipeline tests build their DDIM scheduler so: steps_offset left at its default, 0.
DDIM_TEST_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
)


@pytest.fixture(scope="module")
def sd_components(tiny_sd_dir):
    """{library: components} of the tiny SD checkpoint, loaded by diffusers and by rapiddiff."""
    components = {}
    for library in LIBRARIES:
        pipe = library.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
        components[library] = {k: v for k, v in pipe.components.items() if k != "scheduler"}
    return components


def build_both(sd_components, pipeline: str, scheduler: str = "DDIMScheduler", **scheduler_config):
    """(diffusers, rapiddiff) pipelines of class `pipeline` constructed from components and a fresh scheduler, as
    Diffusers' tests build theirs (so the pipelines' `__init__` sees the scheduler's config as given)."""
    pipes = []
    for library in LIBRARIES:
        sched = getattr(library, scheduler)(**scheduler_config)
        pipe = getattr(library, pipeline)(**sd_components[library], scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    return pipes


# --- outdated scheduler configs rewritten by the SD pipelines' __init__ ----------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_txt2img_with_diffusers_test_config(sd_components, eta):
    pipes = build_both(sd_components, "StableDiffusionPipeline", **DDIM_TEST_CONFIG)
    assert pipes[1].scheduler.config.steps_offset == pipes[0].scheduler.config.steps_offset == 1
    assert_same_images(*run_both(pipes, guidance_scale=6.0, eta=eta))


def test_ddim_img2img_several_init_images(sd_components):
    pipes = build_both(sd_components, "StableDiffusionImg2ImgPipeline", **DDIM_TEST_CONFIG)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    for strength in (0.75, 0.5):
        assert_same_images(*run_both(pipes, prompt=["a red cube"] * 2, image=image, strength=strength))


def test_inpaint_rewrites_skip_prk_steps(sd_components):
    """Inpainting also turns PNDM's Runge-Kutta warm-up off, as Diffusers' inpainting pipeline does."""
    pndm_config = {k: v for k, v in DDIM_TEST_CONFIG.items() if k != "clip_sample"}
    pipes = build_both(sd_components, "StableDiffusionInpaintPipeline", "PNDMScheduler", **pndm_config)
    for pipe in pipes:
        assert pipe.scheduler.config.skip_prk_steps is True and pipe.scheduler.config.steps_offset == 1
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    assert_same_images(*run_both(pipes, image=image, mask_image=mask, strength=0.75))


def test_rewrite_is_in_place_and_keeps_defaults_for_swaps(sd_components):
    """The user's scheduler object is rewritten (Diffusers replaces its config dict); a key it had defaulted stays
    listed in `_use_default_values`, so a swap built `from_config` takes its own default again."""
    scheds, swapped = [], []
    for library in LIBRARIES:
        sched = library.DDIMScheduler(**DDIM_TEST_CONFIG)
        pipe = library.StableDiffusionPipeline(**sd_components[library], scheduler=sched)
        assert pipe.scheduler is sched and sched.config["steps_offset"] == 1
        scheds.append(sched)
        swapped.append(library.DDPMScheduler.from_config(sched.config))
    assert "steps_offset" in scheds[1].config["_use_default_values"]
    for sched in swapped:
        assert sched.config.steps_offset == 0
        sched.set_timesteps(4)
    np.testing.assert_array_equal(swapped[1].timesteps.numpy(), swapped[0].timesteps.numpy())


def test_controlnet_and_explicit_configs_are_not_rewritten(sd_components):
    """Diffusers' ControlNet pipeline leaves the scheduler config alone; so does rapiddiff's."""
    controlnet = rapiddiff.ControlNetModel(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=16,
        layers_per_block=1,
        conditioning_embedding_out_channels=(16, 32),
    )
    sched = rapiddiff.DDIMScheduler(**DDIM_TEST_CONFIG)
    rapiddiff.StableDiffusionControlNetPipeline(**sd_components[rapiddiff], controlnet=controlnet, scheduler=sched)
    assert sched.config.steps_offset == 0


# --- outputs are ordered dicts of their non-None fields ---------------------------------------------------------------
def test_model_outputs_are_dict_like(tiny_sd_dir):
    unets = [library.UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet") for library in LIBRARIES]
    args = (torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 10, torch.randn(1, 7, 32))
    ref, ours = (unet(*args) for unet in unets)
    assert isinstance(ours, dict) and list(ours.keys()) == list(ref.keys()) == ["sample"]
    assert ours["sample"] is ours.sample is ours[0] is ours.to_tuple()[0] is next(iter(ours.values()))
    torch.testing.assert_close(ours["sample"], ref["sample"], rtol=0, atol=1e-4)
    assert list(ours) == ["sample"]  # a dict iterates its keys, as Diffusers' outputs do


def test_outputs_skip_none_fields_like_diffusers():
    sample = torch.ones(1, 4, 2, 2)
    for cls_name in ("DDIMScheduler", "DPMSolverMultistepScheduler", "LCMScheduler"):
        outs = []
        for library in LIBRARIES:
            sched = getattr(library, cls_name)()
            sched.set_timesteps(4)
            outs.append(sched.step(sample * 0.1, sched.timesteps[0], sample))
        ref, ours = outs
        assert list(ours.keys()) == list(ref.keys()), cls_name
        assert len(ours.to_tuple()) == len(ref.to_tuple())
    out = rapiddiff.pipelines.stable_diffusion.StableDiffusionPipelineOutput(
        images=np.zeros(1), nsfw_content_detected=None
    )
    assert list(out.keys()) == ["images"] and len(out.to_tuple()) == 1
    with pytest.raises(IndexError):
        out[1]
    with pytest.raises(KeyError):
        out["nsfw_content_detected"]
    with pytest.raises(TypeError):
        out.update(images=None)


def test_outputs_pickle_and_flatten_as_pytrees():
    import pickle

    from rapiddiff.schedulers.scheduling_utils import SchedulerOutput

    out = SchedulerOutput(prev_sample=torch.ones(2), pred_original_sample=torch.zeros(2))
    again = pickle.loads(pickle.dumps(out))
    assert list(again.keys()) == ["prev_sample", "pred_original_sample"] and torch.equal(again[1], torch.zeros(2))
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    assert len(leaves) == 2 and torch.utils._pytree.tree_unflatten(leaves, spec).prev_sample is out.prev_sample


# --- configs compare equal to dicts -----------------------------------------------------------------------------------
def test_scheduler_config_equals_a_dict(tmp_path):
    """Diffusers' test_from_pretrained: a saved-and-loaded config equals the built one less `_use_default_values`."""
    scheduler = rapiddiff.DDIMScheduler(beta_start=0.001, timestep_spacing="trailing")
    scheduler.save_pretrained(tmp_path)
    built = dict(scheduler.config)
    assert scheduler.config == built and built == scheduler.config
    del built["_use_default_values"]
    loaded = rapiddiff.DDIMScheduler.from_pretrained(tmp_path).config
    assert loaded == built and loaded != dict(built, beta_start=0.002)
    assert loaded != 1 and loaded != rapiddiff.DDPMScheduler.from_pretrained(tmp_path).config


def test_model_config_equals_its_json(tiny_sd_dir):
    import json

    unet = rapiddiff.UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    saved = json.loads((tiny_sd_dir / "unet" / "config.json").read_text())
    ours = {k: v for k, v in saved.items() if k in unet.config}  # lists in JSON, tuples in the config: equal
    assert unet.config == ours and unet.config != dict(ours, in_channels=9)


@pytest.mark.parametrize("betas", [np.array([0.1, 0.3]), [0.1, 0.3], torch.tensor([0.1, 0.3])], ids=type)
def test_trained_betas_as_array_or_list(tmp_path, betas):
    """Diffusers' test_trained_betas: any array-like of betas is taken, saved and loaded back."""
    for name in ("DDIMScheduler", "EulerDiscreteScheduler", "LCMScheduler"):
        ref = getattr(diffusers, name)(trained_betas=np.asarray(betas))
        ours = getattr(rapiddiff, name)(trained_betas=betas)
        assert ours.betas.tolist() == ref.betas.tolist()
        ours.save_pretrained(tmp_path / name)
        assert getattr(rapiddiff, name).from_pretrained(tmp_path / name).betas.tolist() == ours.betas.tolist()
        with pytest.raises(ValueError, match="trained_betas has 2 values"):
            ours.set_timesteps(2)  # Diffusers fails here too (an IndexError): 2 betas for 1000 training steps


def test_trained_betas_of_full_length_match_diffusers():
    betas = np.linspace(1e-4, 2e-2, 1000)
    scheds = [library.DDIMScheduler(trained_betas=betas) for library in LIBRARIES]
    for sched in scheds:
        sched.set_timesteps(4)
    sample = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ref, ours = (s.step(sample * 0.3, s.timesteps[0], sample).prev_sample for s in scheds)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


# --- pipeline and model helpers --------------------------------------------------------------------------------------
def test_numpy_to_pil_is_diffusers():
    images = np.random.RandomState(0).rand(2, 8, 8, 3).astype(np.float32)
    for batch in (images, images[0], images[..., :1]):
        ref = diffusers.DiffusionPipeline.numpy_to_pil(batch)
        ours = rapiddiff.DiffusionPipeline.numpy_to_pil(batch)
        assert [(i.mode, i.size, i.tobytes()) for i in ours] == [(i.mode, i.size, i.tobytes()) for i in ref]


def test_dtype_and_device_of_a_model_without_parameters():
    from rapiddiff.models.modeling_utils import ModelMixin

    holder = ModelMixin()  # holds no tensors: float32 on the CPU instead of a StopIteration
    assert holder.dtype == torch.float32 and holder.device == torch.device("cpu")
    holder.register_buffer("steps", torch.arange(3))
    assert holder.dtype == torch.int64
    holder.register_buffer("scale", torch.ones(1, dtype=torch.float16))
    assert holder.dtype == torch.float16  # a floating-point buffer first, as Diffusers looks


def test_save_pretrained_bin_with_transformers_text_encoder(tiny_sd_dir, tmp_path):
    """Diffusers passes safe_serialization only to save methods that take it: transformers >= 5 writes safetensors
    for the text encoder, the Diffusers-format models write .bin. Same files as Diffusers writes."""
    folders = {}
    for library in LIBRARIES:
        pipe = library.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
        folders[library] = tmp_path / library.__name__
        pipe.save_pretrained(folders[library], safe_serialization=False)
    listing = {
        library: sorted(p.relative_to(f).as_posix() for p in f.rglob("*") if "weight" in p.name or ".bin" in p.name)
        for library, f in folders.items()
    }
    assert listing[rapiddiff] == listing[diffusers] and "unet/diffusion_pytorch_model.bin" in listing[rapiddiff]
    again = rapiddiff.StableDiffusionPipeline.from_pretrained(folders[rapiddiff])
    assert again.unet.dtype == torch.float32


@pytest.mark.parametrize("device_map", ["cpu", "auto", "balanced", torch.device("cpu"), {"": "cpu"}])
def test_model_device_map_on_one_device(tiny_sd_dir, device_map):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU placement")
    vae = rapiddiff.AutoencoderKL.from_pretrained(tiny_sd_dir / "vae", device_map=device_map)
    assert vae.device == torch.device("cpu") and not vae.training


@pytest.mark.parametrize("device_map", [{"encoder": "cpu", "decoder": "cuda:0"}, "nowhere", -1, 1.5])
def test_model_device_map_that_splits_is_refused(tiny_sd_dir, device_map):
    with pytest.raises(ValueError, match="device_map=.*one device"):
        rapiddiff.AutoencoderKL.from_pretrained(tiny_sd_dir / "vae", device_map=device_map)


def test_pipeline_device_map(tiny_sd_dir):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU placement")
    for device_map in ("balanced", "cpu"):
        pipe = rapiddiff.DiffusionPipeline.from_pretrained(tiny_sd_dir, device_map=device_map)
        assert pipe.unet.device == pipe.vae.device == torch.device("cpu")
    with pytest.raises(ValueError, match="must be a string"):
        rapiddiff.DiffusionPipeline.from_pretrained(tiny_sd_dir, device_map={"": "cpu"})
    with pytest.raises(ValueError, match="'balanced'"):
        rapiddiff.DiffusionPipeline.from_pretrained(tiny_sd_dir, device_map="auto")  # Diffusers refuses it too


# --- schedulers used outside a pipeline ------------------------------------------------------------------------------
SAMPLE = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def step_both(name: str, timesteps, num_inference_steps: int | None = None, config=None, **step_kwargs):
    """Fresh (diffusers, rapiddiff) schedulers `name`, set to `num_inference_steps` (None: as built), stepped at each
    of `timesteps` in turn (after a scale_model_input at the first): the results, per library."""
    results = []
    for library in LIBRARIES:
        sched = getattr(library, name)(**(config or {}))
        if num_inference_steps is not None:
            sched.set_timesteps(num_inference_steps)
        x = sched.scale_model_input(SAMPLE, timesteps[0])
        outs = [x]
        for t in timesteps:
            kwargs = dict(step_kwargs)
            if "generator" in kwargs:
                kwargs["generator"] = torch.Generator().manual_seed(0)
            x = sched.step(0.1 * x, t, x, **kwargs).prev_sample
            outs.append(x)
        results.append(outs)
    return results


def assert_same_steps(results) -> None:
    for ref, ours in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "name,config",
    [
        ("LMSDiscreteScheduler", {}),
        ("HeunDiscreteScheduler", {}),
        ("KDPM2DiscreteScheduler", {}),
        ("KDPM2AncestralDiscreteScheduler", {}),
        ("DPMSolverSDEScheduler", dict(noise_sampler_seed=0)),
    ],
)
def test_step_before_set_timesteps_runs_every_training_timestep(name, config):
    """Their Diffusers __init__ schedules all training timesteps: steps work before set_timesteps, ints included."""
    pytest.importorskip("torchsde") if name == "DPMSolverSDEScheduler" else None
    kwargs = dict(generator=None) if name == "KDPM2AncestralDiscreteScheduler" else {}
    assert_same_steps(step_both(name, [10, 9, 9], config=config, **kwargs))
    assert_same_steps(step_both(name, [999.0], config=config, **kwargs))
    assert_same_steps(step_both(name, [0], num_inference_steps=10, config=config, **kwargs))  # int 0 = 0.0


@pytest.mark.parametrize("name", ["DDIMScheduler", "PNDMScheduler"])
@pytest.mark.parametrize("timesteps", [[1], [10], [49, 10], [980, 1]])
def test_step_at_a_timestep_outside_the_schedule(name, timesteps):
    """DDIM and PNDM compute a step from the timestep's value (Diffusers' test_time_indices steps at 1, 10, 49)."""
    assert_same_steps(step_both(name, timesteps, num_inference_steps=50))
    if name == "DDIMScheduler":
        assert_same_steps(step_both(name, timesteps, num_inference_steps=50, eta=1.0, generator=True))
        # A tensor timestep is read at a loop's first step only (later ones follow the schedule: no host reads).
        assert_same_steps(step_both(name, [torch.tensor(timesteps[0])], num_inference_steps=50))
    else:
        assert_same_steps(step_both(name, timesteps, num_inference_steps=50, config=dict(skip_prk_steps=True)))


@pytest.mark.parametrize(
    "name",
    [
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
    ],
)
def test_solvers_step_an_unknown_first_timestep_as_the_last(name):
    assert_same_steps(step_both(name, [1], num_inference_steps=10))
    assert_same_steps(step_both(name, [0], num_inference_steps=10))


def test_what_diffusers_refuses_stays_refused():
    ddim = rapiddiff.DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim.step(SAMPLE, 10, SAMPLE)
    euler = rapiddiff.EulerDiscreteScheduler()
    euler.set_timesteps(10)
    with pytest.raises(ValueError, match="integer"):
        euler.step(SAMPLE, 0, SAMPLE)  # an index from enumerate(), most likely: Diffusers refuses it too


# --- LCM-distilled UNets and the class-embedding variants ------------------------------------------------------------
def tiny_unet_kwargs(**extra) -> dict:
    return (
        dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            norm_num_groups=16,
        )
        | extra
    )


def unet_pair(save_diffusers, **extra):
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**tiny_unet_kwargs(**extra)).eval()
    return ref, rapiddiff.UNet2DConditionModel.from_pretrained(save_diffusers(ref, "unet"))


def test_guidance_scale_embedding_matches_diffusers():
    w = torch.tensor([0.0, 5.0, 7.5])
    ref = diffusers.StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=33)
    torch.testing.assert_close(rapiddiff.StableDiffusionPipeline.get_guidance_scale_embedding(None, w, 33), ref)


def test_unet_with_time_cond_proj_dim(save_diffusers):
    ref, ours = unet_pair(save_diffusers, time_cond_proj_dim=16)
    assert "time_embedding.cond_proj.weight" in ours.state_dict()
    gen = torch.Generator().manual_seed(0)
    x, text, cond = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 32, generator=gen), torch.randn(2, 16)
    with torch.no_grad():
        expected = ref(x, 10, text, timestep_cond=cond).sample
        assert_close_rel(ours(x, 10, text, timestep_cond=cond).sample, expected)
        assert_close_rel(ours(x, 10, text).sample, ref(x, 10, text).sample)  # the condition is optional
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        ours(x, 10, text, timestep_cond=torch.randn(2, 8))


@pytest.mark.parametrize(
    "extra,labels",
    [
        (dict(class_embed_type="timestep"), torch.tensor([3, 500])),
        (dict(class_embed_type="projection", projection_class_embeddings_input_dim=6), torch.randn(2, 6)),
        (dict(class_embed_type="simple_projection", projection_class_embeddings_input_dim=6), torch.randn(2, 6)),
        (dict(class_embed_type="identity"), torch.randn(2, 128)),
    ],
    ids=lambda v: v.get("class_embed_type") if isinstance(v, dict) else "",
)
def test_unet_class_embedding_variants(save_diffusers, extra, labels):
    ref, ours = unet_pair(save_diffusers, **extra)
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad():
        assert_close_rel(ours(x, 10, text, class_labels=labels).sample, ref(x, 10, text, class_labels=labels).sample)
    with pytest.raises(ValueError, match="class_labels is required"):
        ours(x, 10, text)


def test_projection_class_embedding_needs_its_input_dim():
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        rapiddiff.UNet2DConditionModel(**tiny_unet_kwargs(class_embed_type="projection"))


@pytest.fixture(scope="module")
def lcm_sd_dir(tmp_path_factory):
    """The tiny SD checkpoint with an LCM-distilled UNet (time_cond_proj_dim=256), saved by diffusers."""
    components = tiny_sd_components()
    torch.manual_seed(0)
    components["unet"] = diffusers.UNet2DConditionModel(**tiny_unet_kwargs(time_cond_proj_dim=256)).eval()
    pipe = diffusers.StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    path = tmp_path_factory.mktemp("tiny-lcm") / "checkpoint"
    pipe.save_pretrained(path)
    return path


@pytest.mark.parametrize("pipeline", ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"])
def test_lcm_pipeline_matches_diffusers(lcm_sd_dir, pipeline):
    """Diffusers' test_stable_diffusion_lcm: LCMScheduler from the DDIM test config, guidance embedded, no CFG."""
    pipes = []
    for library in LIBRARIES:
        pipe = getattr(library, pipeline).from_pretrained(lcm_sd_dir)
        pipe.scheduler = library.LCMScheduler.from_config(library.DDIMScheduler(**DDIM_TEST_CONFIG).config)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    kwargs = dict(guidance_scale=6.0)
    if pipeline == "StableDiffusionImg2ImgPipeline":
        kwargs |= dict(image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), strength=0.8)
    assert_same_images(*run_both(pipes, **kwargs))
    assert_same_images(*run_both(pipes, num_inference_steps=None, timesteps=[999, 499], **kwargs))
    assert_same_images(*run_both(pipes, num_images_per_prompt=2, **kwargs))


def test_euler_log_linear_with_custom_timesteps():
    """Diffusers builds len(timesteps) + 1 log-linear sigmas (one more than the steps, plus the final 0)."""
    scheds = [library.EulerDiscreteScheduler(interpolation_type="log_linear") for library in LIBRARIES]
    for sched in scheds:
        sched.set_timesteps(timesteps=[999, 500, 100])
    torch.testing.assert_close(scheds[1].sigmas, scheds[0].sigmas)
    torch.testing.assert_close(scheds[1].timesteps, scheds[0].timesteps)
    x = [s.step(0.1 * SAMPLE, s.timesteps[0], SAMPLE).prev_sample for s in scheds]
    torch.testing.assert_close(x[1], x[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "LCMScheduler"])
def test_register_to_config_and_config_attributes(name, tmp_path):
    """Diffusers' test_getattr_is_correct: register_to_config, and config keys read as scheduler attributes (with
    Diffusers' FutureWarning); other names are a plain AttributeError."""
    sched = getattr(rapiddiff, name)()
    sched.dummy_attribute = 5
    sched.register_to_config(test_attribute=5, beta_start=0.002)
    assert sched.dummy_attribute == 5 and sched.config.test_attribute == 5 and sched.config["test_attribute"] == 5
    assert sched.config.beta_start == 0.002 and "beta_start" not in sched.config["_use_default_values"]
    with pytest.warns(FutureWarning, match="scheduler.config.test_attribute"):
        assert sched.test_attribute == 5
    with pytest.warns(FutureWarning):
        assert sched.num_train_timesteps == 1000
    with pytest.raises(AttributeError, match=f"^'{name}' object has no attribute 'does_not_exist'$"):
        _ = sched.does_not_exist
    with pytest.raises(ValueError, match="beta_schedule"):
        sched.register_to_config(beta_schedule="nope")


@pytest.mark.parametrize("name", ["UNet2DConditionModel", "AutoencoderKL"])
def test_model_register_to_config_and_config_attributes(name, tmp_path):
    """Diffusers' test_getattr_is_correct for models: register_to_config, config keys read as model attributes with
    Diffusers' FutureWarning, attributes, methods and submodules without one; an added key is saved, and a config
    file with a key rapiddiff's config does not have is refused on load (strict configs)."""
    import warnings

    blocks = {
        "UNet2DConditionModel": dict(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=8,
            attention_head_dim=2,
        ),
        "AutoencoderKL": dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    }[name]
    model = getattr(rapiddiff, name)(**blocks, block_out_channels=(4, 8), norm_num_groups=4, layers_per_block=1)
    model.dummy_attribute = 5
    model.register_to_config(test_attribute=5, sample_size=24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.dummy_attribute == 5 and hasattr(model, "dummy_attribute")
        assert hasattr(model, "save_pretrained") and callable(model.save_pretrained)
        child, module = next(iter(model.named_children()))
        assert getattr(model, child) is module
    assert model.config.test_attribute == 5 and model.config["test_attribute"] == 5 and model.config.sample_size == 24
    with pytest.warns(FutureWarning, match="unet.config.test_attribute"):
        assert model.test_attribute == 5
    with pytest.warns(FutureWarning):
        assert model.in_channels == model.config.in_channels
    with pytest.raises(AttributeError) as error:
        _ = model.does_not_exist
    assert str(error.value) == f"'{name}' object has no attribute 'does_not_exist'"
    with pytest.raises(ValueError, match="norm_num_groups"):
        model.register_to_config(norm_num_groups="many")
    model.save_config(tmp_path)
    saved = type(model).load_config(tmp_path)
    assert saved["test_attribute"] == 5 and saved["sample_size"] == 24
    with pytest.raises(ValueError, match="test_attribute"):
        type(model).from_config(saved)


def test_missing_variant_error_starts_as_diffusers(tiny_sd_dir):
    """Diffusers' pipeline tests (and users) match the first sentence of the missing-variant error."""
    with pytest.raises(ValueError, match=r"You are trying to load the model files of the `variant=fp16`"):
        rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir, variant="fp16")


def test_model_loading_and_processor_errors_say_what_diffusers_says(tmp_path):
    """The first words Diffusers' model tests match: a missing weight file, a processor dict of the wrong size."""
    ref = tiny_sd_components()["unet"]
    ref.save_pretrained(tmp_path, variant="fp16")
    with pytest.raises(OSError, match="Error no file named diffusion_pytorch_model.bin found in directory"):
        rapiddiff.UNet2DConditionModel.from_pretrained(tmp_path)
    unet = rapiddiff.UNet2DConditionModel.from_pretrained(tmp_path, variant="fp16")
    first = next(iter(unet.attn_processors))
    with pytest.raises(ValueError, match=r"the number of processors \(1\) does not match"):
        unet.set_attn_processor({first: rapiddiff.AttnProcessor()})


@pytest.mark.parametrize("skip_prk_steps", [False, True])
def test_pndm_step_prk_and_step_plms_as_diffusers(skip_prk_steps):
    """Diffusers' public PNDM methods, as custom loops call them: step_prk over prk_timesteps, step_plms over
    plms_timesteps (with the Runge-Kutta warm-up or without)."""
    config = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", skip_prk_steps=skip_prk_steps)
    ref, ours = diffusers.PNDMScheduler(**config), rapiddiff.PNDMScheduler(**config)
    samples = []
    for scheduler in (ref, ours):
        scheduler.set_timesteps(10)
        sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        for t in scheduler.prk_timesteps:
            sample = scheduler.step_prk(0.1 * sample + 0.01 * int(t), int(t), sample).prev_sample
        for t in scheduler.plms_timesteps:
            sample = scheduler.step_plms(0.1 * sample + 0.01 * int(t), int(t), sample).prev_sample
        samples.append(sample)
    assert_close_rel(samples[1], samples[0], 1e-5, "PNDM step_prk / step_plms loop")


@pytest.mark.parametrize("name", ["DDPMScheduler", "LCMScheduler", "TCDScheduler"])
def test_previous_timestep_as_diffusers(name):
    ref, ours = getattr(diffusers, name)(), getattr(rapiddiff, name)()
    assert int(ours.previous_timestep(500)) == int(ref.previous_timestep(500)) == 499  # before set_timesteps
    for scheduler in (ref, ours):
        scheduler.set_timesteps(4)
    for t in ref.timesteps.tolist():
        assert int(ours.previous_timestep(t)) == int(ref.previous_timestep(t))


def test_scheduler_signatures_name_their_config_keys():
    """Constructors show their config keys as Diffusers' do (inspect.signature, IDEs); no **kwargs to hide them."""
    import inspect

    for name in ("DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "KDPM2AncestralDiscreteScheduler"):
        params = inspect.signature(getattr(rapiddiff, name).__init__).parameters
        theirs = inspect.signature(getattr(diffusers, name).__init__).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
        assert set(params) - {"self", "config"} <= set(theirs), name
        assert params["num_train_timesteps"].default == theirs["num_train_timesteps"].default
        assert getattr(rapiddiff, name)._deprecated_kwargs == []


@pytest.mark.parametrize("name", ["UNet2DConditionModel", "ControlNetModel", "AutoencoderKL"])
def test_model_signatures_name_their_config_keys(name):
    """Model constructors show their config keys as Diffusers' do: Diffusers' test_forward_with_norm_groups runs only
    for a class whose signature has `norm_num_groups`, then builds it with 16 groups and runs it."""
    import inspect

    cls = getattr(rapiddiff, name)
    params = inspect.signature(cls.__init__).parameters
    theirs = inspect.signature(getattr(diffusers, name).__init__).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert set(params) - {"self", "config"} <= set(theirs), name
    for key in ("norm_num_groups", "block_out_channels", "in_channels"):
        assert params[key].default == theirs[key].default, key
    blocks = {
        "UNet2DConditionModel": dict(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")
        ),
        "ControlNetModel": dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")),
        "AutoencoderKL": dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    }[name]
    model = cls(**blocks, norm_num_groups=16, block_out_channels=(16, 32), layers_per_block=1).eval()
    assert model.config.norm_num_groups == 16 and cls.from_config(model.config).config == model.config
    sample = torch.randn(1, 4 if name != "AutoencoderKL" else 3, 16, 16)
    with torch.no_grad():
        if name == "AutoencoderKL":
            out = model(sample).sample
        else:
            cond = {"controlnet_cond": torch.randn(1, 3, 128, 128)} if name == "ControlNetModel" else {}
            out = model(sample, 10, torch.randn(1, 4, model.config.cross_attention_dim), **cond)
            out = out.mid_block_res_sample if name == "ControlNetModel" else out.sample
    assert out.shape[0] == 1 and torch.isfinite(out).all()
    if name != "ControlNetModel":
        assert out.shape == sample.shape
    with pytest.raises(ValueError, match="not_a_key"):
        cls(not_a_key=1)


@pytest.mark.parametrize("name", ["UNet2DConditionModel", "ControlNetModel", "AutoencoderKL"])
def test_same_seed_same_random_weights_as_diffusers(name):
    """Models are built in Diffusers' order: torch.manual_seed(s) then Model(**config) gives Diffusers' weights (user
    test suites hard-code output slices of such tiny models)."""
    configs = {
        "UNet2DConditionModel": dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32,
                                     time_cond_proj_dim=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32),
        "ControlNetModel": dict(block_out_channels=(8, 16), layers_per_block=2, cross_attention_dim=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), norm_num_groups=4,
                                conditioning_embedding_out_channels=(16, 32)),
        "AutoencoderKL": dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4),
    }  # fmt: skip
    states = []
    for library in (diffusers, rapiddiff):
        torch.manual_seed(0)
        states.append(getattr(library, name)(**configs[name]).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
