"""IP-Adapter's layers: image projections (CLIP image embeddings -> extra cross-attention tokens) and the attention
processors that attend to those tokens beside the text, with Diffusers' class names and state-dict keys.

The UNet projects `added_cond_kwargs={"image_embeds": [...]}` (one tensor per adapter, (B, images, dim) or
(B, images, tokens, dim)) with `MultiIPAdapterImageProjection` and hands each cross-attention layer
`encoder_hidden_states=(text, [image tokens per adapter])`. `IPAdapterAttnProcessor2_0` runs the layer's text
attention and adds, per adapter, `scale * attention(q, to_k_ip(image tokens), to_v_ip(image tokens))` before the
output projection (optionally masked per image, Diffusers' `ip_adapter_masks`).

Compile-friendly as the LoRA layers: each processor's scales are a buffer (`ip_scale`, adapters x images) changed in
place by `set_ip_adapter_scale`, so a new scale neither recompiles nor breaks a captured graph; a scale of 0 adds
exactly nothing instead of skipping the work (no branch on a value). Reading Diffusers' weight files and putting
these layers into a UNet is `rapiddiff.loaders.ip_adapter`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention_processor import Attention, sdpa_kernel, vanilla_kernel


# --- image projections ------------------------------------------------------------------------------------------------
class GELUFeedForward(nn.Module):
    """Diffusers' `FeedForward(dim, dim_out, mult, activation_fn="gelu")`: keys `net.0.proj` and `net.2`."""

    def __init__(self, dim: int, dim_out: int, mult: int = 4, bias: bool = True):
        super().__init__()
        inner = int(dim * mult)
        proj = nn.Module()
        proj.proj = nn.Linear(dim, inner, bias=bias)
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(inner, dim_out, bias=bias)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x)))


class ImageProjection(nn.Module):
    """IP-Adapter: one pooled image embedding -> `num_image_text_embeds` tokens."""

    def __init__(self, image_embed_dim: int = 768, cross_attention_dim: int = 768, num_image_text_embeds: int = 32):
        super().__init__()
        self.num_image_text_embeds = num_image_text_embeds
        self.image_embeds = nn.Linear(image_embed_dim, num_image_text_embeds * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.image_embeds(image_embeds.to(self.image_embeds.weight.dtype))
        return self.norm(x.reshape(image_embeds.shape[0], self.num_image_text_embeds, -1))


class IPAdapterFullImageProjection(nn.Module):
    """IP-Adapter Full Face: every CLIP hidden state (257 tokens) through an MLP."""

    def __init__(self, image_embed_dim: int = 1024, cross_attention_dim: int = 1024):
        super().__init__()
        self.ff = GELUFeedForward(image_embed_dim, cross_attention_dim, mult=1)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.ff(image_embeds))


class IPAdapterFaceIDImageProjection(nn.Module):
    """IP-Adapter FaceID: a face-ID embedding -> `num_tokens` tokens."""

    def __init__(
        self, image_embed_dim: int = 1024, cross_attention_dim: int = 1024, mult: int = 1, num_tokens: int = 1
    ):
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.ff = GELUFeedForward(image_embed_dim, cross_attention_dim * num_tokens, mult=mult)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.ff(image_embeds)
        return self.norm(x.reshape(-1, self.num_tokens, self.cross_attention_dim))


