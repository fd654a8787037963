"""Argument checks shared by every pipeline's `__call__`: each names the argument, its value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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
