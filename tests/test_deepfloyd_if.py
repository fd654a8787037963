"""DeepFloyd IF stages I and II (and the cascade into the x4 upscaler) against diffusers on tiny checkpoints written by
diffusers with variant "fp16" files and loaded as the benchmark loads them (variant="fp16", text_encoder=None)."""

from __future__ import annotations

import functools
import json
import string
from pathlib import Path

import conftest
import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import PIPELINE_ATOL, seeded
from diffusers.pipelines.deepfloyd_if import IFSafetyChecker as DIFSafetyChecker
from diffusers.pipelines.deepfloyd_if import IFWatermarker as DIFWatermarker
from transformers import CLIPConfig, CLIPImageProcessor, T5Config, T5EncoderModel, T5Tokenizer

import rapiddiff
from rapiddiff import (
    DiffusionPipeline,
    IFPipeline,
    IFPipelineOutput,
    IFSafetyChecker,
    IFSuperResolutionPipeline,
    IFWatermarker,
    StableDiffusionUpscalePipeline,
)
from rapiddiff.presets import PRESETS_DIR

CONFIGS = PRESETS_DIR
T5_DIM = 32
WORDS = "a red fox on the table blue hulk cat".split()

IF_I_UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=6,  # noise + learned variance
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    attention_head_dim=8,
    cross_attention_dim=32,
    cross_attention_norm="group_norm",
    encoder_hid_dim=T5_DIM,
    encoder_hid_dim_type="text_proj",
    addition_embed_type="text",
    addition_embed_type_num_heads=2,
    act_fn="gelu",
    resnet_time_scale_shift="scale_shift",
    norm_num_groups=8,
)
IF_II_UNET = dict(
    IF_I_UNET,
    sample_size=32,
    in_channels=6,  # the sample and the noised, upscaled stage-I image
    class_embed_type="timestep",
    resnet_skip_time_act=True,
    resnet_out_scale_factor=1.4142271248762552,
    mid_block_scale_factor=1.4142271248762552,
    time_embedding_act_fn="gelu",
    time_embedding_dim=64,
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models: intra-op threads buy nothing on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- tiny checkpoints ----------------------------------------------------------------------------------------------
def tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5 (unigram) tokenizer built offline: T5's special ids (pad 0, eos 1, unk 2), a few words and the letters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in WORDS] + [(c, -3.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5_encoder(vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def tiny_clip_config() -> CLIPConfig:
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=99)
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def tiny_watermarker() -> DIFWatermarker:
    """Diffusers' watermarker with a random RGBA mark (its default is all zeros: invisible)."""
    wm = DIFWatermarker()
    with torch.no_grad():
        wm.watermark_image.copy_(torch.randint(0, 256, (62, 62, 4), generator=torch.Generator().manual_seed(3)))
    return wm


def ddpm(name: str, subfolder: str) -> diffusers.DDPMScheduler:
    """The real checkpoint's scheduler config (thresholding, learned_range; lambda_min_clipped of another class)."""
    return diffusers.DDPMScheduler.from_config(
        json.loads((CONFIGS / name / subfolder / "scheduler_config.json").read_text())
    )


