"""One attention module for every model, and a handful of tiny processors.

`Attention` owns the projections and the data layout (norms, head split, added text key/values, residual). A processor
only chooses the kernel: `AttnProcessor` is Diffusers' vanilla path (baddbmm + softmax, deterministic, exportable),
`AttnProcessor2_0` calls `torch.nn.functional.scaled_dot_product_attention` (the default). The `AttnAddedKV*` pair are
the same kernels for layers that attend over projected text tokens too (DeepFloyd IF). A user processor written for
Diffusers (`__call__(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None)`) works as is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .fused_projections import fuse_projections, fused_qkv
from .layout import tokens_to_map


def sdpa_kernel(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D), mask additive (B, H, Lq|1, Lk) -> (B, H, Lq, D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)


def vanilla_kernel(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """Diffusers' AttnProcessor arithmetic: baddbmm(scale) (+mask), softmax, bmm, with its upcast rules."""
    b, h, lq, d = q.shape
    dtype = q.dtype
    q, k, v = (t.reshape(b * h, -1, d) for t in (q, k, v))
    if attn.upcast_attention:
        q, k = q.float(), k.float()
    if mask is None:
        base = torch.empty(b * h, lq, k.shape[1], dtype=q.dtype, device=q.device)
        beta = 0
    else:
        base = mask.expand(b, h, lq, k.shape[1]).reshape(b * h, lq, k.shape[1]).to(q.dtype)
        beta = 1
    scores = torch.baddbmm(base, q, k.transpose(-1, -2), beta=beta, alpha=attn.scale)
    if attn.upcast_softmax:
        scores = scores.float()
    probs = scores.softmax(dim=-1).to(dtype)
    return torch.bmm(probs, v).reshape(b, h, lq, d)


class AttnProcessor2_0:
    """scaled_dot_product_attention: the default processor."""

    kernel = staticmethod(sdpa_kernel)
    added_kv = False

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        return attn.attend(self.kernel, hidden_states, encoder_hidden_states, attention_mask)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AttnProcessor(AttnProcessor2_0):
    """The vanilla processor: explicit baddbmm + softmax (deterministic; what `set_default_attn_processor` picks)."""

    kernel = staticmethod(vanilla_kernel)


class AttnAddedKVProcessor2_0(AttnProcessor2_0):
    """SDPA for layers with added text key/value projections (IF UNets). The default for those layers."""

    added_kv = True


class AttnAddedKVProcessor(AttnAddedKVProcessor2_0):
    """Vanilla kernel for layers with added text key/value projections."""

    kernel = staticmethod(vanilla_kernel)


