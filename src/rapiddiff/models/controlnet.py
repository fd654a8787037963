"""ControlNetModel: a trainable copy of the UNet's encoder half that turns a control image into UNet residuals.

conv_in(sample) + controlnet_cond_embedding(control image) -> the UNet's down blocks -> its mid block; each skip and
the mid output go through a zero-initialised 1x1 conv (`controlnet_down_blocks`, `controlnet_mid_block`) and are
scaled by `conditioning_scale`. The UNet adds them to its own skips (`down_block_additional_residuals`) and mid output
(`mid_block_additional_residual`). The blocks are the UNet's own (`get_down_block` / `get_mid_block`), so the state-dict
keys are Diffusers' and `from_unet` copies the UNet's weights module by module.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import MODEL_MINIMUMS, Config, ConfigError, per_block
from ..utils.outputs import BaseOutput
from .attention_processor import mask_to_bias
from .embeddings import (
    TimestepEmbedding,
    Timesteps,
    batch_timesteps,
    check_added_cond_kwargs,
    text_time_features,
)
from .modeling_utils import AttentionSlicingMixin, ModelMixin
from .resnet import ACTIVATIONS
from .single_file import controlnet_from_single_file
from .unet_2d_condition import level_options
from .unet_blocks import first_skips, get_down_block, get_mid_block, run_down_blocks

# The Stable Diffusion (1.x, 2.x, XL) block types; class-conditioned ControlNets are not implemented.
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(Config):
    """Diffusers' ControlNetModel config keys, with Diffusers' defaults."""

    _minimums = MODEL_MINIMUMS

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    # As in the UNet: the number of heads of the transformer blocks (num_attention_heads wins when set).
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool | None = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64

    def __post_init__(self) -> None:
        name = type(self).__name__
        self.check_choice("down_block_types", DOWN_BLOCK_TYPES)
        self.check_choice("mid_block_type", MID_BLOCK_TYPES)
        self.check_choice("act_fn", tuple(ACTIVATIONS))
        self.check_choice("resnet_time_scale_shift", ("default", "scale_shift"))
        self.check_choice("controlnet_conditioning_channel_order", ("rgb", "bgr"))
        # Conditioning of class-conditioned / text-projected ControlNets: not implemented.
        for key in ("encoder_hid_dim", "encoder_hid_dim_type", "class_embed_type", "num_class_embeds"):
            self.check_choice(key, (None,))
        self.check_choice("addition_embed_type", (None, "text_time"))  # SDXL's
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None
        ):
            raise ConfigError(
                f"{name}: addition_embed_type='text_time' (SDXL) needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        for key in ("layers_per_block", "cross_attention_dim", "norm_num_groups"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}: {key}={value!r}: expected one int")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n:
            raise ConfigError(
                f"{name}: down_block_types has {len(self.down_block_types)} entries, block_out_channels {n}"
            )
        for key in (
            "only_cross_attention",
            "attention_head_dim",
            "num_attention_heads",
            "transformer_layers_per_block",
        ):
            if getattr(self, key) is not None:
                per_block(getattr(self, key), n, f"{name}: {key}")
        if not self.conditioning_embedding_out_channels:
            raise ConfigError(f"{name}: conditioning_embedding_out_channels must list at least one width")


@dataclasses.dataclass
class ControlNetOutput(BaseOutput):
    """down_block_res_samples: one residual per UNet skip; mid_block_res_sample: the residual of the mid output."""

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor


def zero_conv(channels: int) -> nn.Conv2d:
    """A 1x1 conv initialised to zero: a fresh ControlNet adds nothing to the UNet."""
    return zero_init(nn.Conv2d(channels, channels, kernel_size=1))


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNetConditioningEmbedding(nn.Module):
    """Control image (B, 3, H, W) -> (B, C, H/f, W/f) features: convs with SiLU, each width change at stride 2."""

    def __init__(self, embedding_channels: int, conditioning_channels: int, block_out_channels: Sequence[int]):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], kernel_size=3, padding=1)
        blocks = []
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = zero_init(nn.Conv2d(block_out_channels[-1], embedding_channels, kernel_size=3, padding=1))

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(conditioning))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNetModel(AttentionSlicingMixin, ModelMixin):
    """Diffusers' ControlNetModel: same config, state-dict keys, forward arguments and outputs."""

    config_class = ControlNetConfig
    config: ControlNetConfig

    def __init__(self, config: ControlNetConfig | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__()
        cfg = self._init_config(config, kwargs)
        ch = cfg.block_out_channels
        n = len(ch)
        time_dim = ch[0] * 4

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], time_dim, cfg.act_fn)
        self.add_time_proj = self.add_embedding = None
        if cfg.addition_embed_type == "text_time":  # SDXL: the UNet's pooled-text + micro-conditioning embedding
            self.add_time_proj = Timesteps(cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, time_dim)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels
        )

        # The UNet's encoder half, built by the UNet's own builders; one zero conv per skip it produces.
        levels = level_options(cfg, time_dim)
        # Built in Diffusers' order (each block, then its zero convs: the same random init for the same seed).
        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([zero_conv(ch[0])])
        for i, t in enumerate(cfg.down_block_types):
            block = get_down_block(
                t, levels[i], ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, add_downsample=i < n - 1
            )
            self.down_blocks.append(block)
            skips = len(block.resnets) + (block.downsamplers is not None)
            self.controlnet_down_blocks.extend(zero_conv(ch[i]) for _ in range(skips))
        self.controlnet_mid_block = zero_conv(ch[-1])
        # Registered after the zero convs, as in Diffusers: state_dict and attn_processors list in the same order.
        self.mid_block = get_mid_block(cfg.mid_block_type, levels[-1], ch[-1], cfg.mid_block_scale_factor)

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 3,
    ) -> ControlNetModel:
        """A ControlNet shaped like `unet` (a UNet2DConditionModel), its encoder half copied from the UNet's weights."""
        shared = {k: unet.config[k] for k in ControlNetConfig._field_names() if k in unet.config}
        model = cls(
            **shared,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            conditioning_channels=conditioning_channels,
        )
        if load_weights_from_unet:
            for name in ("conv_in", "time_proj", "time_embedding", "add_embedding", "down_blocks", "mid_block"):
                if getattr(model, name, None) is not None:
                    getattr(model, name).load_state_dict(getattr(unet, name).state_dict())
        return model

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str | os.PathLike,
        config: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        quantization_config: Any = None,
    ) -> ControlNetModel:
        """An original-layout ControlNet file (`control_model.*`, e.g. control_v11p_sd15_canny.pth), offline; the
        config from `config=` (a local folder) or the SD 1.x ControlNet preset; `quantization_config=` a
        `TorchAoConfig`, as in from_pretrained."""
        return controlnet_from_single_file(
            cls, pretrained_model_link_or_path, config, torch_dtype, dtype, quantization_config
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float | torch.Tensor = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
        num_residuals: int | None = None,
    ) -> ControlNetOutput | tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Residuals for the UNet from `sample` (B, in_channels, h, w) and `controlnet_cond` (B, 3, h*f, w*f).

        conditioning_scale: a number or a 0-d tensor (a tensor keeps a compiled model from recompiling when the scale
        changes). guess_mode: scale the residuals from 0.1 (first skip) up to 1 (mid), for prompt-free control.
        added_cond_kwargs: SDXL ControlNets' {"text_embeds", "time_ids"}, as the UNet's; else None. class_labels and
        timestep_cond (class-conditioned / LCM ControlNets) must be None.
        num_residuals: only the first `num_residuals` skip residuals, and no mid residual (None: all): a DeepCache
        shallow step reads no more, and the layers below them do not run (the residuals computed are the same).
        """
        self._check_inputs(sample, encoder_hidden_states, controlnet_cond, class_labels, timestep_cond)
        check_added_cond_kwargs(self.config, added_cond_kwargs, sample.shape[0])
        cfg = self.config
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        attn_kwargs = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=mask_to_bias(attention_mask, sample.dtype),
            cross_attention_kwargs=cross_attention_kwargs,
        )
        t_emb = self.time_proj(batch_timesteps(timestep, sample.shape[0], sample.device)).to(sample.dtype)
        emb = self.time_embedding(t_emb)
        if self.add_time_proj is not None:
            emb = emb + self.add_embedding(text_time_features(self.add_time_proj, added_cond_kwargs, emb.dtype))

        hidden = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        mid: torch.Tensor | None = None
        if num_residuals is None:
            hidden, skips = run_down_blocks(self.down_blocks, hidden, emb, **attn_kwargs)
            mid = self.controlnet_mid_block(self.mid_block(hidden, emb, **attn_kwargs))
        else:
            skips = first_skips(self.down_blocks, hidden, emb, num_residuals, **attn_kwargs)

        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        if guess_mode and not cfg.global_pool_conditions:
            count = len(self.controlnet_down_blocks) + 1
            scales = torch.logspace(-1, 0, count, device=sample.device) * conditioning_scale  # 0.1 .. 1
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1] if mid is not None else None
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale if mid is not None else None
        if cfg.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True) if mid is not None else None
        out = ControlNetOutput(tuple(down), mid)
        return out if return_dict else (out.down_block_res_samples, out.mid_block_res_sample)

    def _check_inputs(
        self,
        sample: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        class_labels: Any,
        timestep_cond: Any,
    ) -> None:
        cfg = self.config
        unsupported = dict(class_labels=class_labels, timestep_cond=timestep_cond)
        for key, value in unsupported.items():
            if value is not None:
                raise ValueError(f"{key} is not supported by rapiddiff's ControlNetModel; pass None")
        if not torch.is_tensor(sample) or sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            got = tuple(sample.shape) if torch.is_tensor(sample) else type(sample).__name__
            raise ValueError(f"sample must be a (batch, {cfg.in_channels}, height, width) tensor, got {got}")
        if not torch.is_tensor(encoder_hidden_states) or encoder_hidden_states.ndim != 3:
            got = (
                tuple(encoder_hidden_states.shape) if torch.is_tensor(encoder_hidden_states) else encoder_hidden_states
            )
            raise ValueError(f"encoder_hidden_states must be a (batch, tokens, dim) tensor, got {got}")
        # The conditioning embedding downsamples once per width change: the control image is that much larger.
        factor = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
        size = (sample.shape[2] * factor, sample.shape[3] * factor)
        ok = (
            torch.is_tensor(controlnet_cond)
            and controlnet_cond.ndim == 4
            and controlnet_cond.shape[0] in (1, sample.shape[0])
            and tuple(controlnet_cond.shape[1:]) == (cfg.conditioning_channels, *size)
        )
        if not ok:
            got = tuple(controlnet_cond.shape) if torch.is_tensor(controlnet_cond) else type(controlnet_cond).__name__
            raise ValueError(
                f"controlnet_cond must be a (batch, {cfg.conditioning_channels}, {size[0]}, {size[1]}) tensor: the "
                f"sample's batch (or 1) at {factor}x the sample's size; got {got}"
            )


class MultiControlNetModel(ModelMixin):
    """Several ControlNets, each with its own control image and scale; their residuals are summed (Diffusers')."""

    def __init__(self, controlnets: Sequence[ControlNetModel]):
        super().__init__()
        if not controlnets or not all(isinstance(c, ControlNetModel) for c in controlnets):
            raise ValueError(f"MultiControlNetModel needs a non-empty list of ControlNetModel, got {controlnets!r}")
        self.nets = nn.ModuleList(controlnets)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: Sequence[torch.Tensor],
        conditioning_scale: Sequence[float | torch.Tensor],
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
        num_residuals: int | None = None,
    ) -> ControlNetOutput | tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """One control image and one scale per net (lists as long as `nets`); returns the summed residuals."""
        n = len(self.nets)
        if len(controlnet_cond) != n or len(conditioning_scale) != n:
            raise ValueError(
                f"MultiControlNetModel has {n} nets: pass {n} control images and {n} scales, got "
                f"{len(controlnet_cond)} images and {len(conditioning_scale)} scales"
            )
        down: tuple[torch.Tensor, ...] | None = None
        mid: torch.Tensor | None = None
        for net, cond, scale in zip(self.nets, controlnet_cond, conditioning_scale):
            d, m = net(
                sample,
                timestep,
                encoder_hidden_states,
                cond,
                scale,
                class_labels,
                timestep_cond,
                attention_mask,
                added_cond_kwargs,
                cross_attention_kwargs,
                guess_mode,
                return_dict=False,
                num_residuals=num_residuals,
            )
            down = d if down is None else tuple(a + b for a, b in zip(down, d))
            mid = m if mid is None or m is None else mid + m
        out = ControlNetOutput(down, mid)
        return out if return_dict else (out.down_block_res_samples, out.mid_block_res_sample)

    # --- Diffusers' layout: net 0 in `folder`, net i in `folder_i` -------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        variant: str | None = None,
        safe_serialization: bool = True,
        max_shard_size: int | str = "10GB",
    ) -> None:
        for i, net in enumerate(self.nets):
            net.save_pretrained(
                _net_folder(save_directory, i),
                variant=variant,
                safe_serialization=safe_serialization,
                max_shard_size=max_shard_size,
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_path: str | os.PathLike, **kwargs: Any) -> MultiControlNetModel:
        """Load `path`, `path_1`, `path_2`... (as many as exist) with ControlNetModel.from_pretrained(**kwargs)."""
        nets = []
        while (folder := _net_folder(pretrained_model_path, len(nets))).is_dir():
            nets.append(ControlNetModel.from_pretrained(folder, **kwargs))
        if not nets:
            raise FileNotFoundError(f"no ControlNet folder at {pretrained_model_path}")
        return cls(nets)

    @classmethod
    def from_config(cls, config: Any = None, **kwargs: Any) -> MultiControlNetModel:
        raise TypeError("MultiControlNetModel has no config: build it from a list, MultiControlNetModel([net1, net2])")


def _net_folder(path: str | os.PathLike, i: int) -> Path:
    path = Path(path)
    return path if i == 0 else path.with_name(f"{path.name}_{i}")