def if_components(unet_config: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    return dict(
        tokenizer=tokenizer,
        text_encoder=tiny_t5_encoder(len(tokenizer)),
        unet=diffusers.UNet2DConditionModel(**unet_config).eval(),
        safety_checker=DIFSafetyChecker(tiny_clip_config()).eval(),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        watermarker=tiny_watermarker(),
    )


# Diffusers 0.42.1's IFSafetyChecker cannot be loaded by transformers 5 (it never calls post_init): the reference
# pipelines get the checker they were saved with, in memory. rapiddiff loads it from the checkpoint.
REF_CHECKERS: dict[str, DIFSafetyChecker] = {}


@pytest.fixture(scope="module")
def if_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Diffusers IF-I and IF-II pipelines with every component (T5, safety checker, watermarker), saved as fp16
    variants (the weights stay float32: only the file names are the variant's)."""
    root = tmp_path_factory.mktemp("tiny-if")
    stage_1 = diffusers.IFPipeline(**if_components(IF_I_UNET, 0), scheduler=ddpm("IF-I-M-v1.0", "scheduler"))
    stage_2 = diffusers.IFSuperResolutionPipeline(
        **if_components(IF_II_UNET, 1),
        scheduler=ddpm("IF-II-M-v1.0", "scheduler"),
        image_noising_scheduler=ddpm("IF-II-M-v1.0", "image_noising_scheduler"),
    )
    for name, pipe in (("if-1", stage_1), ("if-2", stage_2)):
        pipe.save_pretrained(root / name, variant="fp16")
        REF_CHECKERS[str(root / name)] = pipe.safety_checker
    return root / "if-1", root / "if-2"


def load_pair(path: Path, variant: str | None = "fp16", **kwargs) -> tuple:
    """(diffusers, rapiddiff) pipelines, loaded by the generic DiffusionPipeline as the benchmark does."""
    checker = {"safety_checker": REF_CHECKERS[str(path)]} if str(path) in REF_CHECKERS else {}
    pipes = (
        diffusers.DiffusionPipeline.from_pretrained(path, variant=variant, **checker, **kwargs),
        DiffusionPipeline.from_pretrained(path, variant=variant, **kwargs),
    )
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module")
def stage_1(if_dirs):
    return load_pair(if_dirs[0], text_encoder=None)


@pytest.fixture(scope="module")
def stage_2(if_dirs):
    return load_pair(if_dirs[1], text_encoder=None)


@pytest.fixture(scope="module")
def embeds() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, 2, T5_DIM, generator=g), torch.randn(1, 2, T5_DIM, generator=g)


run_both = functools.partial(conftest.run_both, defaults={})  # IF's calls name every argument


def assert_same(actual, expected, what: str = "images") -> None:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=0, atol=PIPELINE_ATOL, err_msg=what)


def assert_same_pil(actual: list[PIL.Image.Image], expected: list[PIL.Image.Image], what: str = "images") -> None:
    """8-bit images: a value within ATOL of a rounding boundary may land one step away."""
    assert all(isinstance(i, PIL.Image.Image) for i in actual)
    a, e = (np.stack([np.asarray(i, dtype=np.int16) for i in images]) for images in (actual, expected))
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.abs(a - e).max() <= 1 and (a != e).mean() < 0.01, what


# --- loading -------------------------------------------------------------------------------------------------------
def test_loads_every_component(stage_1, stage_2):
    for (ref, ours), cls in zip((stage_1, stage_2), (IFPipeline, IFSuperResolutionPipeline)):
        assert type(ours) is cls
        assert ours.text_encoder is None and ours.tokenizer is not None
        assert isinstance(ours.safety_checker, IFSafetyChecker) and isinstance(ours.watermarker, IFWatermarker)
        for name in ("unet", "safety_checker", "watermarker"):
            ours_state, ref_state = getattr(ours, name).state_dict(), getattr(ref, name).state_dict()
            assert set(ours_state) == set(ref_state), name
            assert all(torch.equal(ours_state[k], v) for k, v in ref_state.items()), name
    assert stage_2[1].image_noising_scheduler.config.variance_type == "fixed_small"
    assert stage_2[1].config.requires_safety_checker is True


def test_float16_load_keeps_dtypes(if_dirs):
    pipe = DiffusionPipeline.from_pretrained(if_dirs[0], variant="fp16", text_encoder=None, torch_dtype=torch.float16)
    assert pipe.unet.dtype == pipe.safety_checker.dtype == torch.float16
    assert pipe.watermarker.watermark_image.dtype == torch.float16


