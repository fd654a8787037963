"""ControlNetModel / MultiControlNetModel and StableDiffusionControlNetPipeline against diffusers' on tiny checkpoints.

The ControlNets' zero-initialised output layers are randomised, else they would add nothing and prove nothing.
"""

from __future__ import annotations

import json

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import assert_close_rel, assert_same_images, random_image, run_both, seeded, use_scheduler

import rapiddiff
from rapiddiff import ControlNetModel, DiffusionPipeline, MultiControlNetModel, StableDiffusionControlNetPipeline, cli
from rapiddiff.configuration import ConfigError
from rapiddiff.presets import PRESETS_DIR

CONFIGS = PRESETS_DIR
# Fits the tiny SD UNet of conftest; one stride-2 conv in the conditioning embedding = the tiny VAE's factor 2.
TINY = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    norm_num_groups=16,
    conditioning_embedding_out_channels=(16, 32),
)
CONTROL = [random_image(32, 48, seed=10), random_image(32, 48, seed=11)]


def randomise_output_layers(net, seed: int):
    """Give the zero-initialised layers random values (else a ControlNet adds zeros)."""
    generator = torch.Generator().manual_seed(seed)
    layers = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for p in (p for layer in layers for p in layer.parameters()):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return net.eval()


def tiny_controlnet(seed: int, **kwargs):
    torch.manual_seed(seed)
    return randomise_output_layers(diffusers.ControlNetModel(**(TINY | kwargs)), seed)


@pytest.fixture(scope="module")
def controlnet_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-controlnets")
    for seed in (1, 2):
        tiny_controlnet(seed).save_pretrained(root / f"cn{seed}")
    return [root / "cn1", root / "cn2"]


def model_inputs(batch=2, h=16, w=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, h, w, generator=generator),
        timestep=torch.tensor(421),
        encoder_hidden_states=torch.randn(batch, 7, 32, generator=generator),
        controlnet_cond=torch.rand(batch, 3, 2 * h, 2 * w, generator=generator),
    )


def assert_same_residuals(actual, expected):
    (down, mid), (ref_down, ref_mid) = actual, expected
    assert len(down) == len(ref_down) == 4  # conv_in + 1 resnet + downsampler + 1 resnet
    for i, (a, e) in enumerate(zip(down, ref_down)):
        assert_close_rel(a, e, what=f"down residual {i}")
    assert_close_rel(mid, ref_mid, what="mid residual")


# --- ControlNetModel -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, call",
    [
        ({}, dict(conditioning_scale=0.7)),
        ({}, dict(conditioning_scale=0.5, guess_mode=True)),
        ({"controlnet_conditioning_channel_order": "bgr", "transformer_layers_per_block": 2}, {}),
        ({"global_pool_conditions": True, "use_linear_projection": True}, dict(conditioning_scale=1.3)),
    ],
)
def test_controlnet_model_matches_diffusers(save_diffusers, config, call):
    ref = tiny_controlnet(3, **config)
    ours = ControlNetModel.from_pretrained(save_diffusers(ref))
    assert list(ours.state_dict()) == list(ref.state_dict()) or set(ours.state_dict()) == set(ref.state_dict())
    inputs = model_inputs()
    with torch.no_grad():
        expected = ref(**inputs, **call, return_dict=False)
        actual = ours(**inputs, **call, return_dict=False)
        # the scale as a 0-d tensor (what the pipeline passes) gives the same residuals
        tensor_scale = {**call, "conditioning_scale": torch.tensor(call.get("conditioning_scale", 1.0))}
        as_tensor = ours(**inputs, **tensor_scale)  # a ControlNetOutput

    assert_same_residuals(actual, expected)
    assert_same_residuals((as_tensor.down_block_res_samples, as_tensor[1]), expected)


def test_odd_size(save_diffusers):
    ref = tiny_controlnet(4)
    ours = ControlNetModel.from_pretrained(save_diffusers(ref))
    inputs = model_inputs(batch=1, h=10, w=14, seed=1)  # the downsampler halves 5x7 maps after the first level
    with torch.no_grad():
        assert_same_residuals(ours(**inputs, return_dict=False), ref(**inputs, return_dict=False))


