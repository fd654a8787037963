"""Memory layout at block boundaries: a block returns its map in the memory format of its input.

A model in the default (contiguous) format must never hand a convolution a channels_last-strided activation: the
convolution would then convert it (a copy) or pick a slower kernel, every call. Folding (B, H*W, C) tokens back into
a (B, C, H, W) map with a permute yields channels_last strides; `residual_add` / `tokens_to_map` put the result in
the layout of the block's input, which is the layout of the model's weights (the first convolution sets it). In a
channels_last model the permuted view already is channels_last: nothing is copied.
"""

from __future__ import annotations

import torch


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last if `x` (4-D) is laid out so and not also plain contiguous, else contiguous_format."""
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def tokens_to_map(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) with `like`'s shape and memory format (a copy only where they differ)."""
    b, _, h, w = like.shape
    x = tokens.unflatten(1, (h, w)).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=memory_format_of(like))


def residual_add(residual: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`residual` (B, C, H, W) + (B, H*W, C) tokens folded back, in the residual's memory format, as one kernel.

    The residual goes first: an elementwise op lays its output out as its first operand where layouts disagree."""
    b, _, h, w = residual.shape
    out = residual + tokens.unflatten(1, (h, w)).permute(0, 3, 1, 2)
    return out.contiguous(memory_format=memory_format_of(residual))  # no copy unless the rule above changes
