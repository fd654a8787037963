"""Timestep and text embeddings of the UNets (Diffusers' key names: `linear_1`, `linear_2`, `pool.q_proj`, ...)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import activation


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32 (DDPM's; Diffusers' op order, so bit-identical)."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-d tensor, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    # The frequency table is made here, not kept as a buffer: models are built on the meta device.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half - downscale_freq_shift)
    angles = scale * (timesteps[:, None].float() * torch.exp(exponent)[None, :])
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def batch_timesteps(timestep: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    """A number, a 0-d tensor or a (1,)/(B,) tensor -> (B,) on `device`; shape logic only, so no host sync."""
    if not torch.is_tensor(timestep):
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}: {timestep!r}")
        # Diffusers makes an int64/float64 tensor and casts it to float32 in the embedding: the same value.
        return torch.full((batch,), timestep, dtype=torch.float32, device=device)
    if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, batch)):
        raise ValueError(
            f"timestep must be a number, a 0-d tensor or a 1-d tensor of size 1 or batch size {batch}; "
            f"got shape {tuple(timestep.shape)}"
        )
    return timestep.to(device).reshape(-1).expand(batch)


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection of timesteps (Diffusers' `time_proj`)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(
            timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, self.scale
        )

    def extra_repr(self) -> str:
        return f"{self.num_channels}, flip_sin_to_cos={self.flip_sin_to_cos}, shift={self.downscale_freq_shift}"


class TimestepEmbedding(nn.Module):
    """[+ cond_proj(condition)] -> linear_1 -> act -> linear_2 [-> post_act]: sinusoidal features (B, in) -> time
    embedding (B, dim). `cond_proj_dim`: a condition (B, cond_proj_dim) projected onto the features and added (the
    guidance-scale embedding of LCM-distilled UNets)."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
    ):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)
        self.post_act = activation(post_act_fn) if post_act_fn is not None else None

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return self.post_act(sample) if self.post_act is not None else sample


def guidance_scale_embedding(
    w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sinusoidal features (len(w), embedding_dim) of guidance scales w (1-D): the `timestep_cond` of LCM-distilled
    UNets, as Diffusers' `get_guidance_scale_embedding` (VDM's formula at w * 1000; sin then cos, zero-padded to an
    odd width)."""
    if w.ndim != 1:
        raise ValueError(f"guidance scales must be a 1-D tensor, got shape {tuple(w.shape)}")
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    args = (w * 1000.0).to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if embedding_dim % 2 == 1 else emb


class AttentionPooling(nn.Module):
    """Attention-pool a sequence (B, L, C) into one vector (B, C), queried by its mean token (DeepFloyd IF)."""

    def __init__(self, num_heads: int, embed_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, width = x.shape
        cls = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + L, C)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, H, L, C/H)
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        q, k, v = heads(self.q_proj(cls)), heads(self.k_proj(x)), heads(self.v_proj(x))
        # Both sides scaled by d^-1/4 before the product, as the original: steadier in float16.
        scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
        weight = (q * scale) @ (k * scale).transpose(-1, -2)  # (B, H, 1, 1 + L)
        weight = weight.float().softmax(dim=-1).to(weight.dtype)
        return (weight @ v).reshape(batch, width)


class TextTimeEmbedding(nn.Module):
    """Pooled text embedding added to the time embedding (`addition_embed_type="text"`, DeepFloyd IF)."""

    def __init__(self, encoder_dim: int, time_embed_dim: int, num_heads: int = 64):
        super().__init__()
        self.norm1 = nn.LayerNorm(encoder_dim)
        self.pool = AttentionPooling(num_heads, encoder_dim)
        self.proj = nn.Linear(encoder_dim, time_embed_dim)
        self.norm2 = nn.LayerNorm(time_embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.proj(self.pool(self.norm1(hidden_states))))


def text_time_features(
    time_proj: Timesteps, added_cond_kwargs: dict[str, torch.Tensor] | None, dtype: torch.dtype
) -> torch.Tensor:
    """SDXL's added conditioning (`addition_embed_type="text_time"`): the pooled text embedding (B, P) next to the
    sinusoidal features of each micro-conditioning number (`time_ids` (B, N): sizes and crop offsets), (B, P + N*D)
    in `dtype`, for the `add_embedding` MLP."""
    text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
    time_embeds = time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
    return torch.cat([text_embeds.to(time_embeds.dtype), time_embeds], dim=-1).to(dtype)


def check_added_cond_kwargs(config: Any, added_cond_kwargs: Any, batch: int) -> None:
    """`added_cond_kwargs` against a UNet / ControlNet config: SDXL's two tensors, of widths that fill the
    `add_embedding` input (pooled width + len(time_ids) x addition_time_embed_dim), for text_time models; None (or
    empty) for the others."""
    name = type(config).__name__.removesuffix("Config")
    if config.addition_embed_type != "text_time":
        if added_cond_kwargs:
            raise ValueError(
                f"added_cond_kwargs={sorted(added_cond_kwargs)!r} given, but this {name} has "
                f"addition_embed_type={config.addition_embed_type!r}; they are SDXL's (text_time) inputs: pass None"
            )
        return
    if not isinstance(added_cond_kwargs, dict) or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
        got = sorted(added_cond_kwargs) if isinstance(added_cond_kwargs, dict) else added_cond_kwargs
        raise ValueError(
            f"added_cond_kwargs must hold 'text_embeds' and 'time_ids' for this {name} "
            f"(addition_embed_type='text_time'), got {got!r}"
        )
    text, ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
    for key, value in (("text_embeds", text), ("time_ids", ids)):
        if not torch.is_tensor(value) or value.ndim != 2 or value.shape[0] != batch:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"added_cond_kwargs[{key!r}] must be a (batch={batch}, n) tensor, got {shape}")
    width = text.shape[1] + ids.shape[1] * config.addition_time_embed_dim
    if width != config.projection_class_embeddings_input_dim:
        raise ValueError(
            f"added_cond_kwargs: text_embeds {tuple(text.shape)} and time_ids {tuple(ids.shape)} give "
            f"{text.shape[1]} + {ids.shape[1]} x {config.addition_time_embed_dim} = {width} features; this {name} "
            f"takes projection_class_embeddings_input_dim={config.projection_class_embeddings_input_dim} "
            "(SDXL base: 1280 pooled + 6 ids; the refiner: 1280 + 5 ids with the aesthetic score)"
        )
