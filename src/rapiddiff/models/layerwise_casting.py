"""Layerwise casting (Diffusers' `ModelMixin.enable_layerwise_casting`): weights stored in a small dtype (float8,
float16), each layer cast to the compute dtype just for its own forward and back afterwards.

Applied to the leaf layers Diffusers applies it to (Linear, Conv*, ConvTranspose*, Embedding), skipping the modules
whose dotted name matches a pattern (by default Diffusers': positional/patch embeddings, norms, `proj_in` /
`proj_out`, plus the model's own `_skip_layerwise_casting_patterns`), as Diffusers does: a skipped module's whole
subtree keeps its dtype. The casts run in forward hooks, so this is an eager-mode memory saving (as in Diffusers): weights change during the
forward, which a compiled graph does not capture in one piece.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

DEFAULT_SKIP_MODULES_PATTERN = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")
SUPPORTED_LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.Embedding,
)


@dataclasses.dataclass(frozen=True)
class LayerwiseCasting:
    """What a model's layers are stored in and computed in (kept on the model while enabled)."""

    storage_dtype: torch.dtype
    compute_dtype: torch.dtype
    layers: tuple[str, ...]


def layerwise_casting(model: nn.Module) -> LayerwiseCasting | None:
    return model.__dict__.get("_layerwise_casting")


def _check_dtype(name: str, value: Any) -> None:
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"enable_layerwise_casting: {name} must be a floating-point torch.dtype, got {value!r}")


def enable(
    model: nn.Module,
    storage_dtype: torch.dtype = torch.float8_e4m3fn,
    compute_dtype: torch.dtype | None = None,
    skip_modules_pattern: Sequence[str] | None = None,
    skip_modules_classes: Sequence[type[nn.Module]] | None = None,
    non_blocking: bool = False,
) -> LayerwiseCasting:
    """Store the model's castable layers in `storage_dtype`, run each in `compute_dtype` (default: the model's dtype
    now); returns what was applied."""
    if layerwise_casting(model) is not None:
        raise RuntimeError(f"{type(model).__name__}: layerwise casting is already enabled")
    compute_dtype = compute_dtype if compute_dtype is not None else model.dtype
    _check_dtype("storage_dtype", storage_dtype)
    _check_dtype("compute_dtype", compute_dtype)
    patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN if skip_modules_pattern is None else skip_modules_pattern)
    patterns += tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    patterns += tuple(getattr(model, "_skip_layerwise_casting_patterns", None) or ())
    compiled = [re.compile(p) for p in dict.fromkeys(patterns)]
    classes = tuple(skip_modules_classes or ())

    def pre(module: nn.Module, args: Any) -> None:
        module.to(dtype=compute_dtype, non_blocking=non_blocking)

    def post(module: nn.Module, args: Any, output: Any) -> Any:
        module.to(dtype=storage_dtype, non_blocking=non_blocking)
        return output

    layers = []

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, classes) or any(p.search(prefix) for p in compiled):
            return
        if isinstance(module, SUPPORTED_LAYERS):
            module.to(dtype=storage_dtype, non_blocking=non_blocking)
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)
            layers.append(prefix)
            return
        for name, child in module.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name)

    visit(model, "")
    state = LayerwiseCasting(storage_dtype, compute_dtype, tuple(layers))
    model.__dict__["_layerwise_casting"] = state
    return state
