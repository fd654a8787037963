"""StableDiffusionSafetyChecker: a tiny checkpoint written by diffusers' class loads in ours and flags the same images."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.image_processor import VaeImageProcessor as DVaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import (
    StableDiffusionSafetyChecker as DSafetyChecker,
)
from transformers import CLIPConfig, CLIPImageProcessor

from rapiddiff.pipelines.safety_checker import StableDiffusionSafetyChecker, run_safety_checker

SIZE = 32


def _tiny_config() -> CLIPConfig:
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=99)
    vision = dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=SIZE, patch_size=8
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A diffusers checker whose concepts flag images 0 and 2 of `clip_input` (image 2 only via special care)."""
    torch.manual_seed(0)
    ref = DSafetyChecker(_tiny_config()).eval()
    clip_input = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        e = ref.visual_projection(ref.vision_model(clip_input)[1])
        ref.concept_embeds.normal_()
        ref.special_care_embeds.normal_()
        ref.concept_embeds_weights.fill_(2.0)  # unreachable thresholds...
        ref.special_care_embeds_weights.fill_(2.0)
        ref.concept_embeds[0] = e[0]  # ...except: image 0 is concept 0 (score 1 - 0.99 > 0)
        ref.concept_embeds_weights[0] = 0.99
        ref.concept_embeds[1] = e[2]  # image 2 is concept 1 but just under its threshold (score -0.004)...
        ref.concept_embeds_weights[1] = 1.004
        ref.special_care_embeds[1] = e[2]  # ...and a special-care concept, which lowers all thresholds by 0.01
        ref.special_care_embeds_weights[1] = 0.99
    path = tmp_path_factory.mktemp("ckpt") / "safety_checker"
    ref.save_pretrained(path)
    return ref, path, clip_input


def test_loads_diffusers_checkpoint(checkpoint):
    ref, path, _ = checkpoint
    ours = StableDiffusionSafetyChecker.from_pretrained(path, torch_dtype=torch.float32)
    assert set(ours.state_dict()) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    half = StableDiffusionSafetyChecker.from_pretrained(path, torch_dtype=torch.float16)
    assert half.dtype == torch.float16


@pytest.mark.parametrize("kind", ["pt", "np"])
def test_same_flags_and_black_images(checkpoint, kind, caplog):
    ref, path, clip_input = checkpoint
    ours = StableDiffusionSafetyChecker.from_pretrained(path)
    images = torch.rand(3, 3, 8, 12) if kind == "pt" else np.random.default_rng(0).random((3, 8, 12, 3), np.float32)
    original = images.copy() if kind == "np" else images.clone()
    with caplog.at_level(logging.WARNING):
        out, flags = ours(clip_input=clip_input, images=images)
    expected, ref_flags = ref(clip_input=clip_input, images=original.copy() if kind == "np" else original.clone())
    assert flags == ref_flags == [True, False, True]
    assert "NSFW" in caplog.text
    assert type(out) is type(expected)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(images), np.asarray(original))  # the input is left untouched
    out = np.asarray(out)
    assert not out[0].any() and not out[2].any()
    np.testing.assert_array_equal(out[1], np.asarray(original)[1])


def test_special_care_adjustment_matters(checkpoint):
    ref, path, clip_input = checkpoint
    ours = StableDiffusionSafetyChecker.from_pretrained(path)
    with torch.no_grad():
        ours.special_care_embeds_weights.fill_(2.0)
        ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
        ref.special_care_embeds_weights.fill_(2.0)
        _, ref_flags = ref(clip_input=clip_input, images=torch.zeros(3, 3, 4, 4))
        ref.load_state_dict(ref_state)
    assert ours.detect_nsfw(clip_input).tolist() == ref_flags == [True, False, False]


@pytest.mark.parametrize("kind", ["pt", "np"])
def test_run_safety_checker_matches_pipeline(checkpoint, kind):
    ref, path, _ = checkpoint
    ours = StableDiffusionSafetyChecker.from_pretrained(path)
    extractor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 40, 56, generator=g) * 2 - 1
    image[0] = image[0] * 0.1 - 0.8  # a dark, flat image and a noisy one
    if kind == "np":
        image = DVaeImageProcessor().postprocess(image, output_type="np")
    # diffusers' pipeline method, on a stand-in `self`
    fake = SimpleNamespace(safety_checker=ref, feature_extractor=extractor, image_processor=DVaeImageProcessor())
    copy = image.copy() if kind == "np" else image.clone()
    expected, ref_flags = StableDiffusionPipeline.run_safety_checker(fake, copy, "cpu", torch.float32)
    actual, flags = run_safety_checker(ours, extractor, image, "cpu", torch.float32)
    assert flags == ref_flags
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))
    # Force a flag on image 1 through its CLIP embedding, then both checkers must black it out.
    pil = DVaeImageProcessor().postprocess(image, "pil") if kind == "pt" else DVaeImageProcessor.numpy_to_pil(image)
    pixels = extractor(pil, return_tensors="pt").pixel_values
    with torch.no_grad():
        e = ours.visual_projection(ours.vision_model(pixels)[1])
        similarity = torch.nn.functional.cosine_similarity(e[0], e[1], dim=0).item()
        assert similarity < 0.95  # the two images are told apart
        ours.concept_embeds[5] = e[1]
        ours.concept_embeds_weights[5] = (1 + similarity) / 2
    actual, flags = run_safety_checker(ours, extractor, image, "cpu", torch.float32)
    assert flags == [False, True]
    assert not np.asarray(actual)[1].any()
    np.testing.assert_array_equal(np.asarray(actual)[0], np.asarray(image)[0])
    assert run_safety_checker(None, None, image, "cpu", torch.float32) == (image, None)
