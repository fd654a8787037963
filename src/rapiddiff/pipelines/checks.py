"""Argument checks shared by every pipeline's `__call__`: each names the argument, its value and what is allowed."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .image_processor import OUTPUT_TYPES


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_output_type(output_type: Any, allowed: Sequence[str] = OUTPUT_TYPES) -> None:
    if output_type not in allowed:
        raise ValueError(f"output_type={output_type!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def check_generator(generator: Any, batch_size: int) -> None:
    """One torch.Generator, or a list of one per image (batch_size = prompts x num_images_per_prompt)."""
    if isinstance(generator, list):
        if len(generator) != batch_size:
            raise ValueError(
                f"generator is a list of {len(generator)} generators, but the effective batch size (prompts x "
                f"num_images_per_prompt) is {batch_size}: pass one generator, or a list of {batch_size}"
            )
        bad = [g for g in generator if not isinstance(g, torch.Generator)]
    else:
        bad = [generator] if generator is not None and not isinstance(generator, torch.Generator) else []
    if bad:
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {bad[0]!r}")


def callback_tensor_names(callback: Any, names: Sequence[str] | None, allowed: Sequence[str]) -> list[str]:
    """Validate a step-end callback and the tensor names it asks for; Diffusers' callback objects name their own."""
    if callback is None:
        return []
    if not callable(callback):
        raise TypeError(f"callback_on_step_end must be callable(pipe, i, t, callback_kwargs), got {callback!r}")
    names = list(getattr(callback, "tensor_inputs", None) or names or [])
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs has unknown name(s) {unknown}; allowed: {list(allowed)}")
    return names


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> None:
    """A real number (not a bool, not a tensor: reading a tensor's value would sync with the device), within bounds."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {value!r}")
    if not math.isfinite(value):  # nan passes every comparison below; inf turns the result into nan
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def check_finite(name: str, tensor: Any) -> None:
    """A tensor input holds no nan/inf: one read of its values before the loop (never inside it), so that a bad input
    is an error naming it instead of an all-black image."""
    if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{name} has {bad} non-finite value(s) (nan or inf) out of {tensor.numel()}; pass finite values"
        )


def python_scalars(value: Any) -> Any:
    """numpy number scalars (np.float32(7.5), np.int64(30)) as Python numbers, also inside a list; anything else as
    it is. Diffusers takes them where it takes numbers; as Python numbers they also never enter a compiled graph's
    guards as tensors."""
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, list) and any(isinstance(v, (np.integer, np.floating)) for v in value):
        return [python_scalars(v) for v in value]
    return value


# --- request size against memory ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemoryRequest:
    """The least memory a denoising call needs, from shapes alone (docs/reliability.md):

        bytes = itemsize x latent_height x latent_width x (images x latent_channels + skips x model_batch x width)

    the initial latents (images = prompts x num_images_per_prompt) plus the UNet's full-resolution activations: its
    down path keeps `layers_per_block + 1` of them, each (model_batch, block_out_channels[0], h, w), for the up path,
    and one more is being computed (skips = layers_per_block + 2); model_batch is 2 x images with classifier-free
    guidance. Text encoder, VAE, attention and the lower resolutions come on top, so this is an underestimate: a call
    is refused only when even this cannot fit."""

    images: int
    model_batch: int
    latent_channels: int
    latent_height: int
    latent_width: int
    width: int
    skips: int
    itemsize: int

    @property
    def bytes(self) -> int:
        area = self.latent_height * self.latent_width
        return self.itemsize * area * (self.images * self.latent_channels + self.skips * self.model_batch * self.width)

    @classmethod
    def for_unet(cls, config: Any, images: int, guided: bool, height: int, width: int, scale_factor: int,
                 dtype: torch.dtype) -> MemoryRequest | None:  # fmt: skip
        """From a UNet config (object or dict: in_channels, block_out_channels, layers_per_block) and pixel sizes."""
        get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
        channels, blocks, layers = get("in_channels"), get("block_out_channels"), get("layers_per_block")
        layers = layers[0] if isinstance(layers, (list, tuple)) and layers else layers
        if not (isinstance(channels, int) and isinstance(blocks, (list, tuple)) and blocks and isinstance(layers, int)):
            return None
        return cls(images, images * (2 if guided else 1), channels, max(height // scale_factor, 1),
                   max(width // scale_factor, 1), int(blocks[0]), layers + 2, torch.empty((), dtype=dtype).element_size())  # fmt: skip


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes a new allocation can get, where): CUDA's free memory plus what torch's caching allocator holds unused;
    the host's MemAvailable (psutil where installed, else /proc/meminfo); None where unknown (MPS, other systems)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"{device}"
    if device.type != "cpu":
        return None, str(device)
    try:
        import psutil

        return int(psutil.virtual_memory().available), "the host"
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "the host"
    except (OSError, ValueError, IndexError):
        pass
    return None, "the host"


def check_memory(request: MemoryRequest | None, device: torch.device, what: str) -> None:
    """ValueError when `request` clearly cannot fit in the memory `device` has available, before any model runs."""
    if request is None:
        return
    available, where = available_memory(device)
    need = request.bytes
    if available is None or need <= available:
        return
    raise ValueError(
        f"{what} cannot fit: it needs at least {_gib(need)} ({request.images} image(s) of "
        f"{request.latent_height}x{request.latent_width} latents x {request.latent_channels} channels and the "
        f"UNet's full-resolution activations, batch {request.model_batch} x {request.width} channels x "
        f"{request.skips} tensors), but {where} has {_gib(available)} available; lower the image count or size"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def pixel_size(args: Any) -> tuple[int, int] | None:
    """The call's height and width in pixels: given (or resolved by the checks), else the input image's."""
    height, width = getattr(args, "height", None), getattr(args, "width", None)
    if isinstance(height, int) and isinstance(width, int):
        return height, width
    image = getattr(args, "image", None)
    image = image[0] if isinstance(image, (list, tuple)) and image else image
    if hasattr(image, "size") and isinstance(getattr(image, "width", None), int):  # PIL
        return image.height, image.width
    if isinstance(image, np.ndarray) and image.ndim >= 3:  # HWC / NHWC
        return int(image.shape[-3]), int(image.shape[-2])
    if isinstance(image, torch.Tensor) and image.ndim >= 3:  # CHW / NCHW
        return int(image.shape[-2]), int(image.shape[-1])
    return None


def check_call_memory(pipe: Any, args: Any) -> None:
    """The shared call check: a request whose latents and UNet activations cannot fit is refused before any model
    runs. An input image's size over the VAE factor is a lower bound of the latents (the x4 upscaler's are larger)."""
    unet, size = getattr(pipe, "unet", None), pixel_size(args)
    if unet is None or size is None:
        return
    vae = getattr(pipe, "vae", None)
    factor = getattr(pipe, "vae_scale_factor", 1) if vae is not None else 1
    guided = isinstance(args.guidance_scale, (int, float)) and args.guidance_scale > 1
    request = MemoryRequest.for_unet(unet.config, args.batch_size, guided, *size, factor, unet.dtype)
    check_memory(request, pipe._execution_device, f"this call ({args.batch_size} image(s) at {size[0]}x{size[1]})")


# --- image inputs -----------------------------------------------------------------------------------------------
def required(name: str, value: Any) -> Any:
    if value is None:
        raise ValueError(f"{name} is required: pass a PIL image, a numpy array, a torch tensor or a list of them")
    return value


def check_unet_in_channels(unet: Any, allowed: dict[int, str]) -> None:
    """The pipeline's UNet input fits: `allowed` maps each accepted in_channels to what it means."""
    channels = unet.config.in_channels
    if channels not in allowed:
        fits = "; ".join(f"{c} ({what})" for c, what in allowed.items())
        raise ValueError(f"unet.config.in_channels={channels} does not fit this pipeline; allowed: {fits}")


