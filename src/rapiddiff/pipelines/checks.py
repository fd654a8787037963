"""Argument checks shared by every pipeline's `__call__`: each names the argument, its value and what is allowed."""

from __future__ import annotations

import math
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