def test_from_unet_copies_the_encoder_half(tiny_sd_dir):
    ref_unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    unet = rapiddiff.UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    ref = diffusers.ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=(16, 32))
    ours = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    assert {k: ours.config[k] for k in ours.config if k != "_class_name"} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in ref.config.items() if not k.startswith("_")
    }
    state, ref_state, unet_state = ours.state_dict(), ref.state_dict(), unet.state_dict()
    assert set(state) == set(ref_state)
    copied = [k for k in state if k.split(".")[0] in ("conv_in", "time_embedding", "down_blocks", "mid_block")]
    assert len(copied) > 50 and all(torch.equal(state[k], unet_state[k]) for k in copied)
    zero = [k for k in state if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert zero and all(not state[k].any() for k in zero)
    # with the remaining (random) weights made equal, it computes what diffusers' does
    randomise_output_layers(ref, 5)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert_same_residuals(ours(**model_inputs(), return_dict=False), ref(**model_inputs(), return_dict=False))
    fresh = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32), load_weights_from_unet=False)
    assert not torch.equal(fresh.conv_in.weight, unet.conv_in.weight)


def test_multi_controlnet_sums_residuals(controlnet_dirs, tmp_path):
    ref = diffusers.MultiControlNetModel([diffusers.ControlNetModel.from_pretrained(d) for d in controlnet_dirs])
    ours = MultiControlNetModel([ControlNetModel.from_pretrained(d) for d in controlnet_dirs])
    inputs = model_inputs()
    conds = [inputs.pop("controlnet_cond"), torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(9))]
    with torch.no_grad():
        expected = ref(**inputs, controlnet_cond=conds, conditioning_scale=[0.4, 1.2], return_dict=False)
        actual = ours(**inputs, controlnet_cond=conds, conditioning_scale=[0.4, 1.2], return_dict=False)
    assert_same_residuals(actual, expected)
    # Diffusers' layout: net i in <folder>_i, both ways
    ours.save_pretrained(tmp_path / "controlnet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["controlnet", "controlnet_1"]
    again = MultiControlNetModel.from_pretrained(tmp_path / "controlnet")
    theirs = diffusers.MultiControlNetModel.from_pretrained(str(tmp_path / "controlnet"))
    assert len(again.nets) == len(theirs.nets) == 2
    assert torch.equal(again.nets[1].controlnet_mid_block.weight, ours.nets[1].controlnet_mid_block.weight)


@pytest.mark.compile
def test_compiles_fullgraph_without_recompiling_for_a_new_scale(controlnet_dirs):
    net = ControlNetModel.from_pretrained(controlnet_dirs[0])
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    inputs = model_inputs()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        first = compiled(**inputs, conditioning_scale=torch.tensor(0.5), return_dict=False)
        second = compiled(**inputs, conditioning_scale=torch.tensor(1.0), return_dict=False)
    assert_close_rel(second[1], 2 * first[1])


def test_real_config_builds_on_meta():
    config = json.loads((CONFIGS / "sd-controlnet-canny" / "config.json").read_text())
    with torch.device("meta"):
        net = ControlNetModel.from_config(config)
    assert net.num_parameters() == 361_279_120
    assert len(net.controlnet_down_blocks) == 12


@pytest.mark.parametrize(
    "key, value",
    [
        ("down_block_types", ("SimpleCrossAttnDownBlock2D", "DownBlock2D")),
        ("mid_block_type", None),
        ("class_embed_type", "timestep"),
        ("controlnet_conditioning_channel_order", "rbg"),
        ("layers_per_block", (1, 2)),
    ],
)
def test_unsupported_config(key, value):
    with pytest.raises(ConfigError, match=key):
        ControlNetModel(**(TINY | {key: value}))


def test_control_image_of_the_wrong_size(controlnet_dirs):
    net = ControlNetModel.from_pretrained(controlnet_dirs[0])
    inputs = model_inputs() | {"controlnet_cond": torch.rand(2, 3, 16, 24)}
    with pytest.raises(
        ValueError, match=r"controlnet_cond must be a \(batch, 3, 32, 48\) tensor.*got \(2, 3, 16, 24\)"
    ):
        net(**inputs)


# --- the pipeline ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(tiny_sd_dir, controlnet_dirs):
    """{"single": (diffusers, rapiddiff), "multi": (diffusers, rapiddiff)} ControlNet pipelines on the tiny SD."""
    ref_nets = [diffusers.ControlNetModel.from_pretrained(d) for d in controlnet_dirs]
    nets = [ControlNetModel.from_pretrained(d) for d in controlnet_dirs]
    out = {}
    for kind, ref_net, net in (("single", ref_nets[0], nets[0]), ("multi", ref_nets, nets)):
        pipes = (
            diffusers.StableDiffusionControlNetPipeline.from_pretrained(tiny_sd_dir, controlnet=ref_net),
            StableDiffusionControlNetPipeline.from_pretrained(tiny_sd_dir, controlnet=net),
        )
        for p in pipes:
            p.set_progress_bar_config(disable=True)
        out[kind] = pipes
    return out


@pytest.fixture
def single(loaded, tiny_sd_dir):
    use_scheduler(loaded["single"], "PNDMScheduler", tiny_sd_dir)
    return loaded["single"]


@pytest.fixture
def multi(loaded, tiny_sd_dir):
    use_scheduler(loaded["multi"], "PNDMScheduler", tiny_sd_dir)
    return loaded["multi"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(guess_mode=True, guidance_scale=4.0),
        dict(control_guidance_start=0.25, control_guidance_end=0.75, num_inference_steps=4),
        dict(controlnet_conditioning_scale=0.5, guidance_scale=1.0),
    ],
    ids=["default", "guess_mode", "guidance_window", "scale_no_cfg"],
)
def test_one_controlnet_matches_diffusers(single, kwargs):
    ref, ours = run_both(single, image=CONTROL[0], **kwargs)
    assert ours.images.shape == (1, 32, 48, 3)  # the control image's size
    assert_same_images(ref, ours)


