"""Image <-> tensor conversion for every pipeline, with Diffusers' VaeImageProcessor semantics.

`preprocess` turns PIL images, numpy arrays (HWC / NHWC in [0, 1]) or torch tensors (CHW / NCHW in [0, 1], or already
in [-1, 1]) and lists of them into one (B, C, H, W) float tensor in [-1, 1], resized to a multiple of the VAE factor.
`postprocess` turns the VAE's output back into PIL images, numpy arrays or tensors in [0, 1].

Masks use the same class configured as Diffusers' inpainting pipeline does:
`VaeImageProcessor(vae_scale_factor=f, do_normalize=False, do_binarize=True, do_convert_grayscale=True)`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from PIL import ImageFilter, ImageOps

from ..configuration import Config, ConfigError

PipelineImageInput = (
    PIL.Image.Image | np.ndarray | torch.Tensor | list[PIL.Image.Image] | list[np.ndarray] | list[torch.Tensor]
)

RESAMPLE = {
    "linear": PIL.Image.Resampling.BILINEAR,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
    "nearest": PIL.Image.Resampling.NEAREST,
}
RESIZE_MODES = ("default", "fill", "crop")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_IMAGE_CLASSES = (PIL.Image.Image, np.ndarray, torch.Tensor)
_IMAGE_TYPES = "a PIL.Image.Image, a numpy array, a torch.Tensor, or a list of one of these"


@dataclasses.dataclass(frozen=True)
class VaeImageProcessorConfig(Config):
    do_resize: bool = True
    vae_scale_factor: int = 8
    vae_latent_channels: int = 4
    resample: str = "lanczos"
    reducing_gap: int | None = None
    do_normalize: bool = True
    do_binarize: bool = False
    do_convert_rgb: bool = False
    do_convert_grayscale: bool = False

    def __post_init__(self) -> None:
        self.check_choice("resample", tuple(RESAMPLE))
        if self.do_convert_rgb and self.do_convert_grayscale:
            raise ConfigError("VaeImageProcessor: do_convert_rgb and do_convert_grayscale cannot both be True")
        if not isinstance(self.vae_scale_factor, int) or self.vae_scale_factor < 1:
            raise ConfigError(
                f"VaeImageProcessor: vae_scale_factor must be a positive int, got {self.vae_scale_factor!r}"
            )


class VaeImageProcessor:
    """Diffusers' VaeImageProcessor: same constructor arguments, methods and outputs."""

    def __init__(self, **kwargs: object):
        self.config = VaeImageProcessorConfig.from_dict(kwargs, source="VaeImageProcessor").with_owner(
            "VaeImageProcessor"
        )

    # --- format conversions ----------------------------------------------------------------------------------------
    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
        """(N, H, W, C) or (H, W, C) floats in [0, 1] -> PIL images (mode "L" for one channel)."""
        if images.ndim == 3:
            images = images[None]
        images = (images * 255).round().astype("uint8")
        if images.shape[-1] == 1:
            return [PIL.Image.fromarray(image[..., 0]) for image in images]
        return [PIL.Image.fromarray(image) for image in images]

    @staticmethod
    def pil_to_numpy(images: PIL.Image.Image | list[PIL.Image.Image]) -> np.ndarray:
        """PIL images of one size -> float32 (N, H, W, C) in [0, 1]; (N, H, W) for single-band images."""
        images = images if isinstance(images, list) else [images]
        return np.stack([np.array(image).astype(np.float32) / 255.0 for image in images], axis=0)

    @staticmethod
    def numpy_to_pt(images: np.ndarray) -> torch.Tensor:
        """(N, H, W, C) -> (N, C, H, W); (N, H, W) is taken as single-channel."""
        if images.ndim == 3:
            images = images[..., None]
        return torch.from_numpy(images.transpose(0, 3, 1, 2))

    @staticmethod
    def pt_to_numpy(images: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) on any device and dtype -> float32 (N, H, W, C) numpy array."""
        return images.cpu().permute(0, 2, 3, 1).float().numpy()

    @staticmethod
    def normalize(images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """[0, 1] -> [-1, 1]"""
        return 2.0 * images - 1.0

    @staticmethod
    def denormalize(images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> [0, 1], clamped."""
        return (images * 0.5 + 0.5).clamp(0, 1)

    @staticmethod
    def convert_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
        return image.convert("RGB")

    @staticmethod
    def convert_to_grayscale(image: PIL.Image.Image) -> PIL.Image.Image:
        return image.convert("L")

    @staticmethod
    def blur(image: PIL.Image.Image, blur_factor: int = 4) -> PIL.Image.Image:
        """Gaussian blur, e.g. to soften an inpainting mask's edge."""
        return image.filter(ImageFilter.GaussianBlur(blur_factor))

    def binarize(self, image: torch.Tensor) -> torch.Tensor:
        """Values below 0.5 -> 0, the rest -> 1 (a new tensor; the input is left as is)."""
        return (image >= 0.5).to(image.dtype)

    # --- sizes -----------------------------------------------------------------------------------------------------
    def get_default_height_width(
        self,
        image: PIL.Image.Image | np.ndarray | torch.Tensor,
        height: int | None = None,
        width: int | None = None,
    ) -> tuple[int, int]:
        """(height, width): the given ones or the image's (tensor NCHW, array NHW[C]), rounded down to a multiple of
        vae_scale_factor."""
        if isinstance(image, PIL.Image.Image):
            size = image.height, image.width
        elif isinstance(image, torch.Tensor):
            size = image.shape[2], image.shape[3]
        else:
            size = image.shape[1], image.shape[2]
        height = size[0] if height is None else height
        width = size[1] if width is None else width
        f = self.config.vae_scale_factor
        if height < f or width < f:  # rounding down would give a size of 0
            raise ValueError(
                f"image of {size[0]}x{size[1]} pixels (height x width; height={height}, width={width} used): both must "
                f"be at least the VAE's scale factor, {f}"
            )
        return height - height % f, width - width % f

    def input_size(self, image: PipelineImageInput) -> tuple[int, int]:
        """(height, width) of the first image of an input as given, before any resizing (e.g. to check that an
        inpainting mask has the size of its image). Arrays are (N)HW(C), tensors (N)(C)HW, as `preprocess` reads them."""
        first = self._as_list(image)[0]
        if isinstance(first, PIL.Image.Image):
            return first.height, first.width
        if isinstance(first, np.ndarray):
            return tuple(first.shape[:2] if first.ndim in (2, 3) else first.shape[1:3])
        return tuple(first.shape[-2:])

    def resize(
        self,
        image: PIL.Image.Image | np.ndarray | torch.Tensor,
        height: int,
        width: int,
        resize_mode: str = "default",
    ) -> PIL.Image.Image | np.ndarray | torch.Tensor:
        """PIL: the configured filter ("fill"/"crop" keep the aspect ratio). Tensors (NCHW) and arrays (NHWC): nearest.

        "fill" centres the resized image and stretches its edge rows/columns into the borders; "crop" centres it on
        black and cuts what overflows. Both are PIL-only, as in Diffusers.
        """
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={resize_mode!r} is not supported; allowed: {', '.join(RESIZE_MODES)}")
        if resize_mode != "default" and not isinstance(image, PIL.Image.Image):
            raise ValueError(f"resize_mode={resize_mode!r} needs PIL images, got {type(image).__name__}")
        if isinstance(image, PIL.Image.Image):
            if resize_mode == "fill":
                return self._resize_and_fill(image, width, height)
            if resize_mode == "crop":
                return self._resize_and_crop(image, width, height)
            return image.resize((width, height), resample=self._resample, reducing_gap=self.config.reducing_gap)
        if isinstance(image, np.ndarray):
            return self.pt_to_numpy(F.interpolate(self.numpy_to_pt(image), size=(height, width)))
        return F.interpolate(image, size=(height, width))

    @property
    def _resample(self) -> PIL.Image.Resampling:
        return RESAMPLE[self.config.resample]

    def _fit(self, image: PIL.Image.Image, width: int, height: int, cover: bool) -> tuple[PIL.Image.Image, int, int]:
        """Resize keeping the aspect ratio, to fit inside (cover=False) or cover (cover=True) width x height."""
        ratio, src_ratio = width / height, image.width / image.height
        match_width = ratio > src_ratio if cover else ratio < src_ratio
        src_w = width if match_width else image.width * height // image.height
        src_h = height if not match_width else image.height * width // image.width
        return image.resize((src_w, src_h), resample=self._resample), src_w, src_h

    def _resize_and_crop(self, image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
        resized, src_w, src_h = self._fit(image, width, height, cover=True)
        out = PIL.Image.new("RGB", (width, height))
        out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return out

    def _resize_and_fill(self, image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
        resized, src_w, src_h = self._fit(image, width, height, cover=False)
        out = PIL.Image.new("RGB", (width, height))
        out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        ratio, src_ratio = width / height, image.width / image.height
        if ratio < src_ratio:  # bands above and below: stretch the first and last rows
            band = height // 2 - src_h // 2
            if band > 0:
                out.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
                rows = (0, resized.height, width, resized.height)
                out.paste(resized.resize((width, band), box=rows), box=(0, band + src_h))
        elif ratio > src_ratio:  # bands left and right: stretch the first and last columns
            band = width // 2 - src_w // 2
            if band > 0:
                out.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
                cols = (resized.width, 0, resized.width, height)
                out.paste(resized.resize((band, height), box=cols), box=(band + src_w, 0))
        return out

    # --- preprocess / postprocess ----------------------------------------------------------------------------------
    def preprocess(
        self,
        image: PipelineImageInput,
        height: int | None = None,
        width: int | None = None,
        resize_mode: str = "default",
        crops_coords: tuple[int, int, int, int] | None = None,
    ) -> torch.Tensor:
        """Any supported image input -> (B, C, H, W) tensor, normalised to [-1, 1] if configured.

        Tensors whose channel count equals vae_latent_channels are taken to be latents and returned untouched; other
        tensors must have 3 (RGB) or 1 (gray) channels. PIL images and numpy arrays are always images, never latents
        (Diffusers reads a 4-channel RGBA image as latents): unless the processor converts them itself
        (do_convert_rgb / do_convert_grayscale), images with an alpha channel (RGBA, LA, transparent palettes) lose
        it with a warning (as PIL's `convert("RGB")`: colour values kept, not composited on a background), and other
        multi-band PIL modes (palette, CMYK, YCbCr...) are converted to RGB.
        Tensors with negative values are taken to be in [-1, 1] already (not normalised again; Diffusers warns).
        """
        images = self._as_list(image)
        first = images[0]
        if isinstance(first, PIL.Image.Image):
            batch = self._preprocess_pil(images, height, width, resize_mode, crops_coords)
        else:
            if resize_mode != "default" or crops_coords is not None:
                raise ValueError(
                    f"resize_mode={resize_mode!r} and crops_coords={crops_coords!r} need PIL images, "
                    f"got {type(first).__name__}"
                )
            if isinstance(first, np.ndarray):
                batch = self._as_rgb(self.numpy_to_pt(np.concatenate(images) if first.ndim == 4 else np.stack(images)))
            else:
                batch = torch.cat(images) if first.ndim == 4 else torch.stack(images)
                if batch.ndim == 3:  # a stack of (H, W) masks
                    batch = batch.unsqueeze(1)
                if batch.shape[1] == self.config.vae_latent_channels:
                    return batch
                self._check_tensor_channels(batch)
            if self.config.do_normalize:  # pixels on their way to a VAE / UNet; not ControlNet's conditioning inputs
                check_image_range(batch)
            if self.config.do_resize:
                batch = self.resize(batch, *self.get_default_height_width(batch, height, width))

        do_normalize = self.config.do_normalize
        if do_normalize and batch.min() < 0:
            warnings.warn(
                f"VaeImageProcessor.preprocess: the image has values in [{batch.min()}, {batch.max()}]; images with "
                "negative values are taken to be in [-1, 1] already and are not normalised. Pass images in [0, 1].",
                FutureWarning,
                stacklevel=2,
            )
            do_normalize = False
        if do_normalize:
            batch = self.normalize(batch)
        if self.config.do_binarize:
            batch = self.binarize(batch)
        return batch

    def _preprocess_pil(
        self,
        images: list[PIL.Image.Image],
        height: int | None,
        width: int | None,
        resize_mode: str,
        crops_coords: tuple[int, int, int, int] | None,
    ) -> torch.Tensor:
        if crops_coords is not None:
            images = [i.crop(crops_coords) for i in images]
        if self.config.do_resize:
            height, width = self.get_default_height_width(images[0], height, width)
            images = [self.resize(i, height, width, resize_mode=resize_mode) for i in images]
        if self.config.do_convert_rgb:
            images = [self.convert_to_rgb(i) for i in images]
        elif self.config.do_convert_grayscale:
            images = [self.convert_to_grayscale(i) for i in images]
        elif any(_needs_rgb(i) for i in images):
            alpha = sorted({i.mode for i in images if i.has_transparency_data})
            if alpha:
                _warn_alpha_dropped(f"PIL image(s) of mode {', '.join(alpha)}")
            images = [self.convert_to_rgb(i) if _needs_rgb(i) else i for i in images]
        sizes = {i.size for i in images}
        if len(sizes) > 1:
            raise ValueError(f"image: the PIL images have different sizes {sorted(sizes)} and do_resize is False")
        return self.numpy_to_pt(self.pil_to_numpy(images))

    def _as_rgb(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) from a numpy image: RGB and gray as they are, RGBA and gray + alpha without their alpha (with
        a warning). A grayscale processor (masks) takes it as it is."""
        channels = batch.shape[1]
        if self.config.do_convert_grayscale or channels in (1, 3):
            return batch
        if channels not in (2, 4):
            raise ValueError(
                f"image: a numpy image has {channels} channels; allowed: 3 (RGB), 4 (RGBA), 1 (gray) or 2 (gray + alpha)"
            )
        _warn_alpha_dropped(f"a numpy image with {channels} channels")
        return batch[:, : channels - 1]

    def _check_tensor_channels(self, batch: torch.Tensor) -> None:
        if self.config.do_convert_grayscale or batch.shape[1] in (1, 3):
            return
        raise ValueError(
            f"image: a tensor with {batch.shape[1]} channels is neither an RGB (3) or gray (1) image nor latents "
            f"({self.config.vae_latent_channels} channels, the VAE's); pass RGBA or grayscale images as PIL images or "
            "numpy arrays, which are converted to RGB"
        )

    def _as_list(self, image: PipelineImageInput) -> list:
        """Validate the input and return a list of same-typed images (4-D batches stay whole)."""
        if isinstance(image, (np.ndarray, torch.Tensor)) and self.config.do_convert_grayscale and image.ndim == 3:
            # A 3-D grayscale input is (N, H, W) or (1, H, W) / (H, W, 1): add the missing channel or batch axis.
            if isinstance(image, torch.Tensor):
                image = image.unsqueeze(1)
            else:
                image = image[None] if image.shape[-1] == 1 else image[..., None]
        images = image if isinstance(image, list) else [image]
        if not images:
            raise ValueError("image: got an empty list")
        base = next((t for t in _IMAGE_CLASSES if isinstance(images[0], t)), None)
        if base is None:
            where = " in a list" if isinstance(image, list) else ""
            raise TypeError(f"image must be {_IMAGE_TYPES}; got {type(images[0]).__name__}{where}")
        if not all(isinstance(i, base) for i in images):
            kinds = sorted({type(i).__name__ for i in images})
            raise TypeError(f"image must be {_IMAGE_TYPES}; got a list mixing {kinds}")
        if base is PIL.Image.Image:
            return images
        ndims = {i.ndim for i in images}
        if len(ndims) > 1 or not ndims <= {2, 3, 4}:
            raise ValueError(f"image: arrays/tensors must all be 2-D or 3-D images or 4-D batches, got ndim {ndims}")
        floating = np.issubdtype(images[0].dtype, np.floating) if base is np.ndarray else images[0].is_floating_point()
        if not floating:
            raise TypeError(
                f"image: arrays and tensors must be floating point in [0, 1], got dtype {images[0].dtype} "
                "(convert 8-bit images with `image / 255.0`)"
            )
        if base is torch.Tensor and ndims == {2} and not self.config.do_convert_grayscale:
            raise ValueError(
                "image: a 2-D tensor is a grayscale image, which needs do_convert_grayscale=True; "
                "pass color tensors as (C, H, W) or (B, C, H, W)"
            )
        return images

    def postprocess(
        self,
        image: torch.Tensor,
        output_type: str = "pil",
        do_denormalize: list[bool] | None = None,
    ) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """(B, C, H, W) tensor -> output_type: "pil" (list of images), "np" (B, H, W, C float32), "pt", "latent"
        (returned as is). do_denormalize: per image whether to map [-1, 1] to [0, 1]; default config.do_normalize."""
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"image must be a torch.Tensor of shape (B, C, H, W), got {type(image).__name__}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; allowed: {', '.join(OUTPUT_TYPES)}")
        if output_type == "latent":
            return image
        if do_denormalize is None:
            image = self.denormalize(image) if self.config.do_normalize else image
        else:
            if len(do_denormalize) != image.shape[0]:
                raise ValueError(f"do_denormalize has {len(do_denormalize)} entries for a batch of {image.shape[0]}")
            image = torch.stack([self.denormalize(x) if d else x for x, d in zip(image, do_denormalize)])
        if output_type == "pt":
            return image
        image = self.pt_to_numpy(image)
        return image if output_type == "np" else self.numpy_to_pil(image)

    # --- inpainting with a crop around the mask (padding_mask_crop) ------------------------------------------------
    @staticmethod
    def get_crop_region(
        mask_image: PIL.Image.Image, width: int, height: int, pad: int = 0
    ) -> tuple[int, int, int, int]:
        """(x1, y1, x2, y2): the box around the mask's non-zero pixels plus `pad`, grown to the width:height ratio."""
        mask = np.array(mask_image.convert("L"))
        h, w = mask.shape
        cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
        # An empty mask behaves as in Diffusers: every row/column counts as empty from both sides.
        left, right = (cols[0], w - 1 - cols[-1]) if cols.size else (w, w)
        top, bottom = (rows[0], h - 1 - rows[-1]) if rows.size else (h, h)
        x1, y1 = int(max(left - pad, 0)), int(max(top - pad, 0))
        x2, y2 = int(min(w - right + pad, w)), int(min(h - bottom + pad, h))
        target = width / height
        if (x2 - x1) / (y2 - y1) > target:
            y1, y2 = _grow_span(y1, y2, (x2 - x1) / target, mask_image.height)
        else:
            x1, x2 = _grow_span(x1, x2, (y2 - y1) * target, mask_image.width)
        return x1, y1, x2, y2

    def apply_overlay(
        self,
        mask: PIL.Image.Image,
        init_image: PIL.Image.Image,
        image: PIL.Image.Image,
        crop_coords: tuple[int, int, int, int] | None = None,
    ) -> PIL.Image.Image:
        """Paste the generated `image` (into `crop_coords` if given) under the unmasked part of `init_image`."""
        width, height = init_image.width, init_image.height
        kept = PIL.Image.new("RGBa", (width, height))
        kept.paste(init_image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
        kept = kept.convert("RGBA")
        if crop_coords is not None:
            x, y, x2, y2 = crop_coords
            base = PIL.Image.new("RGBA", (width, height))
            base.paste(self.resize(image, height=y2 - y, width=x2 - x, resize_mode="crop"), (x, y))
            image = base.convert("RGB")
        image = image.convert("RGBA")
        image.alpha_composite(kept)
        return image.convert("RGB")


def _needs_rgb(image: PIL.Image.Image) -> bool:
    """Whether a PIL image must be converted to RGB to be read as one: anything but RGB and single-band gray."""
    return image.mode != "RGB" and not (len(image.getbands()) == 1 and image.mode != "P")


def _warn_alpha_dropped(what: str) -> None:
    warnings.warn(
        f"image: {what} converted to RGB by dropping the alpha channel (colour values kept as they are, not "
        "composited on a background); pass RGB images to choose another conversion",
        UserWarning,
        stacklevel=4,
    )


def _grow_span(lo: int, hi: int, length: float, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) symmetrically to `length`, shifted back inside [0, limit]."""
    diff = int(length - (hi - lo))
    lo, hi = lo - diff // 2, hi + diff - diff // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


# Rounding slack around [-1, 1] (a float16 sample of a previous stage may end a hair outside it).
RANGE_TOLERANCE = 1e-2


def check_image_range(batch: torch.Tensor) -> None:
    """An image tensor or array must hold values in [0, 1] (or [-1, 1]: taken as normalised already). Values beyond
    (0-255 pixel values, unnormalised features) would reach the VAE as they are: a ValueError names the range found.
    Diffusers takes them silently. Non-finite values are left to the finiteness check, which names them. Only for
    processors that normalise: a ControlNet conditioning image (`do_normalize=False`) is a model input of any range,
    taken as given as in Diffusers."""
    if not batch.is_floating_point() or batch.numel() == 0:
        return
    low, high = float(batch.min()), float(batch.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        return
    if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"image has values in [{low:g}, {high:g}]; image tensors and arrays must be in [0, 1] (or [-1, 1], taken as "
            "normalised already): rescale it (0-255 pixel values: divide by 255)"
        )
