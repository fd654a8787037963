"""UNet2DConditionModel against diffusers' on tiny random checkpoints: SD 1.x/2.x, inpainting, x4 upscaler, IF I/II."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from conftest import assert_close_rel
from diffusers import UNet2DConditionModel as DUNet
from diffusers.models import attention_processor as dap

from rapiddiff.configuration import ConfigError
from rapiddiff.models import attention_processor as rap
from rapiddiff.models.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput
from rapiddiff.presets import PRESETS_DIR

CONFIGS = PRESETS_DIR

SD1 = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,  # read as 2 heads
    norm_num_groups=8,
)
SD2 = dict(
    SD1,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
    upcast_attention=True,
    transformer_layers_per_block=(1, 2, 1),
    flip_sin_to_cos=False,
    freq_shift=1,
)
INPAINT = dict(SD1, in_channels=9, only_cross_attention=(True, False), center_input_sample=True)
IF_I = dict(
    sample_size=16,
    in_channels=3,
    out_channels=6,  # learned variance
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    attention_head_dim=16,  # read as the width of a head
    cross_attention_dim=32,
    cross_attention_norm="group_norm",
    encoder_hid_dim=48,
    encoder_hid_dim_type="text_proj",
    addition_embed_type="text",
    addition_embed_type_num_heads=4,
    act_fn="gelu",
    resnet_time_scale_shift="scale_shift",
    timestep_post_act="silu",
    norm_num_groups=8,
)
IF_II = dict(
    IF_I,
    in_channels=6,
    layers_per_block=(1, 2),
    attention_head_dim=(8, 16),  # up blocks index this list in down order (Diffusers' quirk)
    class_embed_type="timestep",
    resnet_skip_time_act=True,
    resnet_out_scale_factor=1.4142271248762552,
    mid_block_scale_factor=1.4142271248762552,
    time_embedding_act_fn="gelu",
    time_embedding_dim=96,
    mid_block_only_cross_attention=True,
)
X4 = dict(
    SD2,
    in_channels=7,
    num_class_embeds=10,
    only_cross_attention=(True, True, False),
    upcast_attention=False,
    flip_sin_to_cos=True,
    freq_shift=0,
)

PROCESSORS = {"vanilla": (rap.AttnProcessor, dap.AttnProcessor), "sdpa": (rap.AttnProcessor2_0, dap.AttnProcessor2_0)}
ADDED_KV_PROCESSORS = {
    "vanilla": (rap.AttnAddedKVProcessor, dap.AttnAddedKVProcessor),
    "sdpa": (rap.AttnAddedKVProcessor2_0, dap.AttnAddedKVProcessor2_0),
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These models are tiny: intra-op threads buy nothing, and on a busy 2-core machine their hand-offs dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_pair(config: dict, save_diffusers, seed: int = 0, **load_kwargs) -> tuple[DUNet, UNet2DConditionModel]:
    """A random diffusers UNet and rapiddiff's UNet loaded from its save_pretrained folder."""
    torch.manual_seed(seed)
    ref = DUNet(**config).eval()
    ours = UNet2DConditionModel.from_pretrained(save_diffusers(ref, "unet"), **load_kwargs)
    return ref, ours