def test_the_controlnet_changes_the_image(single):
    with_control = run_both(single[1:], image=CONTROL[0])[0].images
    without = run_both(single[1:], image=CONTROL[0], controlnet_conditioning_scale=0.0)[0].images
    assert np.abs(with_control - without).max() > 0.05


def test_prompt_batch_with_control_batch_and_euler(single, tiny_sd_dir):
    use_scheduler(single, "EulerAncestralDiscreteScheduler", tiny_sd_dir)
    control = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    ref, ours = run_both(single, prompt=["a", "b"], image=control, num_images_per_prompt=2, height=32, width=48)
    assert ours.images.shape == (4, 32, 48, 3)
    assert_same_images(ref, ours)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(controlnet_conditioning_scale=[0.6, 1.4]),
        dict(
            guess_mode=True, control_guidance_start=[0.0, 0.5], control_guidance_end=[0.5, 1.0], num_inference_steps=4
        ),
    ],
    ids=["scales", "guess_mode_windows"],
)
def test_two_controlnets_match_diffusers(multi, kwargs):
    assert_same_images(*run_both(multi, image=CONTROL, **kwargs))


def test_two_controlnets_nested_per_prompt_images(multi):
    image = [[CONTROL[0], CONTROL[1]], [CONTROL[1], CONTROL[0]]]  # one list per prompt, one image per ControlNet
    assert_same_images(*run_both(multi, prompt=["a", "b"], image=image))


def test_controlnets_skipped_outside_their_window(single):
    calls = []
    hook = single[1].controlnet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        ref, ours = run_both(single, image=CONTROL[0], control_guidance_end=0.4, num_inference_steps=4)
    finally:
        hook.remove()
    assert_same_images(ref, ours)
    # PNDM: 5 model calls for 4 steps; the ControlNet only runs while i / 5 <= 0.4 - 1 / 5
    assert len(calls) == 2 and single[1].num_timesteps == 5


def test_loop_never_reads_tensor_values(multi):
    """Per-step scales come from a device table: no host sync inside the denoising loop."""
    compile_module = pytest.importorskip("rapiddiff.compile")
    with compile_module.forbid_host_syncs_in_loop(multi[1]) as pipe:
        pipe("a cube", image=CONTROL, control_guidance_end=[0.5, 1.0], num_inference_steps=3, output_type="latent")


