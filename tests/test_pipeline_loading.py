"""DiffusionPipeline loading, saving and moving, on a tiny checkpoint written by diffusers."""

from __future__ import annotations

import json
import shutil

import diffusers
import pytest
import torch
from conftest import PIPELINE_ATOL, fake_hub_cache, tiny_sd_components
from transformers import CLIPTextModel, CLIPTokenizer

from rapiddiff import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_index(folder, **changes):
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index.update(changes)
    path.write_text(json.dumps(index))


def _image(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    args = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    return pipe("a red cube", **(args | kw)).images


# --- loading ---------------------------------------------------------------------------------------------------------
def test_diffusion_pipeline_dispatches_on_class_name(tiny_sd_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert type(pipe) is StableDiffusionPipeline
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.safety_checker is None and pipe.feature_extractor is None and pipe.image_encoder is None
    assert pipe.config["requires_safety_checker"] is False
    assert pipe.config.unet == ("diffusers", "UNet2DConditionModel")
    assert pipe.config["safety_checker"] == (None, None)
    assert pipe.vae_scale_factor == 2
    assert pipe.name_or_path == str(tiny_sd_dir)
    assert set(pipe.components) == {
        "vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor", "image_encoder"
    }  # fmt: skip
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32


def test_checkpoint_naming_a_new_scheduler_loads(tiny_sd_dir, tmp_path):
    folder = _copy(tiny_sd_dir, tmp_path)
    _edit_index(folder, scheduler=["diffusers", "KDPM2AncestralDiscreteScheduler"])
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text()) | {"_class_name": "KDPM2AncestralDiscreteScheduler"}
    config_path.write_text(json.dumps(config))
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == "KDPM2AncestralDiscreteScheduler" and pipe.scheduler.order == 2
    ref = diffusers.DiffusionPipeline.from_pretrained(folder)
    assert type(ref.scheduler).__name__ == "KDPM2AncestralDiscreteScheduler"
    assert {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")} == {
        k: v for k, v in dict(ref.scheduler.config).items() if not k.startswith("_")
    }
    assert torch.isfinite(torch.as_tensor(_image(pipe))).all()  # runs its interleaved two-evaluation loop


def test_specific_class_loads_and_matches_generic(tiny_sd_dir):
    a = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    b = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    torch.testing.assert_close(_image(a), _image(b), rtol=0, atol=0)


def test_torch_dtype(tiny_sd_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_dir, torch_dtype=torch.float16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16
    assert pipe.dtype == torch.float16
    mixed = DiffusionPipeline.from_pretrained(
        tiny_sd_dir, torch_dtype={"unet": torch.bfloat16, "default": torch.float16}
    )
    assert mixed.unet.dtype == torch.bfloat16 and mixed.vae.dtype == torch.float16
    with pytest.raises(TypeError, match="torch_dtype"):
        DiffusionPipeline.from_pretrained(tiny_sd_dir, torch_dtype="float16")


def test_variant_falls_back_to_plain_files(tiny_sd_dir, tmp_path):
    folder = _copy(tiny_sd_dir, tmp_path)
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)  # the variant's weights differ from the plain ones
    unet.save_pretrained(folder / "unet", variant="fp16")
    pipe = DiffusionPipeline.from_pretrained(folder, variant="fp16")
    plain = DiffusionPipeline.from_pretrained(folder)
    ref = unet.state_dict()
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    for k, v in pipe.vae.state_dict().items():  # no fp16 file for the VAE: its plain weights
        torch.testing.assert_close(v, plain.vae.state_dict()[k])
    with pytest.raises(ValueError, match="variant='ema'"):
        DiffusionPipeline.from_pretrained(folder, variant="ema")


def test_bin_and_safetensors(tmp_path):
    pipe = diffusers.StableDiffusionPipeline(
        **tiny_sd_components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").is_file()
    ours = DiffusionPipeline.from_pretrained(tmp_path / "bin")
    for k, v in ours.unet.state_dict().items():
        torch.testing.assert_close(v, pipe.unet.state_dict()[k])
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        DiffusionPipeline.from_pretrained(tmp_path / "bin", use_safetensors=True)


def test_hub_id_from_offline_cache(tiny_sd_dir, tmp_path, monkeypatch):
    fake_hub_cache(tmp_path, monkeypatch, {"tiny-org/tiny-sd": tiny_sd_dir})
    pipe = DiffusionPipeline.from_pretrained("tiny-org/tiny-sd")
    assert type(pipe) is StableDiffusionPipeline and pipe.name_or_path == "tiny-org/tiny-sd"
    assert pipe.unet.config.block_out_channels == (32, 64)
    with pytest.raises(FileNotFoundError, match="tiny-org/not-there"):
        DiffusionPipeline.from_pretrained("tiny-org/not-there")


def test_overrides_replace_components_and_config(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    euler = EulerDiscreteScheduler.from_pretrained(tiny_sd_dir / "scheduler")
    pipe = DiffusionPipeline.from_pretrained(
        tiny_sd_dir, unet=unet, scheduler=euler, text_encoder=None, requires_safety_checker=True
    )
    assert pipe.unet is unet and pipe.scheduler is euler and pipe.text_encoder is None
    assert pipe.config["requires_safety_checker"] is True
    assert pipe.config["text_encoder"] == (None, None)


def test_component_swap_by_attribute(tiny_sd_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert pipe.components["scheduler"] is pipe.scheduler
    assert pipe.config["scheduler"] == ("diffusers", "EulerDiscreteScheduler")


# --- errors ----------------------------------------------------------------------------------------------------------
def test_missing_folder_and_files(tiny_sd_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        DiffusionPipeline.from_pretrained(tmp_path / "does-not-exist")
    folder = _copy(tiny_sd_dir, tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(FileNotFoundError, match="'vae'"):
        DiffusionPipeline.from_pretrained(folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        DiffusionPipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"_class_name": "FancyPipeline"}, "FancyPipeline"),
        ({"_class_name": "UNet2DConditionModel"}, "not a pipeline class"),
        ({"unet": ["mystery_lib", "UNet2DConditionModel"]}, "mystery_lib"),
        ({"unet": ["diffusers", "UNet3DConditionModel"]}, "UNet3DConditionModel"),
        ({"text_encoder": ["transformers", "NoSuchModel"]}, "NoSuchModel"),
        ({"low_res_scheduler": ["diffusers", "DDPMScheduler"]}, "low_res_scheduler"),
        ({"max_noise_level": 350}, "max_noise_level"),
        ({"unet": "UNet2DConditionModel"}, "library, class name"),
    ],
)
def test_bad_model_index(tiny_sd_dir, tmp_path, changes, match):
    folder = tmp_path / "ckpt"  # the weights linked, model_index.json copied and edited
    folder.mkdir()
    for sub in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        (folder / sub).symlink_to(tiny_sd_dir / sub)
    shutil.copy(tiny_sd_dir / "model_index.json", folder / "model_index.json")
    _edit_index(folder, **changes)
    with pytest.raises(ValueError, match=match):
        DiffusionPipeline.from_pretrained(folder)


def test_missing_required_component(tiny_sd_dir, tmp_path):
    folder = _copy(tiny_sd_dir, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    del index["unet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"\['unet'\]"):
        DiffusionPipeline.from_pretrained(folder)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    assert DiffusionPipeline.from_pretrained(folder, unet=unet).unet is unet


def test_unexpected_keyword(tiny_sd_dir):
    with pytest.raises(TypeError, match="controlnet"):
        DiffusionPipeline.from_pretrained(tiny_sd_dir, controlnet=None)


# --- saving and moving -----------------------------------------------------------------------------------------------
def test_save_pretrained_round_trip_with_diffusers(tiny_sd_dir, tmp_path):
    ours = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["safety_checker"] == [None, None]
    assert index["requires_safety_checker"] is False
    assert (tmp_path / "saved" / "text_encoder" / "model.safetensors").is_file()
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    again = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    expected = _image(theirs)
    torch.testing.assert_close(_image(ours), expected, rtol=0, atol=PIPELINE_ATOL)
    torch.testing.assert_close(_image(again), _image(ours), rtol=0, atol=0)


def test_to_device_and_dtype(tiny_sd_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert pipe.to(torch.float16) is pipe
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16
    pipe.to("cpu", torch.float32)
    assert pipe.dtype == torch.float32 and pipe.device == torch.device("cpu")
    pipe.to(dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    pipe.to(device="cpu")
    assert pipe.unet.device.type == "cpu"
    with pytest.raises(TypeError, match="dtype given twice"):
        pipe.to(torch.float16, dtype=torch.float32)
    with pytest.raises(TypeError, match="at most"):
        pipe.to("cpu", torch.float16, "x")


def test_hub_download_picks_one_variant_and_format(tiny_sd_dir, tmp_path, monkeypatch):
    """Online, only the needed files are fetched: the variant's weights where a component has them, else the plain
    ones; safetensors before .bin; never other frameworks' files or unloaded components."""
    import huggingface_hub

    snapshot = _copy(tiny_sd_dir, tmp_path, "snapshot")
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    files += [
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_flax_model.msgpack",
        "vae/diffusion_pytorch_model.fp16.bin",
        "safety_checker/model.safetensors",
    ]
    requested = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        requested.append(allow_patterns)
        return str(snapshot)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    shutil.copy(snapshot / "unet/diffusion_pytorch_model.safetensors", snapshot / files[-5])
    pipe = DiffusionPipeline.from_pretrained("tiny-org/tiny-sd", variant="fp16")
    assert pipe.safety_checker is None and pipe.name_or_path == "tiny-org/tiny-sd"
    fetched = set(requested[-1])
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fetched
    assert "vae/diffusion_pytorch_model.fp16.bin" not in fetched  # a safetensors file of the VAE exists
    assert "vae/diffusion_pytorch_model.safetensors" in fetched  # no fp16 safetensors: the plain one
    assert "text_encoder/model.safetensors" in fetched and "tokenizer/tokenizer.json" in fetched
    assert not any(f.endswith((".bin", ".msgpack")) or f.startswith("safety_checker") for f in fetched)


def test_file_variant():
    from rapiddiff.pipelines.pipeline_utils import file_variant, pick_weight_files

    assert file_variant("diffusion_pytorch_model.fp16.safetensors") == "fp16"
    assert file_variant("model.fp16-00001-of-00002.safetensors") == "fp16"
    assert file_variant("diffusion_pytorch_model-00001-of-00002.fp16.safetensors") == "fp16"
    assert file_variant("model.safetensors") is None and file_variant("pytorch_model.bin") is None
    names = ["model.bin", "model.fp16.bin"]
    assert pick_weight_files(names, "fp16", None) == ["model.fp16.bin"]
    assert pick_weight_files(names, None, None) == ["model.bin"]
    assert pick_weight_files(names, None, True) == []
