"""AutoencoderKL against diffusers' AutoencoderKL: encode, posterior sampling, decode, legacy keys, real configs."""

import json

import pytest
import safetensors.torch
import torch
from conftest import assert_close_rel
from diffusers import AutoencoderKL as DAutoencoderKL

from rapiddiff.configuration import ConfigError
from rapiddiff.models.attention_processor import AttnProcessor, AttnProcessor2_0
from rapiddiff.models.autoencoder_kl import AutoencoderKL
from rapiddiff.presets import PRESETS_DIR

CONFIGS = PRESETS_DIR
TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
    latent_channels=4,
    layers_per_block=2,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    ref = DAutoencoderKL(**TINY).eval()
    path = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(path)
    return ref, AutoencoderKL.from_pretrained(path), path


@pytest.fixture(scope="module")
def image():
    return torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("processor", [AttnProcessor, AttnProcessor2_0])
def test_encode_decode_match(pair, image, processor):
    ref, ours, _ = pair
    ours.set_attn_processor(processor())
    with torch.no_grad():
        expected = ref.encode(image).latent_dist
        actual = ours.encode(image).latent_dist
        for name in ("mean", "std", "var", "logvar"):
            assert_close_rel(getattr(actual, name), getattr(expected, name), what=name)
        assert actual.mean.shape == (2, 4, 20, 28)  # two blocks: one downsampling
        assert_close_rel(actual.mode(), expected.mode(), what="mode")

        z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(2))
        decoded = ours.decode(z).sample
        assert decoded.shape == (2, 3, 10, 14)
        assert_close_rel(decoded, ref.decode(z).sample, what="decode")
        assert_close_rel(ours.decode(z, return_dict=False)[0], decoded, 0, what="return_dict=False")
        assert_close_rel(ours(image).sample, ref(image).sample, what="forward")
    ours.set_default_attn_processor()


def test_posterior_sample_uses_diffusers_noise(pair, image):
    ref, ours, _ = pair
    with torch.no_grad():
        expected = ref.encode(image).latent_dist.sample(generator=torch.Generator().manual_seed(3))
        posterior = ours.encode(image).latent_dist
        actual = posterior.sample(generator=torch.Generator().manual_seed(3))
        assert_close_rel(actual, expected, what="sample")
        assert not torch.allclose(actual, posterior.mode())
        gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
        expected = ref.encode(image).latent_dist.sample(generator=gens)
        gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
        assert_close_rel(posterior.sample(generator=gens), expected, what="sample with a generator list")
        out = ours(image, sample_posterior=True, generator=torch.Generator().manual_seed(6)).sample
        ref_out = ref(image, sample_posterior=True, generator=torch.Generator().manual_seed(6)).sample
        assert_close_rel(out, ref_out, what="forward(sample_posterior=True)")


def test_slicing_gives_the_same_result(pair, image):
    _, ours, _ = pair
    z = torch.randn(3, 4, 5, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours.decode(z).sample
        mean = ours.encode(image).latent_dist.mean
        ours.enable_slicing()
        try:
            assert_close_rel(ours.decode(z).sample, full, 1e-5, what="sliced decode")
            assert_close_rel(ours.encode(image).latent_dist.mean, mean, 1e-5, what="sliced encode")
        finally:
            ours.disable_slicing()


def test_legacy_attention_keys_load(pair, image, tmp_path):
    ref, _, path = pair
    state = safetensors.torch.load_file(path / "diffusion_pytorch_model.safetensors")
    legacy = {}
    for k, v in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                v = v[:, :, None, None] if k.endswith("weight") and k.startswith("encoder") else v  # 1x1 conv form
        legacy[k] = v.contiguous()
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert legacy["encoder.mid_block.attentions.0.query.weight"].ndim == 4
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text((path / "config.json").read_text())
    safetensors.torch.save_file(legacy, folder / "diffusion_pytorch_model.safetensors")
    ours = AutoencoderKL.from_pretrained(folder)
    with torch.no_grad():
        assert_close_rel(ours(image).sample, ref(image).sample, what="legacy checkpoint")


def test_no_mid_attention_and_no_quant_convs(tmp_path, image):
    torch.manual_seed(0)
    kw = dict(TINY, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False, act_fn="gelu")
    ref = DAutoencoderKL(**kw).eval()
    ref.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    assert ours.quant_conv is None and not ours.attn_processors
    with torch.no_grad():
        assert_close_rel(ours(image).sample, ref(image).sample)


def test_config_round_trip_and_errors(pair, tmp_path):
    ref, ours, _ = pair
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in ref.config if not k.startswith("_")} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in ref.config.items() if not k.startswith("_")
    }
    assert DAutoencoderKL.from_pretrained(tmp_path).config.scaling_factor == ours.config.scaling_factor
    with pytest.raises(ConfigError, match="shift_factor"):
        AutoencoderKL(**TINY, shift_factor=0.1)
    with pytest.raises(ConfigError, match="down_block_types"):
        AutoencoderKL(**dict(TINY, down_block_types=("AttnDownEncoderBlock2D",) * 2))
    with pytest.raises(ConfigError, match="up_block_types"):
        AutoencoderKL(**dict(TINY, up_block_types=("UpDecoderBlock2D",)))
    with pytest.raises(ValueError, match="latent_channels|4"):
        ours.decode(torch.zeros(1, 3, 4, 4))


def test_force_upcast_decode(pair):
    _, ours, path = pair
    half = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float16)
    assert half.needs_upcasting and not ours.needs_upcasting
    z = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = half.decode_upcast(z.half())
        # float16 weights cast to float32 are exact: same as the float32 model on the rounded weights and latents
        expected = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float16).float().decode(z.half().float())
    assert out.dtype == torch.float32 and half.dtype == torch.float16
    assert_close_rel(out, expected.sample, 1e-6)


def test_float16_overflow_decodes_again_in_float32(pair, caplog):
    """SD pipelines decode in float16; a force_upcast VAE whose float16 decode overflows falls back to float32."""
    _, _, path = pair
    half = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float16)
    z = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(2)).half()
    with torch.no_grad():
        fine = half.decode_finite(z)
        assert fine.dtype == torch.float16 and torch.isfinite(fine).all()
        half.decoder.conv_out.weight.fill_(2000.0)  # pixels now overflow float16 (max 65504), not float32
        assert not torch.isfinite(half.decode(z).sample).all()
        recovered = half.decode_finite(z)
    assert torch.isfinite(recovered).all() and recovered.dtype == torch.float32
    assert half.dtype == torch.float16  # weights back in float16 after the float32 decode
    assert "decoding again in float32" in caplog.text


@pytest.mark.parametrize(
    ("name", "params", "sample"),
    [("stable-diffusion-v1-5", 83_653_863, 512), ("stable-diffusion-x4-upscaler", 55_325_927, 256)],
)
def test_real_configs_build_on_meta(name, params, sample):
    config = json.loads((CONFIGS / name / "vae" / "config.json").read_text())
    with torch.device("meta"):
        model = AutoencoderKL.from_config(config)
    assert model.num_parameters() == params
    assert model.config.sample_size == sample
    assert model.config.force_upcast is True