def test_loading_and_saving(multi, tmp_path, tiny_sd_dir, controlnet_dirs):
    ours = multi[1]
    assert isinstance(ours.controlnet, MultiControlNetModel) and len(ours.controlnets) == 2
    ours.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionControlNetPipeline"
    assert index["controlnet"] == ["diffusers", "MultiControlNetModel"]
    again = DiffusionPipeline.from_pretrained(tmp_path / "ours")
    assert type(again) is StableDiffusionControlNetPipeline and len(again.controlnets) == 2
    multi[0].save_pretrained(tmp_path / "theirs")
    theirs = DiffusionPipeline.from_pretrained(tmp_path / "theirs")
    assert isinstance(theirs.controlnet, MultiControlNetModel)
    single = DiffusionPipeline.from_pretrained(
        tiny_sd_dir, controlnet=ControlNetModel.from_pretrained(controlnet_dirs[0])
    )
    assert type(single) is StableDiffusionControlNetPipeline


# --- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, kwargs, error, message",
    [
        ("multi", dict(controlnet_conditioning_scale=[1.0, 1.0, 1.0]), ValueError, "has 3 entries for 2 ControlNet"),
        ("single", dict(controlnet_conditioning_scale=[0.5, 1.0]), ValueError, "has 2 entries for 1 ControlNet"),
        ("single", dict(controlnet_conditioning_scale="high"), TypeError, "controlnet_conditioning_scale must be"),
        ("single", dict(control_guidance_start=0.6, control_guidance_end=0.6), ValueError, "must be smaller than"),
        ("single", dict(control_guidance_start=-0.1), ValueError, "control_guidance_start must be >= 0.0"),
        ("single", dict(control_guidance_end=1.5), ValueError, "control_guidance_end must be <= 1.0"),
        ("multi", dict(control_guidance_start=[0.0, 0.1, 0.2]), ValueError, "control_guidance_start=.* 3 entries"),
        ("single", dict(prompt=["a", "b"], image=[CONTROL[0]] * 3), ValueError, "control image batch 3"),
        ("single", dict(image=None), ValueError, "image is required"),
        ("multi", dict(image=CONTROL[0]), TypeError, "with 2 ControlNets pass a list of 2 control images"),
        ("multi", dict(image=CONTROL[:1]), ValueError, "got 1 control images for 2 ControlNets"),
        ("multi", dict(image=[CONTROL[0], random_image(40, 48)]), ValueError, "control images have different sizes"),
        ("single", dict(height=36, width=48), ValueError, "height must be divisible by 8, got 36"),
    ],
)
def test_bad_input(loaded, kind, kwargs, error, message):
    args = dict(prompt="a cube", image=CONTROL if kind == "multi" else CONTROL[0], num_inference_steps=2) | kwargs
    with pytest.raises(error, match=message):
        loaded[kind][1](**args)


def test_models_that_do_not_fit(single):
    ours = single[1]
    with torch.device("meta"):
        net = ControlNetModel(**(TINY | {"in_channels": 9}))
        unet = rapiddiff.UNet2DConditionModel.from_config({**ours.unet.config, "in_channels": 9})
    pipe = StableDiffusionControlNetPipeline(**{**ours.components, "controlnet": net})
    with pytest.raises(ValueError, match=r"ControlNet 0: config.in_channels=9 does not fit the UNet's in_channels=4"):
        pipe("a cube", image=CONTROL[0])
    pipe = StableDiffusionControlNetPipeline(**{**ours.components, "unet": unet})
    with pytest.raises(ValueError, match="unet.config.in_channels=9 does not fit this pipeline"):
        pipe("a cube", image=CONTROL[0])


def test_cli_controlnets_with_control_images(multi, tiny_sd_dir, controlnet_dirs, tmp_path):
    for i, image in enumerate(CONTROL):
        image.save(tmp_path / f"c{i}.png")
    argv = ["generate", "a cube", "--model", str(tiny_sd_dir), "--steps", "2", "--seed", "7"]
    for d, i in zip(controlnet_dirs, range(2)):
        argv += ["--controlnet", str(d), "--control-image", str(tmp_path / f"c{i}.png")]
    assert cli.main([*argv, "--controlnet", "x"]) == 2  # one control image per ControlNet
    assert cli.main([*argv, "-o", str(tmp_path / "out.png")]) == 0
    expected = multi[1]("a cube", image=CONTROL, num_inference_steps=2, generator=seeded(7)).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "out.png")), np.asarray(expected))