def inputs(config: dict, batch: int = 2, size: tuple[int, int] = (16, 24), seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    text_dim = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    kw = dict(
        sample=torch.randn(batch, config.get("in_channels", 4), *size, generator=g),
        timestep=torch.tensor(437),
        encoder_hidden_states=torch.randn(batch, 7, text_dim, generator=g),
    )
    if config.get("class_embed_type") == "timestep":
        kw["class_labels"] = torch.tensor([250, 20][:batch])
    elif config.get("num_class_embeds"):
        kw["class_labels"] = torch.tensor([3, 9][:batch])
    return kw


def run_models(ref: DUNet, ours: UNet2DConditionModel, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return ours(**kw).sample, ref(**kw).sample


def set_processor(ref: DUNet, ours: UNet2DConditionModel, kind: str, table: dict = PROCESSORS) -> None:
    ours_cls, ref_cls = table[kind]
    ours.set_attn_processor(ours_cls())
    ref.set_attn_processor(ref_cls())


def skip_shapes(model: UNet2DConditionModel, batch: int, h: int, w: int) -> list[tuple[int, ...]]:
    """Shapes of the skips a ControlNet adds to: conv_in output, then each down block's resnets and downsampler."""
    ch = model.config.block_out_channels
    shapes = [(batch, ch[0], h, w)]
    for c, block in zip(ch, model.down_blocks):
        shapes += [(batch, c, h, w)] * len(block.resnets)
        if block.downsamplers is not None:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((batch, c, h, w))
    return shapes


# --- Stable Diffusion 1.x / 2.x / inpainting ------------------------------------------------------------------------
@pytest.mark.parametrize("processor", list(PROCESSORS))
@pytest.mark.parametrize(
    "config, size",
    [
        (SD1, (16, 24)),
        (SD1, (15, 21)),  # odd: the upsampler is given the skip size
        (SD2, (16, 24)),
        (SD2, (18, 26)),  # not a multiple of 4
        (INPAINT, (16, 24)),
    ],
    ids=["sd1-16x24", "sd1-15x21", "sd2-16x24", "sd2-18x26", "inpaint-16x24"],
)
def test_sd_unet_matches_diffusers(config, size, processor, save_diffusers):
    ref, ours = make_pair(config, save_diffusers)
    set_processor(ref, ours, processor)
    out, expected = run_models(ref, ours, **inputs(config, size=size))
    assert out.shape == (2, 4, *size)
    assert_close_rel(out, expected)


@pytest.mark.parametrize(
    "timestep",
    [7, 7.5, torch.tensor(7), torch.tensor([7]), torch.tensor([7, 900]), torch.tensor([7.25, 900.0])],
    ids=["int", "float", "0d", "1d-1", "1d-batch", "1d-float"],
)
def test_timestep_forms(timestep, save_diffusers):
    ref, ours = make_pair(SD1, save_diffusers)
    kw = inputs(SD1) | dict(timestep=timestep)
    assert_close_rel(*run_models(ref, ours, **kw))


def test_timestep_forms_agree_and_bad_ones_are_rejected(save_diffusers):
    _, ours = make_pair(SD1, save_diffusers)
    kw = inputs(SD1)
    with torch.no_grad():
        outs = [ours(**kw | dict(timestep=t)).sample for t in (42, torch.tensor(42), torch.tensor([42, 42]))]
        other = ours(**kw | dict(timestep=torch.tensor([42, 43]))).sample
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])
    assert not torch.allclose(outs[0][1], other[1])  # the second item got its own timestep
    with pytest.raises(ValueError, match="timestep"):
        ours(**kw | dict(timestep=torch.tensor([1, 2, 3])))
    with pytest.raises(TypeError, match="timestep"):
        ours(**kw | dict(timestep="7"))


def test_controlnet_residuals_and_text_mask(save_diffusers):
    ref, ours = make_pair(SD2, save_diffusers)
    size = (18, 26)
    kw = inputs(SD2, size=size)
    g = torch.Generator().manual_seed(5)
    shapes = skip_shapes(ours, 2, *size)
    down = tuple(torch.randn(s, generator=g) for s in shapes)
    mid = torch.randn(shapes[-1], generator=g)
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0
    kw |= dict(down_block_additional_residuals=down, mid_block_additional_residual=mid, encoder_attention_mask=mask)
    out, expected = run_models(ref, ours, **kw)
    assert_close_rel(out, expected)
    plain, _ = run_models(ref, ours, **inputs(SD2, size=size))
    assert (out - plain).abs().max() > 1e-2  # the residuals and the mask did something
    with pytest.raises(ValueError, match="go together"):
        ours(**inputs(SD2, size=size), down_block_additional_residuals=down)
    with pytest.raises(ValueError, match=f"{len(shapes)} skips"):
        ours(**inputs(SD2, size=size), down_block_additional_residuals=down[:-1], mid_block_additional_residual=mid)


def test_return_dict_false_and_input_errors(save_diffusers):
    _, ours = make_pair(SD1, save_diffusers)
    kw = inputs(SD1)
    with torch.no_grad():
        out = ours(**kw)
        (tup,) = ours(**kw, return_dict=False)
    assert isinstance(out, UNet2DConditionOutput)
    torch.testing.assert_close(out[0], tup)
    with pytest.raises(ValueError, match=r"\(batch, 4, height, width\)"):
        ours(**kw | dict(sample=torch.randn(2, 3, 16, 16)))
    with pytest.raises(ValueError, match="no class embedding"):
        ours(**kw, class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="timestep_cond"):
        ours(**kw, timestep_cond=torch.randn(2, 8))


