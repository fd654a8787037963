"""Reading and writing checkpoints: typed configs, loading arguments, clear errors, sharded and atomic saves."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading

import diffusers
import pytest
import safetensors.torch
import torch
from transformers import CLIPImageProcessor

from rapiddiff import (
    AutoencoderKL,
    ControlNetModel,
    DiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from rapiddiff.configuration import ConfigError
from rapiddiff.presets import PRESETS_DIR
from rapiddiff.utils import atomic_io

TINY_VAE = dict(
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
    norm_num_groups=4,
    layers_per_block=1,
)


def _vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL.from_config(TINY_VAE).eval()


def _tree(folder) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (what byte-identical means here)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _leftovers(parent) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- typed configs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("in_channels", "four", r"in_channels='four'.*expects an int"),
        ("block_out_channels", 32, r"block_out_channels=32.*expects a list of \(an int\)"),
        ("layers_per_block", 0, r"layers_per_block=0 is out of range.*>= 1"),
        ("block_out_channels", [8, -16], r"block_out_channels=\(8, -16\) is out of range"),
        ("scaling_factor", "x", r"scaling_factor='x'.*expects a number"),
        ("force_upcast", 1, r"force_upcast=1.*expects true/false"),
    ],
)
def test_model_config_values_are_typed(tmp_path, key, value, match):
    _vae().save_pretrained(tmp_path / "vae")
    path = tmp_path / "vae" / "config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=match) as err:
        AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert str(path) in str(err.value)  # names the file


def test_unet_config_type_errors_name_key():
    with pytest.raises(ConfigError, match=r"cross_attention_dim='32'"):
        UNet2DConditionModel.from_config({"cross_attention_dim": "32"})
    with pytest.raises(ConfigError, match=r"norm_eps=nan"):
        UNet2DConditionModel.from_config({"norm_eps": float("nan")})
    with pytest.raises(ConfigError, match="attention_head_dim"):
        UNet2DConditionModel.config_class().replace(attention_head_dim="8")


# --- loading arguments and clear errors ------------------------------------------------------------------------------
def test_dtype_arguments(tmp_path):
    _vae().half().save_pretrained(tmp_path / "vae")
    assert AutoencoderKL.from_pretrained(tmp_path / "vae").dtype == torch.float32  # the default, as Diffusers
    assert AutoencoderKL.from_pretrained(tmp_path / "vae", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert AutoencoderKL.from_pretrained(tmp_path / "vae", torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert AutoencoderKL.from_pretrained(tmp_path / "vae", torch_dtype="auto").dtype == torch.float16
    with pytest.raises(TypeError, match="not both"):
        AutoencoderKL.from_pretrained(tmp_path / "vae", dtype=torch.float16, torch_dtype=torch.float16)
    with pytest.raises(TypeError, match="'fp16'"):
        AutoencoderKL.from_pretrained(tmp_path / "vae", dtype="fp16")


def test_unknown_loading_argument_is_a_type_error(tmp_path):
    _vae().save_pretrained(tmp_path / "vae")
    with pytest.raises(TypeError, match=r"\['max_memory'\].*loading argument"):
        AutoencoderKL.from_pretrained(tmp_path / "vae", max_memory={0: "1GB"})
    # config keys still override, as in Diffusers
    assert AutoencoderKL.from_pretrained(tmp_path / "vae", scaling_factor=0.5).config.scaling_factor == 0.5


def test_non_float_tensor_and_file_path_errors(tmp_path):
    _vae().save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(weights)
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"].to(torch.int32)
    safetensors.torch.save_file(state, weights)
    with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight \(torch\.int32\).*not floating") as err:
        AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert str(weights) in str(err.value)
    with pytest.raises(NotADirectoryError, match="is a file.*from_single_file"):
        AutoencoderKL.from_pretrained(weights)


# --- sharded saves ---------------------------------------------------------------------------------------------------
def test_sharded_save_round_trip_and_diffusers_reads_it(tmp_path):
    vae = _vae()
    vae.save_pretrained(tmp_path / "vae", max_shard_size="40KB", variant="fp16")
    files = sorted(p.name for p in (tmp_path / "vae").iterdir())
    shards = [f for f in files if f.startswith("diffusion_pytorch_model.fp16-0")]
    assert len(shards) > 1 and "diffusion_pytorch_model.safetensors.index.fp16.json" in files  # Diffusers' names
    assert _same_weights(AutoencoderKL.from_pretrained(tmp_path / "vae", variant="fp16"), vae)
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae", variant="fp16")
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in vae.state_dict().items())
    # an unsharded save over it leaves no stale shard behind
    vae.save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    with pytest.raises(ValueError, match="max_shard_size"):
        vae.save_pretrained(tmp_path / "other", max_shard_size="lots")


# --- atomic saves ----------------------------------------------------------------------------------------------------
def test_stale_variant_does_not_survive(tmp_path):
    a, b = _vae(0), _vae(1)
    a.save_pretrained(tmp_path / "vae", variant="fp16")
    (tmp_path / "vae" / "README.md").write_text("kept")
    b.save_pretrained(tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match="fp16"):  # a's fp16 weights did not survive b's save
        AutoencoderKL.from_pretrained(tmp_path / "vae", variant="fp16")
    assert _same_weights(AutoencoderKL.from_pretrained(tmp_path / "vae"), b)
    assert (tmp_path / "vae" / "README.md").read_text() == "kept"  # not a model file: carried over
    a.save_pretrained(tmp_path / "vae", variant="fp16", safe_serialization=False)
    assert not (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").exists()
    assert _same_weights(AutoencoderKL.from_pretrained(tmp_path / "vae", variant="fp16"), a)


@pytest.mark.parametrize("k", [1, 3])
def test_failing_writer_leaves_old_model(tmp_path, monkeypatch, k):
    _vae(0).save_pretrained(tmp_path / "vae", max_shard_size="40KB")
    before = _tree(tmp_path / "vae")
    calls = []
    real = safetensors.torch.save_file

    def fail_on_kth(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == k:
            with open(filename, "wb") as f:
                f.write(b"partial")  # a half-written file, then the disk is full
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_kth)
    with pytest.raises(OSError, match="No space"):
        _vae(1).save_pretrained(tmp_path / "vae", max_shard_size="40KB")
    assert len(calls) == k
    assert _tree(tmp_path / "vae") == before
    assert _leftovers(tmp_path) == []


def test_temporaries_of_a_killed_save_are_removed_by_the_next(tmp_path):
    """A save killed mid-write leaves its hidden temporary (named with the writer's pid); the next save of that folder
    removes it, but not one whose writer is still running."""
    import os
    import subprocess
    import sys

    _vae(0).save_pretrained(tmp_path / "vae")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    dead = tmp_path / f".vae.saving-{dead_pid}-deadbeef"
    dead.mkdir()
    (dead / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    (tmp_path / f".vae.old-{dead_pid}-0badcafe").mkdir()
    alive = tmp_path / f".vae.saving-{os.getppid()}-a11ce000"  # a live process (pytest's parent) writing
    alive.mkdir()
    _vae(1).save_pretrained(tmp_path / "vae")
    assert _leftovers(tmp_path) == [alive.name]
    assert _same_weights(AutoencoderKL.from_pretrained(tmp_path / "vae"), _vae(1))


def test_unreplaceable_folder_fails_before_writing(tmp_path, monkeypatch):
    # Tests run as root, for whom a read-only folder is writable: inject what os.access would say for a normal user.
    _vae(0).save_pretrained(tmp_path / "vae")
    before = _tree(tmp_path / "vae")
    real = atomic_io.os.access
    monkeypatch.setattr(atomic_io.os, "access", lambda p, mode: not str(p).endswith("vae") and real(p, mode))
    with pytest.raises(PermissionError, match=r"vae is not writable; nothing was changed"):
        _vae(1).save_pretrained(tmp_path / "vae")
    assert _tree(tmp_path / "vae") == before
    assert _leftovers(tmp_path) == []


def test_save_through_a_symlinked_folder(tmp_path):
    """`save_pretrained("link")`, link -> a folder: the folder it points to gets the new save, the link stays a link
    (Diffusers writes through it), and no hidden leftover remains."""
    import os

    real = tmp_path / "real"
    _vae(0).save_pretrained(real)
    (real / "README.md").write_text("kept")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    _vae(1).save_pretrained(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert _same_weights(AutoencoderKL.from_pretrained(real), _vae(1))
    assert _same_weights(AutoencoderKL.from_pretrained(link), _vae(1))
    assert (real / "README.md").read_text() == "kept"
    assert _leftovers(tmp_path) == []


def test_reader_during_saves_sees_old_or_new(tmp_path):
    models = [_vae(0), _vae(1)]
    models[0].save_pretrained(tmp_path / "vae")
    seen, errors, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                loaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
            except Exception as e:  # a half-written file or a missing one
                errors.append(e)
                return
            seen.append([i for i, m in enumerate(models) if _same_weights(loaded, m)])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(6):
            models[i % 2].save_pretrained(tmp_path / "vae", max_shard_size="40KB" if i % 3 else "10GB")
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert seen and all(len(s) == 1 for s in seen)  # each load is exactly one of the saves
    assert _leftovers(tmp_path) == []


# --- pipelines -------------------------------------------------------------------------------------------------------
def _pipe(tiny_sd_dir, perturb: float = 0.0) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    with torch.no_grad():
        for p in [*pipe.unet.parameters(), *pipe.vae.parameters()]:
            p.add_(perturb)
    return pipe


@pytest.fixture(scope="module")
def two_pipes(tiny_sd_dir) -> list[StableDiffusionPipeline]:
    """The tiny SD pipeline, and a copy whose UNet and VAE weights differ (loaded once: saving is what is tested)."""
    return [_pipe(tiny_sd_dir), _pipe(tiny_sd_dir, 0.01)]


def test_pipeline_save_failing_on_kth_file_leaves_old_checkpoint(two_pipes, tmp_path, monkeypatch):
    target = tmp_path / "sd"
    two_pipes[0].save_pretrained(target)
    (target / "README.md").write_text("mine")
    before = _tree(target)
    calls = []
    real = safetensors.torch.save_file

    def fail_second(tensors, filename, metadata=None):  # the VAE is written, then the UNet fails
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_second)
    with pytest.raises(OSError, match="No space"):
        two_pipes[1].save_pretrained(target)
    assert len(calls) == 2 and _tree(target) == before and _leftovers(tmp_path) == []


def test_pipeline_save_replaces_components_and_shards(two_pipes, tmp_path):
    target = tmp_path / "sd"
    a, b = two_pipes
    a.save_pretrained(target, variant="fp16")
    (target / "notes").mkdir()
    (target / "notes" / "a.txt").write_text("kept")
    b.save_pretrained(target, max_shard_size="200KB")
    unet_files = sorted(p.name for p in (target / "unet").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in unet_files
    assert not [f for f in unet_files if "fp16" in f]  # a's variant did not survive
    assert (target / "notes" / "a.txt").read_text() == "kept"
    with pytest.raises(ValueError, match="variant='fp16'"):  # no stale fp16 files to load a's weights from
        StableDiffusionPipeline.from_pretrained(target, variant="fp16")
    loaded = StableDiffusionPipeline.from_pretrained(target)
    assert _same_weights(loaded.unet, b.unet) and _same_weights(loaded.vae, b.vae)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(target / "unet")  # Diffusers reads the shards
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in b.unet.state_dict().items())


def test_pipeline_reader_during_saves_sees_old_or_new(two_pipes, tmp_path):
    target = tmp_path / "sd"
    pipes = two_pipes
    pipes[0].save_pretrained(target)
    seen, errors, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                p = StableDiffusionPipeline.from_pretrained(target)
            except Exception as e:
                errors.append(e)
                return
            seen.append(({i for i, q in enumerate(pipes) if _same_weights(p.unet, q.unet)},
                         {i for i, q in enumerate(pipes) if _same_weights(p.vae, q.vae)}))  # fmt: skip

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for i in range(3):
            pipes[(i + 1) % 2].save_pretrained(target)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert not thread.is_alive() and errors == []
    assert seen and all(len(u) == 1 and u == v for u, v in seen)  # UNet and VAE always from the same save


def test_pipeline_loading_arguments(tiny_sd_dir, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="not both"):
        StableDiffusionPipeline.from_pretrained(tiny_sd_dir, dtype=torch.float16, torch_dtype=torch.float16)
    pipe.save_pretrained(tmp_path / "bf16")
    auto = StableDiffusionPipeline.from_pretrained(tmp_path / "bf16", torch_dtype="auto")
    assert auto.unet.dtype == auto.vae.dtype == auto.text_encoder.dtype == torch.bfloat16
    # an old model_index.json naming CLIPFeatureExtractor (transformers 5 has only CLIPImageProcessor)
    folder = tmp_path / "old"
    shutil.copytree(tiny_sd_dir, folder)
    shutil.copytree(PRESETS_DIR / "stable-diffusion-v1-5" / "feature_extractor", folder / "feature_extractor")
    index = json.loads((folder / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPFeatureExtractor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert isinstance(StableDiffusionPipeline.from_pretrained(folder).feature_extractor, CLIPImageProcessor)
    # a corrupt tokenizer file is named
    (folder / "tokenizer" / "tokenizer.json").write_text('{"a": ')
    with pytest.raises(ValueError, match=r"tokenizer.*tokenizer\.json is not valid JSON"):
        StableDiffusionPipeline.from_pretrained(folder)
    with pytest.raises(NotADirectoryError, match="is a file"):
        StableDiffusionPipeline.from_pretrained(folder / "model_index.json")


def test_from_pipe_shares_components(tiny_sd_dir):
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(sd)
    assert type(img2img) is StableDiffusionImg2ImgPipeline
    assert all(getattr(img2img, n) is c for n, c in sd.components.items() if c is not None)
    assert img2img.config["requires_safety_checker"] is False
    with pytest.raises(ValueError, match=r"\['controlnet'\]"):
        StableDiffusionControlNetPipeline.from_pipe(sd)
    net = ControlNetModel.from_unet(sd.unet)
    control = StableDiffusionControlNetPipeline.from_pipe(sd, controlnet=net)
    assert control.controlnet is net and control.unet is sd.unet
    assert type(DiffusionPipeline.from_pipe(sd)) is StableDiffusionPipeline
