"""The spatial transformer of the Stable Diffusion UNet (Diffusers' `Transformer2DModel` on continuous input).

GroupNorm -> proj_in (1x1 conv, or linear for SD 2.x) -> N x BasicTransformerBlock over the H*W tokens -> proj_out,
plus the input as residual. Each block: self-attention, cross-attention on the text, GEGLU feed-forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention_processor import Attention
from .layout import residual_add


def conv1x1_on_tokens(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to tokens (B, L, C) as the same linear map; a LoRA-carrying conv adds its path."""
    forward_tokens = getattr(conv, "forward_tokens", None)
    if forward_tokens is not None:
        return forward_tokens(x)
    # `.to` is a no-op unless the weights are stored in another dtype (layerwise casting: this path skips the conv's
    # forward and so its casting hooks).
    bias = conv.bias.to(x.dtype) if conv.bias is not None else None
    return F.linear(x, conv.weight.flatten(1).to(x.dtype), bias)


class GEGLU(nn.Module):
    """Linear to 2*inner, then value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with Diffusers' keys `net.0.proj` and `net.2` (net.1 is the dropout slot)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm residual block: attn1 (self, or cross with only_cross_attention), attn2 (cross), ff."""

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        attn = dict(query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim)
        self.norm1 = nn.LayerNorm(dim)
        # With only_cross_attention the first layer attends to the text too (x4 upscaler).
        self_kv_dim = cross_attention_dim if only_cross_attention else None
        self.attn1 = Attention(**attn, cross_attention_dim=self_kv_dim, upcast_attention=upcast_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(**attn, cross_attention_dim=cross_attention_dim, upcast_attention=upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, L, C), encoder_hidden_states (B, S, Ctext) -> (B, L, C)."""
        kwargs = cross_attention_kwargs or {}
        x = hidden_states
        context1 = encoder_hidden_states if self.only_cross_attention else None
        x = x + self.attn1(self.norm1(x), context1, attention_mask=attention_mask, **kwargs)
        x = x + self.attn2(self.norm2(x), encoder_hidden_states, attention_mask=encoder_attention_mask, **kwargs)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Transformer over the pixels of a feature map (B, C, H, W) -> (B, C, H, W), residual included."""

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        cross_attention_dim: int,
        num_layers: int = 1,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)

        def proj(cin: int, cout: int) -> nn.Module:
            return nn.Linear(cin, cout) if use_linear_projection else nn.Conv2d(cin, cout, 1)

        self.proj_in = proj(in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner,
                num_attention_heads,
                attention_head_dim,
                cross_attention_dim,
                only_cross_attention=only_cross_attention,
                upcast_attention=upcast_attention,
            )
            for _ in range(num_layers)
        )
        self.proj_out = proj(inner, in_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Masks are additive biases, (B, 1, S) as the UNet prepares them."""
        residual = hidden_states
        b, _, h, w = hidden_states.shape
        x = self.norm(hidden_states)
        # As Diffusers: a conv projection works on the map (SD 1.x), a linear one on the tokens (SD 2.x).
        if not self.use_linear_projection:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, H*W, C)
        if self.use_linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, encoder_hidden_states, attention_mask, encoder_attention_mask, cross_attention_kwargs)
        if self.use_linear_projection:
            x = self.proj_out(x)
        else:  # the 1x1 conv is a linear map of the channels: applied to the tokens, as the same matmul
            x = conv1x1_on_tokens(self.proj_out, x)
        return residual_add(residual, x)