class Attention(nn.Module):
    """Multi-head attention with Diffusers' parameter names (`to_q`, `to_k`, `to_v`, `to_out.0`, `add_k_proj`, ...)."""

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
        cross_attention_norm: str | None = None,
        cross_attention_norm_num_groups: int = 32,
        added_kv_proj_dim: int | None = None,
        norm_num_groups: int | None = None,
        out_bias: bool = True,
        only_cross_attention: bool = False,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
        residual_connection: bool = False,
        processor: Any = None,
    ):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.scale = dim_head**-0.5
        self.upcast_attention = upcast_attention
        self.upcast_softmax = upcast_softmax
        self.rescale_output_factor = rescale_output_factor
        # Added-KV layers always add the residual (Diffusers' AttnAddedKVProcessor does so unconditionally).
        self.residual_connection = residual_connection or added_kv_proj_dim is not None
        self.added_kv_proj_dim = added_kv_proj_dim
        self.only_cross_attention = only_cross_attention
        if only_cross_attention and added_kv_proj_dim is None:
            raise ValueError("only_cross_attention=True needs added_kv_proj_dim")
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.is_cross_attention = cross_attention_dim is not None
        self.fused_projections = False  # fuse_projections(): one to_qkv / to_kv matmul

        self.group_norm = nn.GroupNorm(norm_num_groups, query_dim, eps=eps) if norm_num_groups is not None else None
        if cross_attention_norm is None:
            self.norm_cross = None
        elif cross_attention_norm == "layer_norm":
            self.norm_cross = nn.LayerNorm(kv_dim)
        elif cross_attention_norm == "group_norm":
            channels = added_kv_proj_dim if added_kv_proj_dim is not None else kv_dim
            self.norm_cross = nn.GroupNorm(cross_attention_norm_num_groups, channels, eps=1e-5)
        else:
            raise ValueError(
                f"cross_attention_norm={cross_attention_norm!r}; allowed: None, 'layer_norm', 'group_norm'"
            )

        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = None if only_cross_attention else nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = None if only_cross_attention else nn.Linear(kv_dim, inner, bias=bias)
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, inner)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, inner)
        # to_out.1 is Diffusers' dropout slot; Identity keeps the state-dict key `to_out.0.*`.
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Identity()])
        self.set_processor(processor if processor is not None else self.default_processor())

    # --- processors -----------------------------------------------------------------------------------------------
    def default_processor(self) -> AttnProcessor2_0:
        return AttnAddedKVProcessor2_0() if self.added_kv_proj_dim is not None else AttnProcessor2_0()

    def vanilla_processor(self) -> AttnProcessor2_0:
        return AttnAddedKVProcessor() if self.added_kv_proj_dim is not None else AttnProcessor()

    def set_processor(self, processor: Any) -> None:
        if not callable(processor):
            raise TypeError(f"processor must be callable like Diffusers' processors, got {processor!r}")
        added = getattr(processor, "added_kv", None)
        if added is not None and added != (self.added_kv_proj_dim is not None):
            want = self.vanilla_processor(), self.default_processor()
            raise TypeError(
                f"{type(processor).__name__} does not fit this attention layer "
                f"({'with' if self.added_kv_proj_dim else 'without'} added key/value projections); "
                f"use {type(want[1]).__name__} or {type(want[0]).__name__}"
            )
        # Not a submodule: processors hold no weights (assigning via __dict__ keeps nn.Module bookkeeping out).
        self.__dict__["processor"] = processor

    def get_processor(self) -> Any:
        return self.processor

    def fuse_projections(self, fuse: bool = True) -> None:
        """Diffusers' `Attention.fuse_projections`: one stacked `to_qkv` (self-attention) or `to_kv` (cross)."""
        fuse_projections(self, fuse)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        return self.processor(
            self, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )

    # --- the one attention path -----------------------------------------------------------------------------------
    def attend(
        self,
        kernel: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, C, H, W) or (B, L, C); encoder_hidden_states (B, S, Ckv) -> same shape as hidden_states."""
        residual = hidden_states
        x = hidden_states.flatten(2).transpose(1, 2) if hidden_states.ndim == 4 else hidden_states  # (B, L, C)
        if self.group_norm is not None:
            x = self.group_norm(x.transpose(1, 2)).transpose(1, 2)
        context = x if encoder_hidden_states is None else self.norm_context(encoder_hidden_states)

        fused = fused_qkv(self, x, context, encoder_hidden_states is None) if self.fused_projections else None
        if fused is not None:
            q, k, v = (self.split_heads(t) for t in fused)
        elif self.added_kv_proj_dim is not None:
            q = self.split_heads(self.to_q(x))
            # Text tokens are projected by add_k/add_v and put in front of the image's own keys and values.
            k = self.split_heads(self.add_k_proj(context))
            v = self.split_heads(self.add_v_proj(context))
            if not self.only_cross_attention:
                k = torch.cat([k, self.split_heads(self.to_k(x))], dim=2)
                v = torch.cat([v, self.split_heads(self.to_v(x))], dim=2)
        else:
            q = self.split_heads(self.to_q(x))
            k = self.split_heads(self.to_k(context))
            v = self.split_heads(self.to_v(context))

        mask = self.prepare_mask(attention_mask, x.shape[0], k.shape[2])
        out = kernel(self, q, k, v, mask)  # (B, H, L, D)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        out = self.to_out[0](out)
        if hidden_states.ndim == 4:
            out = tokens_to_map(out, residual)  # in the input's memory format (models/layout.py)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out

    def norm_context(self, context: torch.Tensor) -> torch.Tensor:
        if self.norm_cross is None:
            return context
        if isinstance(self.norm_cross, nn.GroupNorm):  # normalise over channels: (B, S, C) -> (B, C, S)
            return self.norm_cross(context.transpose(1, 2)).transpose(1, 2)
        return self.norm_cross(context)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, H*D) -> (B, H, L, D)"""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def prepare_mask(self, mask: torch.Tensor | None, batch: int, key_len: int) -> torch.Tensor | None:
        """Diffusers' masks are additive, (B, Lk) or (B, 1|Lq, Lk); returned broadcastable to (B, H, Lq, Lk)."""
        if mask is None:
            return None
        if mask.ndim == 2:
            mask = mask[:, None, :]
        if mask.shape[-1] != key_len:
            # As Diffusers: a shorter mask is padded with zeros (attend) up to the key length.
            mask = F.pad(mask, (0, key_len - mask.shape[-1]), value=0.0)
        return mask[:, None]
