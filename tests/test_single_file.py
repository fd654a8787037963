"""from_single_file: tiny original-layout checkpoints written from the conversion table, read by rapiddiff and by
Diffusers (the oracle, with `config=` the same local folder)."""

from __future__ import annotations

import json
import shutil

import diffusers
import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import PIPELINE_ATOL, tiny_sd_components
from transformers import CLIPTextConfig, CLIPTextModel

import rapiddiff
from rapiddiff.loaders import single_file as sf
from rapiddiff.models import single_file_keys as keys
from rapiddiff.presets import PRESETS_DIR


def _original_layout(unet=None, vae=None, text_encoder=None, openclip: bool = False) -> dict[str, torch.Tensor]:
    """Diffusers models -> one original-layout state dict, through the inverse of rapiddiff's table."""
    state: dict[str, torch.Tensor] = {}
    if unet is not None:
        state |= keys.to_original(unet.state_dict(), keys.unet_rules(unet.config))
    if vae is not None:
        state |= keys.to_original(vae.state_dict(), keys.vae_rules(vae.config))
    if text_encoder is not None:
        te = {  # transformers >= 5 names the keys without the text_model. level
            k if k.startswith("text_model.") else f"text_model.{k}": v
            for k, v in text_encoder.state_dict().items()
            if not k.endswith("position_ids")
        }
        config = text_encoder.config.to_dict()
        rules = keys.openclip_rules(config) if openclip else keys.clip_rules(config)
        state |= keys.to_original(te, rules)
    return {k: v.contiguous() for k, v in state.items()}


def _run(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    args = dict(
        num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", height=32, width=48
    )
    return pipe(["a red cube", "a blue ball"], **(args | kw)).images


@pytest.fixture(scope="module")
def sd_file(tiny_sd_dir, tmp_path_factory):
    """The tiny SD pipeline as one original-layout .safetensors file."""
    c = tiny_sd_components()
    path = tmp_path_factory.mktemp("single") / "tiny-sd.safetensors"
    safetensors.torch.save_file(_original_layout(c["unet"], c["vae"], c["text_encoder"]), str(path))
    return path


def test_pipeline_from_single_file_matches_diffusers(sd_file, tiny_sd_dir):
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(sd_file), config=str(tiny_sd_dir))
    # Diffusers' own converter reads the file written from rapiddiff's table back to the original weights
    original = tiny_sd_components()
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(theirs, name).state_dict(), original[name].state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items() if not k.endswith("position_ids")), name
    ours = rapiddiff.StableDiffusionPipeline.from_single_file(sd_file, config=tiny_sd_dir)
    assert ours.name_or_path == str(sd_file) and ours.safety_checker is None
    np.testing.assert_allclose(_run(ours), _run(theirs), atol=PIPELINE_ATOL)


def test_ckpt_img2img_and_dtype(sd_file, tiny_sd_dir, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": safetensors.torch.load_file(sd_file), "global_step": 1}, ckpt)
    pipe = rapiddiff.StableDiffusionImg2ImgPipeline.from_single_file(ckpt, config=tiny_sd_dir, dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="not both"):
        rapiddiff.StableDiffusionPipeline.from_single_file(
            ckpt, config=tiny_sd_dir, dtype=torch.float16, torch_dtype=torch.float16
        )


def test_inpainting_and_controlnet_pipelines(tmp_path, tiny_sd_dir):
    # a 9-channel UNet is detected as an inpainting checkpoint
    c = tiny_sd_components(unet_in_channels=9)
    path = tmp_path / "inpaint.safetensors"
    safetensors.torch.save_file(_original_layout(c["unet"], c["vae"], c["text_encoder"]), str(path))
    assert sf.detect(safetensors.torch.load_file(path), str(path)) == "v1-inpainting"
    config = tmp_path / "inpaint-config"
    shutil.copytree(tiny_sd_dir, config)
    c["unet"].save_config(config / "unet")
    pipe = rapiddiff.StableDiffusionInpaintPipeline.from_single_file(path, config=config)
    assert pipe.unet.config.in_channels == 9
    # ControlNet: the original control_model.* layout, and the pipeline taking it as a component
    torch.manual_seed(1)
    net = diffusers.ControlNetModel.from_unet(tiny_sd_components()["unet"])
    net_file = tmp_path / "control.safetensors"
    state = keys.to_original(net.state_dict(), keys.controlnet_rules(net.config))
    safetensors.torch.save_file(state, str(net_file))
    net.save_config(tmp_path / "net")
    ours = rapiddiff.ControlNetModel.from_single_file(net_file, config=tmp_path / "net")
    theirs = diffusers.ControlNetModel.from_single_file(str(net_file), config=str(tmp_path / "net"))
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.state_dict().items())
    sd = tmp_path / "sd.safetensors"
    c = tiny_sd_components()
    safetensors.torch.save_file(_original_layout(c["unet"], c["vae"], c["text_encoder"]), str(sd))
    pipe = rapiddiff.StableDiffusionControlNetPipeline.from_single_file(sd, config=tiny_sd_dir, controlnet=ours)
    assert pipe.controlnet is ours


