"""fuse_qkv_projections / unfuse_qkv_projections (issue 12): models and pipelines, against Diffusers' fused models."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import PIPELINE_ATOL, assert_close_rel, run_both
from diffusers import AutoencoderKL as DAutoencoderKL
from test_unet import IF_I, SD1, X4, inputs, make_pair, single_thread  # noqa: F401 (autouse fixture)
from test_vae import TINY

import rapiddiff


@pytest.mark.parametrize("config", [SD1, X4], ids=["sd1", "x4-only-cross"])
def test_fused_unet_matches_diffusers_fused_and_unfuses(config, save_diffusers):
    ref, ours = make_pair(config, save_diffusers)
    kw = inputs(config)
    with torch.no_grad():
        plain = ours(**kw).sample
        ref.fuse_qkv_projections()
        ours.fuse_qkv_projections()
        fused, expected = ours(**kw).sample, ref(**kw).sample
    layers = [m for m in ours.modules() if isinstance(m, rapiddiff.models.attention_processor.Attention)]
    assert all(m.fused_projections for m in layers)
    assert {name.rsplit(".", 1)[-1] for name, _ in ours.named_modules()} >= {"to_qkv", "to_kv"}
    assert_close_rel(fused, expected)
    assert_close_rel(fused, plain, rel=1e-5)
    ours.unfuse_qkv_projections()
    assert not any("to_qkv" in k or "to_kv" in k for k in ours.state_dict())  # back to the checkpoint's keys
    with torch.no_grad():
        assert torch.equal(ours(**kw).sample, plain)


def test_fused_vae_matches_diffusers_fused(tmp_path):
    torch.manual_seed(0)
    ref = DAutoencoderKL(**TINY).eval()
    ref.save_pretrained(tmp_path)
    ours = rapiddiff.AutoencoderKL.from_pretrained(tmp_path)
    x = torch.rand(1, 3, 24, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref.fuse_qkv_projections()
    ours.fuse_qkv_projections()
    with torch.no_grad():
        got = ours.decode(ours.encode(x).latent_dist.mode()).sample
        want = ref.decode(ref.encode(x).latent_dist.mode()).sample
    assert_close_rel(got, want)


def test_added_kv_models_refuse_fusing(save_diffusers):
    model = rapiddiff.UNet2DConditionModel(**IF_I)
    with pytest.raises(ValueError, match="added KV projections"):
        model.fuse_qkv_projections()


def test_pipeline_fuse_and_unfuse_as_diffusers(tiny_sd_dir, caplog):
    import diffusers

    pipes = [lib.StableDiffusionPipeline.from_pretrained(tiny_sd_dir) for lib in (diffusers, rapiddiff)]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    plain = run_both(pipes, height=32, width=48)[1].images
    for pipe in pipes:
        pipe.fuse_qkv_projections()
    ref, ours = run_both(pipes, height=32, width=48)
    np.testing.assert_allclose(ours.images, ref.images, atol=PIPELINE_ATOL)
    np.testing.assert_allclose(ours.images, plain, atol=1e-4)
    assert pipes[1].fusing_unet and pipes[1].fusing_vae
    pipes[1].unfuse_qkv_projections(vae=False)
    assert not pipes[1].fusing_unet and pipes[1].fusing_vae
    with caplog.at_level(logging.WARNING):
        pipes[1].unfuse_qkv_projections()  # the UNet is not fused any more: Diffusers' warning, nothing done
    assert "The UNET was not initially fused" in caplog.text
    assert not pipes[1].fusing_vae