# --- attention processors ------------------------------------------------------------------------------------------
def test_attn_processor_api(save_diffusers):
    ref, ours = make_pair(SD2, save_diffusers)
    procs = ours.attn_processors
    assert list(procs) == list(ref.attn_processors)  # same layer names, same order
    assert all(isinstance(p, rap.AttnProcessor2_0) for p in procs.values())
    ours.set_default_attn_processor()
    assert all(type(p) is rap.AttnProcessor for p in ours.attn_processors.values())
    per_layer = {k: rap.AttnProcessor2_0() if i % 2 else rap.AttnProcessor() for i, k in enumerate(procs)}
    ours.set_attn_processor(per_layer)
    assert [type(p) for p in ours.attn_processors.values()] == [type(p) for p in per_layer.values()]
    with pytest.raises(ValueError, match="attention layers"):
        ours.set_attn_processor(dict(list(per_layer.items())[:-1]))


# --- loading and saving --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("save_kwargs", [dict(variant="fp16"), dict(safe_serialization=False)], ids=["variant", "bin"])
def test_load_variant_and_bin(save_kwargs, save_diffusers):
    torch.manual_seed(0)
    ref = DUNet(**SD1).eval()
    path = save_diffusers(ref, "unet", **save_kwargs)
    ours = UNet2DConditionModel.from_pretrained(path, variant=save_kwargs.get("variant"))
    assert_close_rel(*run_models(ref, ours, **inputs(SD1)))


def test_load_float16(save_diffusers):
    ref, ours = make_pair(SD1, save_diffusers)
    half = UNet2DConditionModel.from_pretrained(save_diffusers(ref, "unet"), torch_dtype=torch.float16)
    assert half.dtype == torch.float16 and all(p.dtype == torch.float16 for p in half.parameters())
    kw = inputs(SD1)
    with torch.no_grad():
        out = half(**kw | dict(sample=kw["sample"].half(), encoder_hidden_states=kw["encoder_hidden_states"].half()))
    assert out.sample.dtype == torch.float16
    assert_close_rel(out.sample, run_models(ref, ours, **kw)[0], rel=2e-2)