def test_sd2_openclip_text_encoder_and_v_prediction(tmp_path, tiny_sd_dir):
    c = tiny_sd_components()
    torch.manual_seed(2)
    # OpenCLIP's text tower as SD 2 uses it: gelu, and one layer more in the file than the model keeps
    full = CLIPTextConfig(**{**c["text_encoder"].config.to_dict(), "hidden_act": "gelu", "num_hidden_layers": 3})
    kept = CLIPTextConfig(**{**full.to_dict(), "num_hidden_layers": 2})
    tower = CLIPTextModel(full).eval()
    state = _original_layout(c["unet"], c["vae"], tower, openclip=True)
    state["cond_stage_model.model.text_projection"] = torch.randn(32, 32)
    state["cond_stage_model.model.logit_scale"] = torch.tensor(1.0)
    path = tmp_path / "sd2.safetensors"
    safetensors.torch.save_file(state, str(path))
    config = tmp_path / "sd2-config"
    shutil.copytree(tiny_sd_dir, config)
    (config / "text_encoder" / "config.json").write_text(json.dumps(kept.to_dict()))
    ours = rapiddiff.StableDiffusionPipeline.from_single_file(path, config=config, prediction_type="v_prediction")
    assert ours.scheduler.config.prediction_type == "v_prediction"
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(config))
    theirs.scheduler = diffusers.PNDMScheduler.from_config(theirs.scheduler.config, prediction_type="v_prediction")
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 4])
    with torch.no_grad():
        want = theirs.text_encoder(tokens)[0]
        got = ours.text_encoder(tokens)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_run(ours), _run(theirs), atol=PIPELINE_ATOL)


def test_detection_presets_and_errors(sd_file, tiny_sd_dir, tmp_path):
    state = safetensors.torch.load_file(sd_file)
    assert sf.detect(state, "f") == "v1"
    k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert sf.detect({**state, k: torch.zeros(8, 1024)}, "f") == "v2"
    assert sf.config_folder("v2", None) == PRESETS_DIR / "stable-diffusion-2-1"
    with pytest.raises(ValueError, match="v2-inpainting.*config="):
        sf.config_folder("v2-inpainting", None)
    # without config=, the SD 1.5 preset's full-size UNet does not fit the tiny file: the error says so
    with pytest.raises(ValueError, match=r"UNet, v1, config .*stable-diffusion-v1-5.*does not cover.*input_blocks\.3"):
        rapiddiff.StableDiffusionPipeline.from_single_file(sd_file)
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"foo.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint in the original layout"):
        rapiddiff.StableDiffusionPipeline.from_single_file(bad)
    extra = tmp_path / "extra.safetensors"
    safetensors.torch.save_file({**state, "model.diffusion_model.mystery.weight": torch.zeros(1)}, str(extra))
    with pytest.raises(ValueError, match="mystery"):
        rapiddiff.StableDiffusionPipeline.from_single_file(extra, config=tiny_sd_dir)
    with pytest.raises(TypeError, match="Stable Diffusion pipelines"):
        rapiddiff.IFPipeline.from_single_file(sd_file)
