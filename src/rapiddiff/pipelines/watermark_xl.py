"""Stability AI's invisible watermark on SDXL images, as Diffusers applies it (optional: `invisible-watermark`)."""

from __future__ import annotations

import importlib.util

import numpy as np
import torch


class StableDiffusionXLWatermarker:
    """Stability AI's invisible watermark on SDXL images (`pip install invisible-watermark`), as Diffusers applies it:
    the 48-bit message of the reference code, DWT-DCT, images of width 256 and above."""

    MESSAGE = 0b101100111110110010010000011110111011000110011110

    def __init__(self) -> None:
        from imwatermark import WatermarkEncoder

        self.encoder = WatermarkEncoder()
        self.encoder.set_watermark("bits", [int(bit) for bit in bin(self.MESSAGE)[2:]])

    def apply_watermark(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] < 256:
            return images
        pixels = (255 * (images / 2 + 0.5)).cpu().permute(0, 2, 3, 1).float().numpy()[..., ::-1]  # RGB -> BGR
        marked = np.array([self.encoder.encode(p, "dwtDct")[:, :, ::-1] for p in pixels])
        return torch.clamp(2 * (torch.from_numpy(marked).permute(0, 3, 1, 2) / 255 - 0.5), min=-1.0, max=1.0)


def make_watermarker(add_watermarker: bool | None) -> StableDiffusionXLWatermarker | None:
    """Diffusers' rule: None watermarks when `invisible-watermark` is installed; True requires it."""
    available = importlib.util.find_spec("imwatermark") is not None
    if add_watermarker is None:
        add_watermarker = available
    if add_watermarker and not available:
        raise ImportError("add_watermarker=True needs the invisible-watermark package: pip install invisible-watermark")
    return StableDiffusionXLWatermarker() if add_watermarker else None
