"""VaeImageProcessor against diffusers' VaeImageProcessor: every input kind, masks, postprocess, inpaint crops."""

import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor as DVaeImageProcessor

from rapiddiff.pipelines.image_processor import VaeImageProcessor

MASK_KW = dict(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
CONFIGS = [
    {},  # image processor of every SD pipeline
    dict(resample="bicubic", vae_scale_factor=4),  # x4 upscaler
    dict(do_convert_rgb=True, do_normalize=False),  # ControlNet conditioning images
]
PIL_CONFIGS = [*CONFIGS, MASK_KW]  # inpainting masks (array/tensor masks are tested on their own below)


def _pil(w: int, h: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return PIL.Image.fromarray(data[..., 0] if channels == 1 else data)


def _both(**kw):
    return VaeImageProcessor(**kw), DVaeImageProcessor(**kw)


def _check(kw, image, **call):
    ours, ref = _both(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # both warn for [-1, 1] tensors
        expected = ref.preprocess(image, **call)
        actual = ours.preprocess(image, **call)
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    return actual


@pytest.mark.parametrize("kw", PIL_CONFIGS)
def test_pil_inputs(kw):
    # non-square, not multiples of 8: default size rounds down; an explicit size too
    out = _check(kw, _pil(75, 50))
    f = kw.get("vae_scale_factor", 8)
    assert out.shape[-2:] == (50 - 50 % f, 75 - 75 % f)
    _check(kw, [_pil(75, 50, seed=1), _pil(40, 64, seed=2)], height=48, width=72)
    if kw.get("do_convert_rgb") or kw.get("do_convert_grayscale"):  # else rapiddiff converts where Diffusers does not
        _check(kw, _pil(33, 47, mode="L"))
        _check(kw, _pil(64, 40, mode="RGBA"))


@pytest.mark.parametrize("kw", CONFIGS[:2])
def test_rgba_images_are_made_rgb_never_latents(kw):
    """Diffusers reads a 4-channel RGBA image as latents (a 32x32 input decodes to 64x64 after img2img); here alpha is
    dropped, with a warning; gray images stay gray, as in Diffusers."""
    ours = VaeImageProcessor(**kw)
    rgba = _pil(64, 40, mode="RGBA")
    with pytest.warns(UserWarning, match="dropping the alpha channel"):
        out = ours.preprocess(rgba)
    assert out.shape == (1, 3, 40, 64)
    torch.testing.assert_close(out, ours.preprocess(rgba.convert("RGB")))
    gray = _pil(48, 40, mode="L")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ours.preprocess(gray).shape == (1, 1, 40, 48)
        assert ours.preprocess(gray.convert("P")).shape == (1, 3, 40, 48)  # palette indices are not an image
    with pytest.warns(UserWarning, match="mode LA"):
        assert ours.preprocess(gray.convert("LA")).shape == (1, 3, 40, 48)
    rgba_array = np.asarray(rgba).astype(np.float32) / 255
    with pytest.warns(UserWarning, match="numpy image with 4 channels"):
        torch.testing.assert_close(ours.preprocess(rgba_array), out)
    with pytest.raises(ValueError, match="5 channels is neither an RGB"):
        ours.preprocess(torch.rand(1, 5, 16, 16))
    assert ours.preprocess(torch.rand(1, 4, 8, 8)).shape == (1, 4, 8, 8)  # latents: tensors only, as documented


@pytest.mark.parametrize("kw", CONFIGS)
def test_numpy_inputs(kw):
    rng = np.random.default_rng(0)
    _check(kw, rng.random((50, 75, 3), dtype=np.float32))  # HWC
    _check(kw, rng.random((2, 40, 56, 3), dtype=np.float32))  # NHWC
    _check(kw, [rng.random((41, 57, 3)), rng.random((41, 57, 3))], height=32, width=48)  # float64 list
    _check(kw, rng.random((40, 56, 1), dtype=np.float32))
    _check(kw, rng.random((40, 56), dtype=np.float32))


@pytest.mark.parametrize("kw", CONFIGS)
def test_torch_inputs(kw):
    g = torch.Generator().manual_seed(0)
    _check(kw, torch.rand(3, 50, 75, generator=g))  # CHW in [0, 1]
    _check(kw, torch.rand(2, 3, 40, 56, generator=g) * 2 - 1)  # NCHW in [-1, 1]: not normalised again
    _check(kw, [torch.rand(3, 41, 57, generator=g), torch.rand(3, 41, 57, generator=g)], height=24, width=40)
    _check(kw, torch.rand(1, 40, 56, generator=g))


def test_latents_pass_through():
    latents = torch.randn(2, 4, 5, 7)
    out = _check({}, latents)
    assert torch.equal(out, latents)  # 4 channels = vae_latent_channels: not resized or normalised


def test_masks_are_grayscale_and_binary():
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    cases = [
        _pil(75, 50, mode="L"),
        _pil(75, 50, mode="RGB"),
        [_pil(60, 44, mode="L", seed=1), _pil(60, 44, mode="L", seed=2)],
        rng.random((40, 56), dtype=np.float32),
        rng.random((40, 56, 1), dtype=np.float32),
        rng.random((2, 40, 56), dtype=np.float32),
        torch.rand(40, 56, generator=g),
        torch.rand(2, 40, 56, generator=g),
        torch.rand(2, 1, 40, 56, generator=g),
        [torch.rand(40, 56, generator=g), torch.rand(40, 56, generator=g)],
    ]
    for mask in cases:
        out = _check(MASK_KW, mask)
        assert out.shape[1] == 1
        assert set(out.unique().tolist()) <= {0.0, 1.0}
    _check(MASK_KW, _pil(75, 50, mode="L"), height=32, width=64)


def test_binarize_leaves_input_untouched():
    mask = torch.rand(1, 1, 16, 24)
    before = mask.clone()
    VaeImageProcessor(do_resize=False, **MASK_KW).preprocess(mask)
    assert torch.equal(mask, before)


@pytest.mark.parametrize("resize_mode", ["fill", "crop"])
@pytest.mark.parametrize("size", [(64, 32), (32, 64)])
def test_resize_modes_and_crops(resize_mode, size):
    image = _pil(90, 60)
    h, w = size
    _check({}, image, height=h, width=w, resize_mode=resize_mode)
    _check({}, image, height=h, width=w, resize_mode=resize_mode, crops_coords=(10, 5, 70, 45))


def test_crop_region_and_overlay():
    ours, ref = _both(**MASK_KW)
    mask = PIL.Image.new("L", (96, 64))
    mask.paste(255, (30, 20, 50, 30))
    image, generated = _pil(96, 64, seed=1), _pil(48, 32, seed=2)
    for width, height, pad in [(64, 64, 0), (32, 64, 4), (96, 32, 8), (64, 48, 40)]:
        crop = ours.get_crop_region(mask, width, height, pad=pad)
        assert crop == ref.get_crop_region(mask, width, height, pad=pad)
        a = np.array(ours.apply_overlay(mask, image, generated, crop))
        b = np.array(ref.apply_overlay(mask, image, generated, crop))
        np.testing.assert_array_equal(a, b)
    empty = PIL.Image.new("L", (96, 64))
    assert ours.get_crop_region(empty, 64, 64) == ref.get_crop_region(empty, 64, 64)
    np.testing.assert_array_equal(
        np.array(ours.apply_overlay(mask, image, _pil(96, 64, seed=3))),
        np.array(ref.apply_overlay(mask, image, _pil(96, 64, seed=3))),
    )


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
@pytest.mark.parametrize("do_denormalize", [None, [True, False]])
def test_postprocess(output_type, do_denormalize):
    ours, ref = _both()
    image = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    a = ours.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
    b = ref.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
    if output_type == "pil":
        assert [i.size for i in a] == [(40, 24)] * 2
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.array(x), np.array(y))
    elif output_type == "np":
        assert a.shape == (2, 24, 40, 3) and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_grayscale_postprocess_and_helpers():
    ours, ref = _both(do_normalize=False)
    image = torch.rand(2, 1, 16, 24, generator=torch.Generator().manual_seed(0))
    for x, y in zip(ours.postprocess(image), ref.postprocess(image)):
        assert x.mode == y.mode == "L"
        np.testing.assert_array_equal(np.array(x), np.array(y))
    arr = ours.pt_to_numpy(image)
    np.testing.assert_array_equal(arr, ref.pt_to_numpy(image))
    torch.testing.assert_close(ours.numpy_to_pt(arr), ref.numpy_to_pt(arr))
    assert ours.get_default_height_width(_pil(75, 50)) == ref.get_default_height_width(_pil(75, 50)) == (48, 72)
    assert ours.get_default_height_width(image, height=30) == ref.get_default_height_width(image, height=30)
    assert ours.get_default_height_width(arr) == ref.get_default_height_width(arr)


def test_bad_inputs():
    proc = VaeImageProcessor()
    with pytest.raises(TypeError, match="image must be"):
        proc.preprocess("cat.png")
    with pytest.raises(TypeError, match="mixing"):
        proc.preprocess([_pil(8, 8), np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(TypeError, match="floating point"):
        proc.preprocess(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="do_convert_grayscale"):
        proc.preprocess(torch.rand(16, 16))
    with pytest.raises(ValueError, match="resize_mode"):
        proc.preprocess(_pil(16, 16), resize_mode="stretch")
    with pytest.raises(ValueError, match="need PIL"):
        proc.preprocess(torch.rand(3, 16, 16), resize_mode="fill")
    with pytest.raises(TypeError, match="torch.Tensor"):
        proc.postprocess(np.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="output_type"):
        proc.postprocess(torch.zeros(1, 3, 8, 8), output_type="numpy")
    with pytest.raises(ValueError, match="resample"):
        VaeImageProcessor(resample="box")
    with pytest.warns(FutureWarning, match="already"):
        out = proc.preprocess(torch.full((1, 3, 8, 8), -0.5))
    assert torch.equal(out, torch.full((1, 3, 8, 8), -0.5))  # taken to be in [-1, 1]: not normalised again
    with pytest.raises(ValueError, match="both"):
        VaeImageProcessor(do_convert_rgb=True, do_convert_grayscale=True)


@pytest.mark.parametrize("make", [lambda x: x, lambda x: x.permute(0, 2, 3, 1).numpy()], ids=["tensor", "array"])
def test_images_outside_the_value_range_are_refused(make):
    """Values in [-5, 5] or 0-255 are not images in [0, 1] / [-1, 1] (Diffusers encodes them as they are)."""
    processor = VaeImageProcessor(vae_scale_factor=8)
    x = torch.linspace(-5, 5, 3 * 16 * 16).reshape(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"image has values in \[-5, 5\]"):
        processor.preprocess(make(x))
    with pytest.raises(ValueError, match=r"image has values in \[0, 255\]"):
        processor.preprocess(make((x + 5) * 25.5))
    edge = (x / 5 * 1.005).clamp(-1.005, 1.005)  # rounding slack of a previous stage's [-1, 1] sample
    assert processor.preprocess(make(edge)).shape == (1, 3, 16, 16)
    # a processor that does not normalise (ControlNet's conditioning images) takes any range, as in Diffusers
    control = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    assert torch.equal(control.preprocess(make(x)), x)