def test_missing_and_unexpected_keys_are_named(save_diffusers):
    torch.manual_seed(0)
    path = save_diffusers(DUNet(**SD1), "unet")
    weights = path / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(weights)
    del state["mid_block.attentions.0.proj_in.weight"]
    state["mid_block.extra.weight"] = torch.zeros(1)
    safetensors.torch.save_file(state, weights)
    with pytest.raises(ValueError, match=r"mid_block\.attentions\.0\.proj_in\.weight.*mid_block\.extra\.weight"):
        UNet2DConditionModel.from_pretrained(path)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not_a_key"):
        UNet2DConditionModel(**SD1, not_a_key=1)
    (tmp_path / "config.json").write_text(json.dumps(dict(SD1, _class_name="UNet2DConditionModel", foo_bar=2)))
    with pytest.raises(ConfigError, match="foo_bar"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    bad = [
        (dict(down_block_types=("KDownBlock2D", "DownBlock2D")), "down_block_types.*KDownBlock2D"),
        (dict(class_embed_type="projection"), "class_embed_type.*projection"),
        (dict(time_embedding_type="fourier"), "time_embedding_type.*fourier"),
        (dict(dual_cross_attention=True), "dual_cross_attention"),
        (dict(num_attention_heads=4), "num_attention_heads"),
        (dict(attention_head_dim=(2, 2, 2)), "attention_head_dim has 3 entries"),
        (dict(up_block_types=("UpBlock2D",)), "up_block_types has 1"),
        (dict(encoder_hid_dim_type="text_proj"), "needs encoder_hid_dim"),
    ]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            UNet2DConditionModel(**SD1 | change)


def test_save_pretrained_roundtrip_loads_in_diffusers(tmp_path, save_diffusers):
    ref, ours = make_pair(INPAINT, save_diffusers)
    ours.save_pretrained(tmp_path / "ours")
    back = DUNet.from_pretrained(tmp_path / "ours").eval()
    assert dict(back.config)["only_cross_attention"] == [True, False]
    kw = inputs(INPAINT)
    with torch.no_grad():
        assert_close_rel(back(**kw).sample, ref(**kw).sample, rel=1e-6)


# --- DeepFloyd IF and the x4 upscaler ------------------------------------------------------------------------------
@pytest.mark.parametrize("processor", list(ADDED_KV_PROCESSORS))
@pytest.mark.parametrize("config", [IF_I, IF_II], ids=["if-i", "if-ii"])
def test_if_unet_matches_diffusers(config, processor, save_diffusers):
    ref, ours = make_pair(config, save_diffusers)
    set_processor(ref, ours, processor, ADDED_KV_PROCESSORS)
    kw = inputs(config, size=(16, 24))
    out, expected = run_models(ref, ours, **kw)
    assert out.shape == (2, 6, 16, 24)
    assert_close_rel(out, expected)


@pytest.mark.parametrize("processor", list(ADDED_KV_PROCESSORS))
def test_if_text_mask_matches_diffusers(processor, save_diffusers):
    # IF-I only: Diffusers pads the mask to text + pixel tokens, which breaks on only_cross_attention layers (IF-II).
    ref, ours = make_pair(IF_I, save_diffusers)
    set_processor(ref, ours, processor, ADDED_KV_PROCESSORS)
    mask = torch.ones(2, 7)
    mask[0, 3:] = 0
    kw = inputs(IF_I, size=(16, 24))
    out, expected = run_models(ref, ours, **kw, encoder_attention_mask=mask)
    assert_close_rel(out, expected)
    assert (out[0] - run_models(ref, ours, **kw)[0][0]).abs().max() > 1e-3  # the mask mattered


def test_if_default_processors(save_diffusers):
    _, ours = make_pair(IF_II, save_diffusers)
    assert all(type(p) is rap.AttnAddedKVProcessor2_0 for p in ours.attn_processors.values())
    ours.set_default_attn_processor()
    assert all(type(p) is rap.AttnAddedKVProcessor for p in ours.attn_processors.values())
    with pytest.raises(ValueError, match="class_labels"):
        ours(**{k: v for k, v in inputs(IF_II).items() if k != "class_labels"})


@pytest.mark.parametrize("processor", list(PROCESSORS))
def test_x4_upscaler_unet_matches_diffusers(processor, save_diffusers):
    ref, ours = make_pair(X4, save_diffusers)
    set_processor(ref, ours, processor)
    kw = inputs(X4, size=(16, 24))
    out, expected = run_models(ref, ours, **kw)
    assert_close_rel(out, expected)
    other, _ = run_models(ref, ours, **kw | dict(class_labels=torch.tensor([4, 9])))
    assert (other[0] - out[0]).abs().max() > 1e-3 and torch.allclose(other[1], out[1])  # per-item noise level


@pytest.mark.parametrize("mid_block_type", ["UNetMidBlock2D", None])
def test_mid_block_variants(mid_block_type, save_diffusers):
    config = dict(SD1, mid_block_type=mid_block_type)
    ref, ours = make_pair(config, save_diffusers)
    assert_close_rel(*run_models(ref, ours, **inputs(config)))


@pytest.mark.parametrize(
    "change, labels",
    [
        (dict(class_embed_type="simple_projection", projection_class_embeddings_input_dim=6), torch.randn(2, 6)),
        (dict(num_class_embeds=10), torch.tensor([3, 9])),
    ],
    ids=["simple_projection", "num_class_embeds"],
)
def test_class_embeddings_concat(change, labels, save_diffusers):
    """class_embeddings_concat=True: the class embedding is appended to the time embedding (the blocks take twice
    its width), as Diffusers'."""
    config = dict(SD1, **change, class_embeddings_concat=True)
    ref, ours = make_pair(config, save_diffusers)
    assert ours.down_blocks[0].resnets[0].time_emb_proj.in_features == 2 * ours.config.time_embed_dim
    assert_close_rel(*run_models(ref, ours, **{**inputs(config), "class_labels": labels}))
    with pytest.raises(ConfigError, match="class_embeddings_concat"):
        UNet2DConditionModel(**SD1, class_embeddings_concat=True)  # nothing to append


ASYMMETRIC = dict(
    SD2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    transformer_layers_per_block=((1, 2), (2, 1), 1),  # per down block, a depth per layer; the mid block: 1
    reverse_transformer_layers_per_block=(1, (3, 1, 2), (2, 1, 1, 9)),  # the up blocks', in up order
)


def test_asymmetric_transformer_depths(save_diffusers):
    """Nested transformer_layers_per_block with reverse_transformer_layers_per_block (Diffusers' asymmetric UNets):
    each layer's transformer depth as Diffusers builds it, same weights and output."""
    ref, ours = make_pair(ASYMMETRIC, save_diffusers)
    assert [len(a.transformer_blocks) for a in ours.up_blocks[1].attentions] == [3, 1, 2]
    assert [len(a.transformer_blocks) for a in ours.down_blocks[0].attentions] == [1, 2]
    assert_close_rel(*run_models(ref, ours, **inputs(ASYMMETRIC)))
    built = []
    for cls in (DUNet, UNet2DConditionModel):  # Diffusers' construction order: the same random weights
        torch.manual_seed(0)
        built.append(cls(**ASYMMETRIC).state_dict())
    assert built[0].keys() == built[1].keys() and all(torch.equal(built[1][k], v) for k, v in built[0].items())
    bad = [
        (dict(reverse_transformer_layers_per_block=None), "needs reverse_transformer_layers_per_block"),
        (dict(reverse_transformer_layers_per_block=(1, (3, 1), 1)), "one per layer, and it has 3"),
        (dict(transformer_layers_per_block=((1,), 1, 1)), "one per layer, and it has 2"),
    ]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            UNet2DConditionModel(**dict(ASYMMETRIC, **change))


@pytest.mark.parametrize("config", [SD1, IF_I, dict(SD1, mid_block_type="UNetMidBlock2D")], ids=["sd", "if", "mid"])
def test_blocks_have_diffusers_class_names(config):
    """Each block's class is named as Diffusers' class for its block type (tools match blocks by class name); the
    state dict is the same."""
    with torch.device("meta"):
        ref, ours = DUNet(**config), UNet2DConditionModel(**config)
    for attr in ("down_blocks", "up_blocks"):
        assert [type(b).__name__ for b in getattr(ours, attr)] == [type(b).__name__ for b in getattr(ref, attr)]
    assert (
        type(ours.mid_block).__name__
        == type(ref.mid_block).__name__
        == config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    )
    assert all(b.block_type == type(b).__name__ for b in ours.down_blocks)
    assert ours.state_dict().keys() == ref.state_dict().keys()


# --- real configs, built on the meta device ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, params",
    [
        ("stable-diffusion-v1-5", 859_520_964),
        ("stable-diffusion-inpainting", 859_535_364),
        ("stable-diffusion-x4-upscaler", 473_398_020),
        ("IF-I-M-v1.0", 371_605_830),
        ("IF-II-M-v1.0", 461_064_198),
    ],
)
def test_real_configs_build_with_diffusers_keys(name, params):
    config = json.loads((CONFIGS / name / "unet" / "config.json").read_text())
    with torch.device("meta"):
        ours = UNet2DConditionModel.from_config(config)
        ref = DUNet.from_config(config)
    assert ours.num_parameters() == params
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


# --- torch.compile ---------------------------------------------------------------------------------------------------
@pytest.mark.compile
@pytest.mark.parametrize("config", [SD1, IF_II], ids=["sd", "if"])
def test_compiles_fullgraph(config, save_diffusers):
    _, ours = make_pair(config, save_diffusers)
    size = (15, 21) if config is SD1 else (16, 24)
    kw = inputs(config, size=size)
    if config is SD1:  # the ControlNet path too
        shapes = skip_shapes(ours, 2, *size)
        kw |= dict(
            down_block_additional_residuals=tuple(torch.randn(s) for s in shapes),
            mid_block_additional_residual=torch.randn(shapes[-1]),
        )
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**kw).sample, ours(**kw).sample)


def test_an_eager_call_registers_no_module(save_diffusers):
    """A forward builds no module (no ModuleList slice): a registration anywhere makes the frozen-weights check walk
    its module tree again (rapiddiff.frozen), so eager components must not register any at each call."""
    from rapiddiff.frozen import _Registrations

    _, ours = make_pair(SD1, save_diffusers)
    with torch.no_grad():
        ours(**inputs(SD1))
        before = _Registrations.count
        ours(**inputs(SD1))
    assert _Registrations.count == before
