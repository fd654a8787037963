"""Fused Q/K/V projections (Diffusers' `fuse_qkv_projections` / `unfuse_qkv_projections`).

Fusing gives each attention layer one matmul where it had three (self-attention: `to_qkv`, the query, key and value
weights stacked) or two (cross-attention: `to_kv`), with the same outputs up to float rounding. The separate
projections stay (their weights are what checkpoints hold); unfusing drops the fused layers again. As in Diffusers,
the fused layers are copies: weights changed after fusing (a LoRA, `load_state_dict`) need unfuse then fuse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .attention_processor import Attention


def _stacked(layers: list[nn.Linear]) -> nn.Linear:
    first = layers[0]
    bias = first.bias is not None
    weight = torch.cat([layer.weight.detach() for layer in layers])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if bias:
            fused.bias.copy_(torch.cat([layer.bias.detach() for layer in layers]))
    return fused


def fuse_projections(attn: Attention, fuse: bool = True) -> None:
    """Give `attn` its fused projection (`to_qkv` for self-attention, `to_kv` for cross-attention), or drop it."""
    for name in ("to_qkv", "to_kv"):
        if name in attn._modules:
            delattr(attn, name)
    if fuse:
        if attn.added_kv_proj_dim is not None:
            raise ValueError("fuse_qkv_projections() is not supported for attention layers with added KV projections")
        if not attn.is_cross_attention:
            attn.to_qkv = _stacked([attn.to_q, attn.to_k, attn.to_v])
        else:
            attn.to_kv = _stacked([attn.to_k, attn.to_v])
    attn.fused_projections = fuse


def fused_qkv(
    attn: Attention, x: torch.Tensor, context: torch.Tensor, self_attention: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q, k, v) from the fused projection, (B, L, H*D) each; None where the layer has none for this call."""
    to_qkv, to_kv = attn._modules.get("to_qkv"), attn._modules.get("to_kv")
    if to_qkv is not None and self_attention:
        q, k, v = to_qkv(x).chunk(3, dim=-1)
        return q, k, v
    if to_kv is not None:
        k, v = to_kv(context).chunk(2, dim=-1)
        return attn.to_q(x), k, v
    return None


class FusedProjectionsMixin:
    """`fuse_qkv_projections` / `unfuse_qkv_projections` for a model (UNet, VAE), as Diffusers has them."""

    def _attention_layers(self) -> list[Attention]:
        from .attention_processor import Attention

        return [m for m in self.modules() if isinstance(m, Attention)]  # type: ignore[attr-defined]

    def fuse_qkv_projections(self) -> None:
        """Fuse every attention layer's projections: Q/K/V for self-attention, K/V for cross-attention."""
        layers = self._attention_layers()
        if any(layer.added_kv_proj_dim is not None for layer in layers):
            raise ValueError(
                f"fuse_qkv_projections() is not supported for models having added KV projections "
                f"({type(self).__name__} with encoder_hid_dim / added key-value layers, as DeepFloyd IF's)"
            )
        for layer in layers:
            fuse_projections(layer, True)

    def unfuse_qkv_projections(self) -> None:
        """Back to the separate projections (the fused copies are dropped)."""
        for layer in self._attention_layers():
            fuse_projections(layer, False)