def test_save_pretrained_loads_in_diffusers(stage_2, tmp_path):
    _, ours = stage_2
    ours.save_pretrained(tmp_path / "saved")
    again = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    assert type(again) is diffusers.IFSuperResolutionPipeline and isinstance(again.watermarker, DIFWatermarker)
    assert torch.equal(again.watermarker.watermark_image, ours.watermarker.watermark_image)
    checker = IFSafetyChecker.from_pretrained(tmp_path / "saved" / "safety_checker")
    assert all(torch.equal(v, checker.state_dict()[k]) for k, v in ours.safety_checker.state_dict().items())


# --- the cascade ---------------------------------------------------------------------------------------------------
def test_cascade_matches_diffusers(stage_1, stage_2, tiny_upscaler_dir, embeds):
    """The benchmark's calls (global seed, pt chaining, upscaler on the stage-I image), each stage chained on its own
    pipeline's output."""
    upscalers = load_pair(tiny_upscaler_dir, variant=None)
    assert type(upscalers[1]) is StableDiffusionUpscalePipeline
    pe, ne = embeds
    results = []
    for pipe_1, pipe_2, pipe_3 in zip(stage_1, stage_2, upscalers):
        torch.manual_seed(0)
        image = pipe_1(prompt_embeds=pe, negative_prompt_embeds=ne, output_type="pt", num_inference_steps=4).images
        image_2 = pipe_2(
            image=image, prompt_embeds=pe, negative_prompt_embeds=ne, output_type="pt", num_inference_steps=3
        ).images
        with pytest.warns(FutureWarning):  # both: a tensor in [-1, 1] is not normalised again
            image_3 = pipe_3(prompt="the blue hulk", image=image, noise_level=100, num_inference_steps=3).images
        results.append((image, image_2, image_3))
    (ref_1, ref_2, ref_3), (ours_1, ours_2, ours_3) = results
    assert ours_1.shape == (1, 3, 16, 16) and ours_2.shape == (1, 3, 32, 32)
    assert ours_1.min() < -0.5 and ours_1.max() > 0.5  # unclamped sample in [-1, 1]
    assert_same(ours_1, ref_1, "stage I")
    assert_same(ours_2, ref_2, "stage II")
    assert ours_3[0].size == (64, 64)
    assert_same_pil(ours_3, ref_3, "upscaler")


def test_guidance_off_and_numpy_output(stage_1, stage_2, embeds):
    pe, _ = embeds
    ref, ours = run_both(stage_1, prompt_embeds=pe, guidance_scale=1.0, output_type="np", num_inference_steps=3)
    assert isinstance(ours, IFPipelineOutput) and ours.images.shape == (1, 16, 16, 3)
    assert ours.images.min() >= 0 and ours.images.max() <= 1
    assert ours.nsfw_detected == ref.nsfw_detected and ours.watermark_detected == ref.watermark_detected
    assert_same(ours.images, ref.images)
    image = torch.from_numpy(ref.images).permute(0, 3, 1, 2) * 2 - 1
    ref_2, ours_2 = run_both(
        stage_2,
        image=image,
        prompt_embeds=pe,
        guidance_scale=1.0,
        output_type="pt",
        num_inference_steps=2,
        return_dict=False,
    )
    assert len(ours_2) == 3 and ours_2[1] is None and ours_2[2] is None
    assert_same(ours_2[0], ref_2[0])


def test_batch_images_per_prompt(stage_1, stage_2, embeds):
    pe, ne = embeds
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, output_type="pt", num_inference_steps=3)
    ref, ours = run_both(stage_1, seed=[1, 2], num_images_per_prompt=2, **kw)
    assert ours.images.shape == (2, 3, 16, 16)
    assert (ours.images[0] - ours.images[1]).abs().max() > 0.1
    assert_same(ours.images, ref.images)
    # Stage II takes one image per prompt: the two images with the prompt repeated, non-square.
    kw2 = dict(prompt_embeds=pe.repeat(2, 1, 1), negative_prompt_embeds=ne.repeat(2, 1, 1), output_type="pt")
    ref_2, ours_2 = run_both(stage_2, seed=3, image=ref.images, height=32, width=48, num_inference_steps=2, **kw2)
    assert ours_2.images.shape == (2, 3, 32, 48)
    assert_same(ours_2.images, ref_2.images)


