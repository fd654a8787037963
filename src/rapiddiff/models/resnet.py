"""Residual block and resampling layers shared by the UNets, the ControlNet and the VAE (Diffusers' key names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported; allowed: {', '.join(ACTIVATIONS)}") from None


class Downsample2D(nn.Module):
    """Stride-2 conv (or 2x2 average pool). padding=0 pads right/bottom by one first, as the VAE encoder does."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        out_channels = out_channels or channels
        self.padding = padding
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, stride=2, padding=padding)
        else:
            if out_channels != channels:
                raise ValueError("Downsample2D without conv keeps the channel count")
            self.conv = nn.AvgPool2d(2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_conv and self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest x2 (or to `output_size`), then an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv twice with a time-embedding injection; optional up/down resampling inside (IF blocks).

    time_embedding_norm "default" adds the projected embedding before norm2; "scale_shift" modulates after norm2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        non_linearity: str = "swish",
        time_embedding_norm: str = "default",
        skip_time_act: bool = False,
        output_scale_factor: float = 1.0,
        use_in_shortcut: bool | None = None,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"time_embedding_norm={time_embedding_norm!r}; allowed: 'default', 'scale_shift'")
        self.time_embedding_norm = time_embedding_norm
        self.skip_time_act = skip_time_act
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            scale = 2 if time_embedding_norm == "scale_shift" else 1
            self.time_emb_proj = nn.Linear(temb_channels, scale * out_channels)
        else:
            self.time_emb_proj = None
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = activation(non_linearity)
        self.upsample = Upsample2D(in_channels, use_conv=False) if up else None
        self.downsample = Downsample2D(in_channels, use_conv=False) if down and not up else None
        use_in_shortcut = in_channels != out_channels if use_in_shortcut is None else use_in_shortcut
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if use_in_shortcut else None

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.nonlinearity(self.norm1(input_tensor))
        if self.upsample is not None:
            input_tensor, h = self.upsample(input_tensor), self.upsample(h)
        elif self.downsample is not None:
            input_tensor, h = self.downsample(input_tensor), self.downsample(h)
        h = self.conv1(h)

        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        else:
            temb = None
        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError("time_embedding_norm='scale_shift' needs a time embedding")
            scale, shift = temb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h if temb is None else h + temb)
        h = self.conv2(self.nonlinearity(h))

        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        out = input_tensor + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out
