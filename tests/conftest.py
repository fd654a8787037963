"""Shared test helpers: tiny checkpoints written by diffusers (the oracle) and parity assertions."""

from __future__ import annotations

import os

import pytest
import torch

from rapiddiff.presets import PRESETS_DIR

# Tests never download: everything is written by the tests themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4, what: str = "output") -> None:
    """Max abs difference within `rel` times the scale (max abs) of the expected output."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:g} x scale {scale:.3e}"


@pytest.fixture
def save_diffusers(tmp_path):
    """save_diffusers(model, name, **kw) -> folder: save a diffusers model/scheduler with save_pretrained."""

    def _save(obj, name: str = "model", **kwargs):
        path = tmp_path / name
        obj.save_pretrained(path, **kwargs)
        return path

    return _save


# --- a tiny Stable Diffusion checkpoint (shared by the pipeline tests) -----------------------------------------------
SD_TOKENIZER = os.path.join(
    os.path.dirname(__file__), "..", "src", "rapiddiff", "presets", "stable-diffusion-v1-5", "tokenizer"
)


def tiny_sd_components(unet_in_channels: int = 4) -> dict:
    """Seeded, random-weight diffusers SD components: UNet (32, 64) at sample_size 16 (cross_attention_dim 32), a
    2-block VAE (vae_scale_factor 2), a 2-layer hidden-32 CLIP text encoder on SD1.5's real tokenizer, SD's PNDM."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=unet_in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=16,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=16,
        layers_per_block=1,
        sample_size=32,
    )
    text_config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=49408,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=32,
    )
    scheduler = diffusers.PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=CLIPTextModel(text_config).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(SD_TOKENIZER),
        scheduler=scheduler,
    )


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A diffusers StableDiffusionPipeline of `tiny_sd_components()` saved with save_pretrained (no safety checker)."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline(
        **tiny_sd_components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    path = tmp_path_factory.mktemp("tiny-sd") / "checkpoint"
    pipe.save_pretrained(path)
    return path


# --- tiny SDXL-shaped UNets (base: 2048-wide text, 6 time ids; refiner: 1280-wide text, 5 ids) -------------------
SDXL_UNET = dict(
    sample_size=16,
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 2, 4),  # read as numbers of heads, per level
    transformer_layers_per_block=(1, 1, 2),
    use_linear_projection=True,
    cross_attention_dim=64,  # the two text encoders' widths concatenated (SDXL: 768 + 1280)
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,  # pooled 32 + 6 time ids x 8 (SDXL: 1280 + 6 x 256 = 2816)
    norm_num_groups=8,
)
SDXL_REFINER_UNET = dict(
    SDXL_UNET,
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 2, 4, 4),
    transformer_layers_per_block=2,
    cross_attention_dim=32,  # the second text encoder only (SDXL refiner: 1280)
    projection_class_embeddings_input_dim=72,  # pooled 32 + 5 time ids x 8 (refiner: 1280 + 5 x 256 = 2560)
)


def tiny_sdxl_components(refiner: bool = False) -> dict:
    """Seeded, random-weight diffusers SDXL components: the SDXL-shaped UNet above (or the refiner's), the tiny SD
    VAE with SDXL's scaling_factor, two hidden-32 CLIP text encoders (the second with a 32-wide projection: the pooled
    text) on SD1.5's tokenizer, SDXL's Euler scheduler. The refiner has the second encoder only."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = tiny_sd_components()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**(SDXL_REFINER_UNET if refiner else SDXL_UNET))
    vae = diffusers.AutoencoderKL.from_config(sd["vae"].config, scaling_factor=0.13025)
    vae.load_state_dict(sd["vae"].state_dict())
    text_config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=49408,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=32,
        hidden_act="gelu",
    )
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(text_config).eval()
    text_encoder_2 = CLIPTextModelWithProjection(text_config).eval()
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=None if refiner else text_encoder,
        tokenizer=None if refiner else sd["tokenizer"],
        text_encoder_2=text_encoder_2,
        tokenizer_2=sd["tokenizer"],
        scheduler=scheduler,
    )


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A diffusers StableDiffusionXLPipeline of `tiny_sdxl_components()`, saved (no watermarker)."""
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline(**tiny_sdxl_components(), add_watermarker=False)
    path = tmp_path_factory.mktemp("tiny-sdxl") / "checkpoint"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_refiner_dir(tmp_path_factory):
    """A diffusers StableDiffusionXLImg2ImgPipeline of the refiner's components (the refiner's config values:
    requires_aesthetics_score, no zeroed negatives), saved."""
    import diffusers

    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        **tiny_sdxl_components(refiner=True),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    path = tmp_path_factory.mktemp("tiny-sdxl-refiner") / "checkpoint"
    pipe.save_pretrained(path)
    return path