def test_pil_output_is_safety_checked_and_watermarked(stage_2, embeds):
    pe, ne = embeds
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    ref, ours = run_both(
        stage_2, image=image, prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64, num_inference_steps=2
    )
    assert ours.images[0].size == (64, 64)
    assert ours.nsfw_detected == ref.nsfw_detected and ours.watermark_detected == ref.watermark_detected
    assert_same_pil(ours.images, ref.images)
    plain = stage_2[1](
        image=image,
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="np",
        generator=seeded(0),
    ).images
    marked = np.asarray(ours.images[0]).astype(int) != (plain[0] * 255).round().astype(int)
    assert marked.any() and not marked[:56].any()  # the mark sits in the bottom-right corner only


def test_added_kv_processors_give_the_same_output(stage_1, embeds):
    pe, ne = embeds
    _, ours = stage_1
    outputs = {}
    for processor in (rapiddiff.AttnAddedKVProcessor(), rapiddiff.AttnAddedKVProcessor2_0()):
        ours.unet.set_attn_processor(processor)
        outputs[type(processor).__name__] = ours(
            prompt_embeds=pe, negative_prompt_embeds=ne, output_type="pt", num_inference_steps=3, generator=seeded(5)
        ).images
    ours.unet.set_attn_processor(rapiddiff.AttnAddedKVProcessor2_0())
    vanilla, sdpa = outputs.values()
    assert_same(vanilla, sdpa, "AttnAddedKVProcessor vs AttnAddedKVProcessor2_0")
    ref = stage_1[0](
        prompt_embeds=pe, negative_prompt_embeds=ne, output_type="pt", num_inference_steps=3, generator=seeded(5)
    )
    assert_same(sdpa, ref.images, "vs diffusers")


def test_custom_timesteps_and_step_callback(stage_1, embeds):
    pe, ne = embeds
    calls: list[list] = [[], []]
    results = [
        pipe(
            prompt_embeds=pe,
            negative_prompt_embeds=ne,
            timesteps=[999, 600, 300, 100, 0],
            output_type="pt",
            generator=seeded(6),
            callback=lambda i, t, x, log=log: log.append((i, int(t), x.clone())),
            callback_steps=2,
        ).images
        for pipe, log in zip(stage_1, calls)
    ]
    assert [c[:2] for c in calls[1]] == [c[:2] for c in calls[0]] == [(0, 999), (2, 300), (4, 0)]
    assert_same(calls[1][1][2], calls[0][1][2], "callback latents")
    assert_same(results[1], results[0])


# --- T5 prompts ----------------------------------------------------------------------------------------------------
def test_t5_prompt_encoding(if_dirs):
    ref, ours = load_pair(if_dirs[0])
    assert type(ours.text_encoder).__name__ == "T5EncoderModel"
    prompt, negative = "  A Red fox ON the table ", "Blue Hulk"
    expected = ref.encode_prompt(prompt, negative_prompt=negative)
    actual = ours.encode_prompt(prompt, negative_prompt=negative)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape == (1, 77, T5_DIM)
        torch.testing.assert_close(a, e, rtol=0, atol=1e-5)
    # clean_caption=True, the default: both clean the prompts with beautifulsoup4 and ftfy (the test extra).
    prompt = "  A Red fox ON the table <b>at</b> https://example.com/fox.png &amp; @someone  "
    args = dict(prompt=prompt, negative_prompt=negative, output_type="pt", num_inference_steps=2)
    for clean in (True, False):
        ref_out = ref(**args, generator=seeded(0), clean_caption=clean)
        assert_same(ours(**args, generator=seeded(0), clean_caption=clean).images, ref_out.images)
    assert not np.allclose(ref_out.images, ref(**args, generator=seeded(0)).images)  # cleaning changed the prompt
    with pytest.raises(TypeError, match="clean_caption must be a bool"):
        ours(prompt=prompt, num_inference_steps=2, clean_caption="yes")


