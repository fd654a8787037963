"""Gradient checkpointing (Diffusers' `enable_gradient_checkpointing`): while gradients are recorded, a model's blocks
keep only their inputs and recompute their activations in the backward pass (less memory for training, one more
forward of each block). Each model names the blocks it checkpoints (`_checkpointed_blocks`); a block so enabled has
`gradient_checkpointing = True` and runs through `torch.utils.checkpoint` (non-reentrant), or the function given.
Without gradients (inference, `torch.no_grad()`) nothing changes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn


def enable(model: nn.Module, blocks: tuple[type[nn.Module], ...], func: Callable[..., Any] | None = None) -> None:
    if not blocks:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    checkpoint = func or functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for module in model.modules():
        if isinstance(module, blocks):
            forward = type(module).forward.__get__(module)

            def run(*args: Any, _forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
                if torch.is_grad_enabled():
                    return checkpoint(_forward, *args, **kwargs)
                return _forward(*args, **kwargs)

            module.gradient_checkpointing = True
            module.forward = run  # an instance attribute: the class's forward again once disabled


def disable(model: nn.Module) -> None:
    for module in model.modules():
        if module.__dict__.get("gradient_checkpointing"):
            module.gradient_checkpointing = False
            module.__dict__.pop("forward", None)


def enabled(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
