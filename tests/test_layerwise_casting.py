"""enable_layerwise_casting: the same layers cast, the same outputs as Diffusers."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel, tiny_sd_components

import rapiddiff


@pytest.mark.parametrize("storage", [torch.float16, torch.float8_e4m3fn])
def test_unet_matches_diffusers(storage):
    ref = tiny_sd_components()["unet"]
    ours = rapiddiff.UNet2DConditionModel(**ref.config)
    ours.load_state_dict(ref.state_dict())
    for model in (ref, ours):
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    dtypes = {k: v.dtype for k, v in ours.state_dict().items()}
    assert dtypes == {k: v.dtype for k, v in ref.state_dict().items()}
    assert storage in dtypes.values() and torch.float32 in dtypes.values()  # norms stay float32
    assert ours.dtype == torch.float32, "the compute dtype, as Diffusers reports it"
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        assert_close_rel(ours(x, 10, text).sample, ref(x, 10, text).sample, 1e-4, "layerwise casting")
    assert {k: v.dtype for k, v in ours.state_dict().items()} == dtypes, "stored back after the forward"


def test_pipeline_runs_and_bad_arguments(tiny_sd_dir):
    pipe = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float16, skip_modules_pattern=("norm", "conv_in"))
    assert pipe.unet.conv_in.weight.dtype == torch.float32 and pipe.unet.conv_out.weight.dtype == torch.float16
    image = pipe("a red cube", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    with pytest.raises(RuntimeError, match="already enabled"):
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float16)
    with pytest.raises(TypeError, match="storage_dtype must be a floating-point torch.dtype"):
        pipe.vae.enable_layerwise_casting(storage_dtype=torch.int8)