def test_encode_prompt_without_a_unet(if_dirs):
    """An encode-only pipeline (unet=None), as Diffusers' test_encode_prompt_works_in_isolation loads it."""
    ref, ours = load_pair(if_dirs[0], unet=None)
    assert ours.unet is None
    for a, e in zip(ours.encode_prompt("a red fox"), ref.encode_prompt("a red fox")):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-5)


# --- the safety checker and watermarker on their own -------------------------------------------------------------
def test_safety_checker_matches_diffusers(stage_1):
    ref, ours = (p.safety_checker for p in stage_1)
    clip_input = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        embeds = ref.vision_model(clip_input)[0]
        p_logits, w_logits = ref.p_head(embeds).flatten(), ref.w_head(embeds).flatten()
    thresholds = dict(p_threshold=p_logits.median().item(), w_threshold=w_logits.median().item())
    images = np.random.default_rng(0).random((6, 8, 8, 3)).astype(np.float32)
    ref_images, ref_nsfw, ref_wm = ref(clip_input=clip_input, images=images.copy(), **thresholds)
    our_images, nsfw, wm = ours(clip_input=clip_input, images=images, **thresholds)
    assert nsfw == ref_nsfw and wm == ref_wm and any(nsfw) and not all(nsfw) and any(wm)
    np.testing.assert_array_equal(our_images, ref_images)
    assert images[nsfw.index(True)].any()  # the input itself is left as it was


@pytest.mark.parametrize(
    "size, sample_size, marked",
    [
        ((256, 256), None, True),
        ((48, 80), None, True),
        ((64, 64), 32, True),  # larger than sample_size: measured as it is
        ((48, 80), 64, False),  # measured as 64x106: DeepFloyd's rule puts the mark outside the image
        ((16, 16), None, False),  # a mark of 0 pixels
    ],
)
def test_watermarker_matches_diffusers(stage_1, size, sample_size, marked):
    ref, ours = (p.watermarker for p in stage_1)
    rng = np.random.default_rng(1)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(2)]
    actual = ours.apply_watermark([i.copy() for i in images], sample_size)
    expected = ref.apply_watermark([i.copy() for i in images], sample_size) if size != (16, 16) else images
    for a, e, original in zip(actual, expected, images):
        assert np.array_equal(np.asarray(a), np.asarray(e))
        assert np.array_equal(np.asarray(a), np.asarray(original)) != marked