def batch_repeats(name: str, n: int, batch_size: int) -> int:
    """How often a batch of `n` images (or masks) is repeated to `batch_size` (prompts x num_images_per_prompt).

    Diffusers' rule: one image for all, or a batch that divides batch_size and is repeated (tiled).
    """
    if n < 1 or batch_size % n:
        raise ValueError(
            f"{name} has a batch of {n}, which does not fit the {batch_size} images to generate (prompts x "
            f"num_images_per_prompt); allowed: a batch that divides {batch_size}, e.g. 1 or {batch_size}"
        )
    return batch_size // n


def check_size_pair(name: str, value: Any, optional: bool = True) -> tuple[Any, Any] | None:
    """A (height, width) or (top, left) pair of numbers, as a tuple; None where allowed."""
    if value is None and optional:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair of numbers (a tuple of 2), got {value!r}")
    for v in value:
        check_number(name, v)
    return tuple(value)


def check_denoising_fraction(name: str, value: Any, one_allowed: bool = True) -> None:
    """denoising_start / denoising_end: None or a fraction of the schedule in (0, 1] ((0, 1) for a start)."""
    if value is None:
        return
    check_number(name, value, 0.0, 1.0)
    if value == 0 or (value == 1 and not one_allowed):
        allowed = "(0, 1]" if one_allowed else "(0, 1)"
        raise ValueError(f"{name}={value} leaves no steps; allowed: None or a fraction in {allowed}")


def warn_deprecated_callback_args(callback: Any, callback_steps: Any) -> None:
    """Diffusers' FutureWarnings for the SD pipelines' old per-step callback arguments (they still run)."""
    for name, value in (("callback", callback), ("callback_steps", callback_steps)):
        if value is not None:
            warnings.warn(
                f"`{name}` is deprecated and will be removed in version 1.0.0. Passing `{name}` as an "
                "input argument to `__call__` is deprecated, consider using `callback_on_step_end`",
                FutureWarning,
                stacklevel=4,
            )