# --- a tiny x4 upscaler checkpoint (shared by the upscaler and DeepFloyd IF cascade tests) ----------------------------
def tiny_upscaler_components() -> dict:
    """Seeded, random-weight diffusers x4-upscaler components: a (32, 64) UNet taking 4 latent + 3 image channels
    with a 1000-entry noise-level embedding, a 3-block VAE (vae_scale_factor 4, scaling_factor 0.08333), the tiny CLIP
    text encoder and tokenizer of `tiny_sd_components`, and the real checkpoint's schedulers."""
    import diffusers

    from rapiddiff.configuration import read_json

    configs = os.path.join(PRESETS_DIR, "stable-diffusion-x4-upscaler")
    clip = tiny_sd_components()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=7,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=(True, True),
        attention_head_dim=4,
        cross_attention_dim=32,
        use_linear_projection=True,
        num_class_embeds=1000,
        norm_num_groups=16,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
        scaling_factor=0.08333,
    )
    schedulers = {
        name: getattr(diffusers, cls).from_config(read_json(os.path.join(configs, name, "scheduler_config.json")))
        for name, cls in (("low_res_scheduler", "DDPMScheduler"), ("scheduler", "DDIMScheduler"))
    }
    return dict(
        unet=unet.eval(), vae=vae.eval(), text_encoder=clip["text_encoder"], tokenizer=clip["tokenizer"], **schedulers
    )


@pytest.fixture(scope="session")
def tiny_upscaler_dir(tmp_path_factory):
    """A diffusers StableDiffusionUpscalePipeline of `tiny_upscaler_components()` (max_noise_level 350), saved."""
    import diffusers

    pipe = diffusers.StableDiffusionUpscalePipeline(**tiny_upscaler_components(), max_noise_level=350)
    path = tmp_path_factory.mktemp("tiny-x4") / "checkpoint"
    pipe.save_pretrained(path)
    return path


# --- parity helpers for the image-conditioned pipelines (img2img, inpainting, ControlNet) ----------------------------
PIPELINE_ATOL = 2e-3


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB"):
    """A seeded random-pixel PIL image ("RGB", or "L" for a mask)."""
    import numpy as np
    import PIL.Image

    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8), mode)


def seeded(seed: int | list[int]):
    """A fresh CPU generator for a seed, or one per seed of a list."""
    if isinstance(seed, list):
        return [torch.Generator().manual_seed(s) for s in seed]
    return torch.Generator().manual_seed(seed)


def use_scheduler(pipes, name: str, checkpoint) -> None:
    """Give (diffusers, rapiddiff) pipelines fresh schedulers of class `name` built from the checkpoint's config."""
    import diffusers

    import rapiddiff

    folder = checkpoint / "scheduler"
    for library, pipe in zip((diffusers, rapiddiff), pipes):
        pipe.scheduler = getattr(library, name).from_config(library.PNDMScheduler.load_config(folder))


# What `run_both` passes unless told otherwise (the text-to-image pipelines' quick parity call).
RUN_DEFAULTS = {"prompt": "a red cube on a table", "num_inference_steps": 2, "output_type": "np"}


def run_both(pipes, seed: int | list[int] = 0, *, defaults: dict = RUN_DEFAULTS, **kwargs) -> list:
    """Call (diffusers, rapiddiff) pipelines with the same arguments (`defaults` updated by `kwargs`) and fresh
    generators of the same seed(s)."""
    return [pipe(generator=seeded(seed), **(defaults | kwargs)) for pipe in pipes]


def assert_same_images(ref_out, our_out, atol: float = PIPELINE_ATOL) -> None:
    """Same images (within `atol` on "np" output) and the same safety-checker flags."""
    import numpy as np

    expected, actual = ref_out.images, our_out.images
    assert isinstance(actual, np.ndarray) and actual.shape == expected.shape and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)
    assert our_out.nsfw_content_detected == ref_out.nsfw_content_detected


# --- an offline Hugging Face cache holding folders written by the tests ---------------------------------------------
def fake_hub_cache(tmp_path, monkeypatch, repos: dict) -> None:
    """Make `repo_id -> local folder` loadable by Hub id, offline: each folder is copied into a Hub cache layout
    (models--org--name/snapshots/<commit>, refs/main) under tmp_path, and huggingface_hub is pointed at it."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo_id, folder in repos.items():
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