# --- bad input -----------------------------------------------------------------------------------------------------
@pytest.fixture
def no_unet_calls(stage_1, stage_2):
    """Fails the test if an ours UNet runs: bad input must be rejected before any heavy work."""
    calls = []
    hooks = [p[1].unet.register_forward_pre_hook(lambda *a: calls.append(1)) for p in (stage_1, stage_2)]
    yield
    for h in hooks:
        h.remove()
    assert not calls, "the UNet ran before the bad input was rejected"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt="a fox", prompt_embeds="pe", clean_caption=False), "exactly one of prompt and prompt_embeds"),
        (dict(), "exactly one of prompt and prompt_embeds, got neither"),
        (dict(prompt_embeds="pe", negative_prompt_embeds="ne2"), r"negative_prompt_embeds \(2, 2, 32\)"),
        (dict(prompt_embeds="pe", height=15), "height must be a multiple of 2 for this UNet, got 15"),
        (dict(prompt_embeds="pe", width=-16), "width must be a positive int, got -16"),
        (dict(prompt_embeds="pe", output_type="latent"), "output_type='latent' is not supported"),
        (dict(prompt_embeds="pe", callback_steps=0), "callback_steps must be a positive int, got 0"),
        (dict(prompt_embeds="pe", generator="g3"), "list of 3 generators"),
        (dict(prompt="a fox"), "no tokenizer/text_encoder"),
        (dict(prompt_embeds="pe"), "no tokenizer/text_encoder: pass prompt_embeds"),  # guidance needs negatives
        (dict(prompt_embeds="pe", cross_attention_kwargs={"scale": 0.5}), "cross_attention_kwargs"),
    ],
)
def test_stage_1_bad_input(stage_1, embeds, no_unet_calls, kwargs, match):
    values = {"pe": embeds[0], "ne2": embeds[1].repeat(2, 1, 1), "g3": seeded([0, 1, 2])}
    kwargs = {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        stage_1[1](num_inference_steps=2, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_level=-1), r"noise_level must be an int timestep .* in \[0, 1000\), got -1"),
        (dict(noise_level=1000), r"in \[0, 1000\), got 1000"),
        (dict(noise_level=2.5), "got 2.5"),
        (dict(image="rgba"), "image has 4 channels, this UNet .* takes 3-channel images"),
        (dict(image="two"), "image has batch size 2 but there are 1 prompts"),
        (dict(image="large"), "image is 64x64, larger than the output height x width 32x32"),
        (dict(image="uint8"), "floating point"),
        (dict(image=None), "image must be a torch.Tensor"),
        (dict(prompt_embeds="pe2"), r"negative_prompt_embeds \(1, 2, 32\) must have the same shape"),
    ],
)
def test_stage_2_bad_input(stage_2, embeds, no_unet_calls, kwargs, match):
    values = {
        "pe2": embeds[0].repeat(2, 1, 1),
        "rgba": torch.zeros(1, 4, 16, 16),
        "two": torch.zeros(2, 3, 16, 16),
        "large": torch.zeros(1, 3, 64, 64),
        "uint8": np.zeros((16, 16, 3), dtype=np.uint8),
    }
    args = dict(image=torch.zeros(1, 3, 16, 16), prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1])
    args |= {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        stage_2[1](num_inference_steps=2, **args)


def test_stage_2_image_forms_agree(stage_2, embeds):
    """PIL images map [0, 255] to [-1, 1]; arrays and tensors are taken as they are (Diffusers' rules)."""
    pe, ne = embeds
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    as_tensor = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, output_type="pt", num_inference_steps=2)
    outputs = [
        stage_2[1](image=image, generator=seeded(0), **kw).images
        for image in (PIL.Image.fromarray(pixels), as_tensor.permute(1, 2, 0).numpy(), [as_tensor], as_tensor[None])
    ]
    for other in outputs[1:]:
        assert_same(other, outputs[0], "image forms")
    expected = stage_2[0](image=PIL.Image.fromarray(pixels), generator=seeded(0), **kw).images
    assert_same(outputs[0], expected, "PIL vs diffusers")


def test_model_cpu_offload_keeps_the_images(if_dirs, embeds):
    """Diffusers' IF offload lists: the UNet offloaded, the safety checker moved when it runs, the watermarker kept
    on the accelerator (here device="cpu": the moves are recorded, the images must not change)."""
    pipe = DiffusionPipeline.from_pretrained(if_dirs[0], variant="fp16", text_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    pe, ne = embeds
    args = dict(prompt_embeds=pe, negative_prompt_embeds=ne, output_type="np", num_inference_steps=2)
    expected = pipe(generator=seeded(0), **args).images
    pipe.enable_model_cpu_offload(device="cpu")
    moves = []
    for name in ("unet", "safety_checker", "watermarker"):
        module, original = getattr(pipe, name), getattr(pipe, name).to
        module.to = lambda *a, _n=name, _o=original, **k: (moves.append((_n, str(a[0]))), _o(*a, **k))[1]
    np.testing.assert_array_equal(pipe(generator=seeded(0), **args).images, expected)
    assert moves == [("unet", "cpu:0"), ("safety_checker", "cpu:0"), ("unet", "cpu"), ("safety_checker", "cpu")]