class IPAdapterPlusImageProjectionBlock(nn.Module):
    """One perceiver-resampler block: the queries attend to [image tokens; queries], then an MLP."""

    def __init__(self, embed_dims: int = 768, dim_head: int = 64, heads: int = 16, ffn_ratio: float = 4):
        super().__init__()
        self.ln0 = nn.LayerNorm(embed_dims)
        self.ln1 = nn.LayerNorm(embed_dims)
        self.attn = Attention(query_dim=embed_dims, dim_head=dim_head, heads=heads, out_bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(embed_dims), GELUFeedForward(embed_dims, embed_dims, mult=ffn_ratio, bias=False)
        )

    def forward(self, x: torch.Tensor, latents: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        latents = self.ln1(latents)
        latents = self.attn(latents, torch.cat([self.ln0(x), latents], dim=-2)) + residual
        return self.ff(latents) + latents


class IPAdapterPlusImageProjection(nn.Module):
    """IP-Adapter Plus: a perceiver resampler from CLIP's hidden states to `num_queries` tokens."""

    def __init__(
        self,
        embed_dims: int = 768,
        output_dims: int = 1024,
        hidden_dims: int = 1280,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 16,
        num_queries: int = 8,
        ffn_ratio: float = 4,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, hidden_dims) / hidden_dims**0.5)
        self.proj_in = nn.Linear(embed_dims, hidden_dims)
        self.proj_out = nn.Linear(hidden_dims, output_dims)
        self.norm_out = nn.LayerNorm(output_dims)
        self.layers = nn.ModuleList(
            IPAdapterPlusImageProjectionBlock(hidden_dims, dim_head, heads, ffn_ratio) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(x.shape[0], 1, 1)
        x = self.proj_in(x)
        for block in self.layers:
            latents = block(x, latents, latents)
        return self.norm_out(self.proj_out(latents))


class MultiIPAdapterImageProjection(nn.Module):
    """The UNet's `encoder_hid_proj` while IP-Adapters are loaded: one projection per adapter."""

    def __init__(self, IPAdapterImageProjectionLayers: Sequence[nn.Module]):  # noqa: N803 - Diffusers' name
        super().__init__()
        self.image_projection_layers = nn.ModuleList(IPAdapterImageProjectionLayers)

    @property
    def num_ip_adapters(self) -> int:
        return len(self.image_projection_layers)

    def forward(self, image_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """One (B, images, ...) tensor per adapter -> (B, images, tokens, cross_attention_dim) per adapter. As in
        Diffusers (deprecated there), one tensor without the images axis is taken as one image for one adapter."""
        if torch.is_tensor(image_embeds):
            warnings.warn(
                'added_cond_kwargs["image_embeds"] as a tensor is deprecated (as in Diffusers): pass a list with one '
                "(batch, images, ...) tensor per IP-Adapter",
                FutureWarning,
                stacklevel=2,
            )
            image_embeds = [image_embeds.unsqueeze(1)]
        if not isinstance(image_embeds, (list, tuple)) or len(image_embeds) != self.num_ip_adapters:
            got = f"{len(image_embeds)} tensors" if isinstance(image_embeds, (list, tuple)) else type(image_embeds)
            raise ValueError(
                f'added_cond_kwargs["image_embeds"] must be a list of one tensor per IP-Adapter '
                f"({self.num_ip_adapters} loaded), got {got}"
            )
        out = []
        for embeds, layer in zip(image_embeds, self.image_projection_layers):
            if not torch.is_tensor(embeds) or embeds.ndim < 3:
                shape = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
                raise ValueError(
                    f"each image_embeds tensor must be (batch, images, dim) or (batch, images, tokens, dim), got {shape}"
                )
            batch, images = embeds.shape[:2]
            projected = layer(embeds.reshape(batch * images, *embeds.shape[2:]))
            out.append(projected.reshape(batch, images, *projected.shape[1:]))
        return out


# --- attention processors ---------------------------------------------------------------------------------------------
Scale = float | list[float]


def _scale_rows(scale: Any, adapters: int) -> list[list[float]]:
    """Diffusers' scale forms (a number, or one number or list of per-image numbers per adapter) -> rows of floats."""
    values = scale if isinstance(scale, (list, tuple)) else [scale] * adapters
    if len(values) != adapters:
        raise ValueError(f"IP-Adapter scale {scale!r}: one entry per adapter expected ({adapters} loaded)")
    rows = []
    for value in values:
        row = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in row:
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"IP-Adapter scale {scale!r}: each scale must be a finite number, got {v!r}")
        if not row:
            raise ValueError(f"IP-Adapter scale {scale!r}: an empty list of per-image scales")
        rows.append([float(v) for v in row])
    return rows


def downsample_mask(mask: torch.Tensor, batch: int, queries: int) -> torch.Tensor:
    """An image mask (1, H, W) -> (batch, queries) weights over a layer's tokens, as Diffusers'
    `IPAdapterMaskProcessor.downsample` (bicubic to the layer's grid, zero-padded or cut to `queries`)."""
    h, w = mask.shape[1], mask.shape[2]
    mask_h = int(math.sqrt(queries / (w / h)))
    mask_h = mask_h + int(queries % mask_h != 0)
    mask_w = queries // mask_h
    small = F.interpolate(mask.unsqueeze(0), size=(mask_h, mask_w), mode="bicubic").squeeze(0)
    if small.shape[0] < batch:
        small = small.repeat(batch, 1, 1)
    small = small.reshape(small.shape[0], -1)
    if small.shape[1] < queries:
        warnings.warn(
            "The aspect ratio of the mask does not match the aspect ratio of the output image. "
            "Please update your masks or adjust the output size for optimal performance.",
            UserWarning,
            stacklevel=2,
        )
        small = F.pad(small, (0, queries - small.shape[1]))
    return small[:, :queries]


class IPAdapterAttnProcessor2_0(nn.Module):
    """Cross-attention to the text and to each IP-Adapter's image tokens (SDPA). Diffusers' arguments and keys."""

    kernel = staticmethod(sdpa_kernel)
    added_kv = False
    ip_scale: torch.Tensor

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int | None = None,
        num_tokens: int | Sequence[int] = (4,),
        scale: Scale | list[Scale] = 1.0,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = list(num_tokens) if isinstance(num_tokens, (list, tuple)) else [num_tokens]
        n = len(self.num_tokens)
        kv_dim = cross_attention_dim or hidden_size
        self.to_k_ip = nn.ModuleList(nn.Linear(kv_dim, hidden_size, bias=False) for _ in range(n))
        self.to_v_ip = nn.ModuleList(nn.Linear(kv_dim, hidden_size, bias=False) for _ in range(n))
        self.register_buffer("ip_scale", torch.ones(n, 1), persistent=False)
        self.scale = scale

    @property
    def scale(self) -> list[Scale]:
        """Per adapter: its scale, or its per-image scales (used with `ip_adapter_masks`)."""
        rows = self.ip_scale.tolist()
        return [row[0] if self.ip_scale.shape[1] == 1 else row for row in rows]

    @scale.setter
    def scale(self, scale: Scale | list[Scale]) -> None:
        rows = _scale_rows(scale, len(self.to_k_ip))
        width = max(len(r) for r in rows)
        if any(len(r) not in (1, width) for r in rows):
            raise ValueError(f"IP-Adapter scale {scale!r}: per-image scale lists of different lengths")
        values = torch.tensor([r * width if len(r) == 1 else r for r in rows], dtype=torch.float32)
        with torch.no_grad():
            if values.shape == self.ip_scale.shape:  # in place: a compiled graph keeps reading the same buffer
                self.ip_scale.copy_(values)
            else:
                self.ip_scale = values.to(device=self.ip_scale.device, dtype=self.ip_scale.dtype)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: Any = None,
    ) -> torch.Tensor:
        if not isinstance(encoder_hidden_states, tuple) or len(encoder_hidden_states) != 2:
            raise ValueError(
                f"{type(self).__name__} needs encoder_hidden_states=(text embeddings, [image tokens per adapter]), "
                'as the UNet passes them when called with added_cond_kwargs={"image_embeds": [...]}'
            )
        text, image_tokens = encoder_hidden_states
        if len(image_tokens) != len(self.to_k_ip):
            raise ValueError(
                f"{len(image_tokens)} sets of image tokens for {len(self.to_k_ip)} IP-Adapter(s) in this layer"
            )
        masks = self._check_masks(ip_adapter_masks, image_tokens)

        def add_image_attention(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            batch, _, queries, _ = q.shape
            for j, (tokens, mask) in enumerate(zip(image_tokens, masks)):
                to_k, to_v = self.to_k_ip[j], self.to_v_ip[j]
                if mask is None:
                    tokens = tokens.reshape(batch, -1, tokens.shape[-1])  # every image's tokens, side by side
                    k, v = attn.split_heads(to_k(tokens)), attn.split_heads(to_v(tokens))
                    out = out + self.ip_scale[j, 0].to(out.dtype) * self.kernel(attn, q, k, v, None)
                    continue
                for i in range(mask.shape[1]):  # one attention per masked image (static: shapes only)
                    image = tokens[:, i].reshape(batch, -1, tokens.shape[-1])
                    k, v = attn.split_heads(to_k(image)), attn.split_heads(to_v(image))
                    weight = downsample_mask(mask[:, i], batch, queries).to(device=q.device, dtype=out.dtype)
                    scale_i = self.ip_scale[j, i if self.ip_scale.shape[1] > 1 else 0].to(out.dtype)
                    out = out + scale_i * self.kernel(attn, q, k, v, None) * weight[:, None, :, None]
            return out

        return attn.attend(self.kernel, hidden_states, text, attention_mask, extra=add_image_attention)

    def _check_masks(self, masks: Any, image_tokens: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Diffusers' `ip_adapter_masks`: one (1, images, H, W) mask (or None) per adapter; a tensor (adapters, 1, H, W)
        is one mask per adapter. Without masks, per-image scale lists have nothing to apply to."""
        n = len(self.to_k_ip)
        if masks is None:
            if self.ip_scale.shape[1] > 1:
                raise ValueError("per-image IP-Adapter scales (lists) need ip_adapter_masks, one mask per image")
            return [None] * n
        if torch.is_tensor(masks):
            masks = list(masks.unsqueeze(1))
        if not isinstance(masks, (list, tuple)) or len(masks) != n:
            got = len(masks) if isinstance(masks, (list, tuple)) else type(masks).__name__
            raise ValueError(f"ip_adapter_masks must have one entry per IP-Adapter ({n}), got {got}")
        for j, (mask, tokens) in enumerate(zip(masks, image_tokens)):
            if mask is None:
                continue
            if not torch.is_tensor(mask) or mask.ndim != 4:
                raise ValueError(
                    "each ip_adapter_masks entry must be a (1, images, height, width) tensor "
                    "(Diffusers' IPAdapterMaskProcessor.preprocess gives them)"
                )
            if mask.shape[1] != tokens.shape[1]:
                raise ValueError(f"ip_adapter_masks[{j}] has {mask.shape[1]} masks for {tokens.shape[1]} images")
            if self.ip_scale.shape[1] > 1 and self.ip_scale.shape[1] != mask.shape[1]:
                raise ValueError(
                    f"ip_adapter_masks[{j}] has {mask.shape[1]} masks for {self.ip_scale.shape[1]} per-image scales"
                )
        return list(masks)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(adapters={len(self.to_k_ip)}, num_tokens={self.num_tokens})"


class IPAdapterAttnProcessor(IPAdapterAttnProcessor2_0):
    """`IPAdapterAttnProcessor2_0` with the vanilla kernel (explicit baddbmm + softmax)."""

    kernel = staticmethod(vanilla_kernel)


IP_ADAPTER_PROCESSORS = (IPAdapterAttnProcessor2_0,)  # IPAdapterAttnProcessor is a subclass
