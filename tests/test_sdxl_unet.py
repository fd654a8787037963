"""SDXL's UNet (addition_embed_type="text_time") against diffusers' on tiny base- and refiner-shaped checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import SDXL_REFINER_UNET, SDXL_UNET, assert_close_rel
from diffusers import UNet2DConditionModel as DUNet

from rapiddiff.configuration import ConfigError
from rapiddiff.models.unet_2d_condition import UNet2DConditionModel


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_pair(config: dict, save_diffusers) -> tuple[DUNet, UNet2DConditionModel]:
    torch.manual_seed(0)
    ref = DUNet(**config).eval()
    return ref, UNet2DConditionModel.from_pretrained(save_diffusers(ref, "unet"))


def inputs(config: dict, batch: int = 2, size: tuple[int, int] = (16, 24), seed: int = 1) -> dict:
    """Text (B, 7, cross_attention_dim), pooled text and time ids filling projection_class_embeddings_input_dim."""
    g = torch.Generator().manual_seed(seed)
    n_ids = 6 if config is SDXL_UNET else 5  # base: sizes and crop; refiner: with the aesthetic score
    pooled = config["projection_class_embeddings_input_dim"] - n_ids * config["addition_time_embed_dim"]
    return dict(
        sample=torch.randn(batch, 4, *size, generator=g),
        timestep=torch.tensor(437),
        encoder_hidden_states=torch.randn(batch, 7, config["cross_attention_dim"], generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0][:n_ids]] * batch),
        },
    )


@pytest.mark.parametrize(
    "config, size",
    [(SDXL_UNET, (16, 24)), (SDXL_UNET, (18, 14)), (SDXL_REFINER_UNET, (16, 24))],
    ids=["base-16x24", "base-18x14", "refiner-16x24"],
)
def test_sdxl_unet_matches_diffusers(config, size, save_diffusers):
    ref, ours = make_pair(config, save_diffusers)
    kw = inputs(config, size=size)
    with torch.no_grad():
        out, expected = ours(**kw).sample, ref(**kw).sample
    assert out.shape == (2, 4, *size)
    assert_close_rel(out, expected)
    # the micro-conditioning matters: other time ids, another output
    kw["added_cond_kwargs"] = kw["added_cond_kwargs"] | {"time_ids": kw["added_cond_kwargs"]["time_ids"] * 0.5}
    with torch.no_grad():
        assert not torch.allclose(ours(**kw).sample, out)


def test_sdxl_keys_and_per_block_layers(save_diffusers):
    ref, ours = make_pair(SDXL_UNET, save_diffusers)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    layers = [len(a.transformer_blocks) for b in ours.down_blocks if b.attentions for a in b.attentions]
    assert layers == [1, 1, 2, 2]  # transformer_layers_per_block (1, 1, 2): the second level 1, the third 2


def test_added_cond_kwargs_errors(save_diffusers):
    _, ours = make_pair(SDXL_UNET, save_diffusers)
    kw = inputs(SDXL_UNET)
    with pytest.raises(ValueError, match="'text_embeds' and 'time_ids'"):
        ours(**kw | {"added_cond_kwargs": None})
    bad = kw["added_cond_kwargs"] | {"time_ids": kw["added_cond_kwargs"]["time_ids"][:, :5]}
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim=80"):
        ours(**kw | {"added_cond_kwargs": bad})
    bad = kw["added_cond_kwargs"] | {"text_embeds": kw["added_cond_kwargs"]["text_embeds"][:1]}
    with pytest.raises(ValueError, match=r"added_cond_kwargs\['text_embeds'\] must be a \(batch=2"):
        ours(**kw | {"added_cond_kwargs": bad})
    with pytest.raises(ConfigError, match="needs addition_time_embed_dim"):
        UNet2DConditionModel(**{**SDXL_UNET, "addition_time_embed_dim": None})


@pytest.mark.compile
@pytest.mark.slow  # the pipeline compile tests (test_sdxl.py) cover the UNet's graph in the default suite
def test_sdxl_unet_compiles_fullgraph(save_diffusers):
    _, ours = make_pair(SDXL_UNET, save_diffusers)
    kw = inputs(SDXL_UNET)
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**kw).sample, ours(**kw).sample)


@pytest.mark.parametrize(
    "path, params",
    [
        ("stable-diffusion-xl-base-1.0/unet/config.json", 2_567_463_684),
        ("stable-diffusion-xl-refiner-1.0/unet/config.json", 2_259_526_660),
        ("controlnet-canny-sdxl-1.0/config.json", 1_251_014_160),
    ],
)
def test_real_sdxl_configs_build_with_diffusers_keys(path, params):
    import json

    import diffusers

    from rapiddiff import ControlNetModel
    from rapiddiff.presets import PRESETS_DIR

    config = json.loads((PRESETS_DIR / path).read_text())
    ours_cls, ref_cls = (
        (ControlNetModel, diffusers.ControlNetModel)
        if "controlnet" in path
        else (UNet2DConditionModel, diffusers.UNet2DConditionModel)
    )
    with torch.device("meta"):
        ours, ref = ours_cls.from_config(config), ref_cls.from_config(config)
    assert ours.num_parameters() == params == ref.num_parameters()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.config.upcast_attention is None  # the hub files' null, kept (read as False)
