"""UNet2DConditionModel: the denoiser of Stable Diffusion 1.x/2.x, the x4 upscaler and DeepFloyd IF.

conv_in -> down blocks (each keeps its intermediate maps as skips) -> mid block -> up blocks (each concatenates
skips) -> norm/act/conv_out. Every resnet is conditioned on one embedding: sinusoidal timestep features through an
MLP, plus an optional class embedding (noise level) and an optional pooled-text embedding (IF).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..configuration import MODEL_MINIMUMS, Config, ConfigError, per_block
from ..utils.outputs import BaseOutput
from .attention_processor import mask_to_bias
from .custom_diffusion import CustomDiffusionModelMixin
from .deep_cache import DeepCacheMixin, DeepCacheStep, cached_forward
from .embeddings import (
    TextTimeEmbedding,
    TimestepEmbedding,
    Timesteps,
    batch_timesteps,
    check_added_cond_kwargs,
    text_time_features,
)
from .fused_projections import FusedProjectionsMixin
from .ip_adapter_weights import IPAdapterUNetMixin
from .lora_adapter import LoraModelMixin
from .modeling_utils import AttentionSlicingMixin, ModelMixin
from .resnet import ACTIVATIONS, activation
from .transformer_2d import Transformer2DModel
from .unet_blocks import (
    DOWN_BLOCK_TYPES,
    MID_BLOCK_TYPES,
    UP_BLOCK_TYPES,
    BlockOptions,
    FreeUMixin,
    UNetDownBlock,
    UNetMidBlock,
    UNetUpBlock,
    get_down_block,
    get_mid_block,
    get_up_block,
    mid_only_cross_attention,
    run_down_blocks,
)

# Diffusers' class_embed_type values rapiddiff builds: "timestep" (IF-II's noise level), the projections of given
# class-label vectors, and "identity" (the labels are the embedding).
CLASS_EMBED_TYPES = ("timestep", "projection", "simple_projection", "identity")


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(Config):
    """Diffusers' UNet2DConditionModel config keys, with Diffusers' defaults."""

    _minimums = MODEL_MINIMUMS

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    # One depth for every block, one per block, or (asymmetric UNets) per block a depth per layer; the up blocks then
    # take theirs from reverse_transformer_layers_per_block, in up order.
    transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
    reverse_transformer_layers_per_block: tuple[int | tuple[int, ...], ...] | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    # Diffusers' naming quirk: for the transformer (SD) blocks this is the NUMBER of heads; for the added-KV (IF)
    # blocks it is the width of a head.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool | None = False  # None (SDXL's files): False, as in Diffusers
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None  # LCM-distilled UNets: width of the guidance-scale embedding
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None  # the class labels' width for the projection types
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self) -> None:
        name = type(self).__name__
        self.check_choice("down_block_types", tuple(DOWN_BLOCK_TYPES))
        self.check_choice("up_block_types", tuple(UP_BLOCK_TYPES))
        self.check_choice("mid_block_type", (*MID_BLOCK_TYPES, None))
        acts = tuple(ACTIVATIONS)
        self.check_choice("act_fn", acts)
        self.check_choice("time_embedding_act_fn", (None, *acts))
        self.check_choice("timestep_post_act", (None, *acts))
        self.check_choice("resnet_time_scale_shift", ("default", "scale_shift"))
        self.check_choice("time_embedding_type", ("positional",))
        self.check_choice("class_embed_type", (None, *CLASS_EMBED_TYPES))
        self.check_choice("addition_embed_type", (None, "text", "text_time"))
        self.check_choice("encoder_hid_dim_type", (None, "text_proj"))
        self.check_choice("cross_attention_norm", (None, "group_norm"))
        self.check_choice("attention_type", ("default",))
        self.check_choice("dual_cross_attention", (False,))
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None
        ):
            raise ConfigError(
                f"{name}: addition_embed_type='text_time' (SDXL) needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        if self.class_embed_type in ("projection", "simple_projection") and (
            self.projection_class_embeddings_input_dim is None
        ):
            raise ConfigError(
                f"{name}: class_embed_type={self.class_embed_type!r} needs projection_class_embeddings_input_dim"
            )
        if self.class_embeddings_concat and (
            self.class_embed_type is None and self.num_class_embeds is None or self.addition_embed_type is not None
        ):
            raise ConfigError(
                f"{name}: class_embeddings_concat=True appends the class embedding to the time embedding: it needs "
                "class_embed_type or num_class_embeds, and no addition_embed_type (added to the time embedding, whose "
                f"width it would not match); got class_embed_type={self.class_embed_type!r}, "
                f"num_class_embeds={self.num_class_embeds!r}, addition_embed_type={self.addition_embed_type!r}"
            )
        if self.num_attention_heads is not None:
            raise ConfigError(
                f"{name}: num_attention_heads={self.num_attention_heads!r}: Diffusers' UNet2DConditionModel rejects "
                "this key too; set attention_head_dim (read as the number of heads by the transformer blocks)"
            )

        if not isinstance(self.norm_num_groups, int):
            raise ConfigError(f"{name}: norm_num_groups={self.norm_num_groups!r}: expected an int")
        n = len(self.block_out_channels)
        for key in ("down_block_types", "up_block_types"):
            if len(getattr(self, key)) != n:
                raise ConfigError(f"{name}: {key} has {len(getattr(self, key))} entries, block_out_channels has {n}")
        per_block_types = dict(
            only_cross_attention=bool,
            layers_per_block=int,
            attention_head_dim=int,
            cross_attention_dim=int,
        )
        for key, kind in per_block_types.items():
            values = per_block(getattr(self, key), n, f"{name}: {key}")
            if not all(isinstance(v, kind) for v in values):
                raise ConfigError(
                    f"{name}: {key}={getattr(self, key)!r}: expected one {kind.__name__} or one per block"
                )
        self._check_transformer_depths(name, n)
        if self.class_embed_type is not None and self.num_class_embeds is not None:
            raise ConfigError(
                f"{name}: class_embed_type={self.class_embed_type!r} and num_class_embeds={self.num_class_embeds!r} "
                "both set; use one (num_class_embeds alone gives an nn.Embedding, as the x4 upscaler)"
            )
        # As Diffusers: an encoder_hid_dim alone means a linear text projection.
        if self.encoder_hid_dim is not None and self.encoder_hid_dim_type is None:
            object.__setattr__(self, "encoder_hid_dim_type", "text_proj")
        if self.encoder_hid_dim_type is not None and self.encoder_hid_dim is None:
            raise ConfigError(f"{name}: encoder_hid_dim_type={self.encoder_hid_dim_type!r} needs encoder_hid_dim")
        if (self.encoder_hid_dim_type or self.addition_embed_type == "text") and not isinstance(
            self.cross_attention_dim, int
        ):
            raise ConfigError(
                f"{name}: cross_attention_dim={self.cross_attention_dim!r} must be one int with "
                "encoder_hid_dim_type / addition_embed_type"
            )

    def _check_transformer_depths(self, name: str, n: int) -> None:
        """Each transformer block's depth list (asymmetric UNets) covers its layers (Diffusers indexes it per layer);
        nested depths need the up blocks' own (`reverse_transformer_layers_per_block`), as in Diffusers."""
        down = per_block(self.transformer_layers_per_block, n, f"{name}: transformer_layers_per_block")
        reverse = self.reverse_transformer_layers_per_block
        if reverse is None and any(isinstance(d, tuple) for d in down):
            raise ConfigError(
                f"{name}: transformer_layers_per_block={self.transformer_layers_per_block!r} gives per-layer depths "
                "(an asymmetric UNet): it needs reverse_transformer_layers_per_block, the up blocks' depths"
            )
        up = per_block(reverse, n, f"{name}: reverse_transformer_layers_per_block") if reverse is not None else ()
        layers = per_block(self.layers_per_block, n, f"{name}: layers_per_block")
        blocks = [(self.down_block_types[i], down[i], layers[i], "transformer_layers_per_block") for i in range(n)]
        blocks += [
            (self.up_block_types[i], up[i], layers[n - 1 - i] + 1, "reverse_transformer_layers_per_block")
            for i in range(len(up))
        ]
        for block_type, depths, count, key in blocks:
            attention = (DOWN_BLOCK_TYPES | UP_BLOCK_TYPES)[block_type][0]
            if attention == "transformer" and isinstance(depths, tuple) and len(depths) < count:
                raise ConfigError(
                    f"{name}: {key} gives {block_type} the depths {depths!r}: one per layer, and it has {count}"
                )

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @property
    def blocks_time_embed_dim(self) -> int:
        """The width of the embedding the resnets receive: the class embedding appended doubles it."""
        return self.time_embed_dim * 2 if self.class_embeddings_concat else self.time_embed_dim


@dataclasses.dataclass
class UNet2DConditionOutput(BaseOutput):
    """`sample`: (B, out_channels, H, W) model prediction (noise, v or x0, as trained)."""

    sample: torch.Tensor


def level_options(cfg: Any, temb_channels: int) -> list[BlockOptions]:
    """One BlockOptions per down level, from a UNet (or ControlNet) config: Diffusers' per-block expansion.

    ControlNet configs lack the IF-only keys, hence the getattr defaults.
    """
    n = len(cfg.down_block_types)
    heads = per_block(getattr(cfg, "num_attention_heads", None) or cfg.attention_head_dim, n, "num_attention_heads")
    head_dims = per_block(cfg.attention_head_dim, n, "attention_head_dim")
    cross_dims = per_block(cfg.cross_attention_dim, n, "cross_attention_dim")
    layers = per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
    only_cross = per_block(cfg.only_cross_attention, n, "only_cross_attention")
    return [
        BlockOptions(
            temb_channels=temb_channels,
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            act_fn=cfg.act_fn,
            time_embedding_norm=cfg.resnet_time_scale_shift,
            skip_time_act=getattr(cfg, "resnet_skip_time_act", False),
            resnet_out_scale_factor=getattr(cfg, "resnet_out_scale_factor", 1.0),
            downsample_padding=cfg.downsample_padding,
            cross_attention_dim=cross_dims[i],
            num_heads=heads[i],
            head_dim=head_dims[i],
            transformer_layers=layers[i],
            use_linear_projection=cfg.use_linear_projection,
            only_cross_attention=only_cross[i],
            upcast_attention=bool(cfg.upcast_attention),
            cross_attention_norm=getattr(cfg, "cross_attention_norm", None),
        )
        for i in range(n)
    ]


class UNet2DConditionModel(
    LoraModelMixin,
    CustomDiffusionModelMixin,
    IPAdapterUNetMixin,
    FreeUMixin,
    AttentionSlicingMixin,
    ModelMixin,
    FusedProjectionsMixin,
    DeepCacheMixin,
):
    """Conditional UNet with Diffusers' config, state-dict keys and forward arguments."""

    config_class = UNet2DConditionConfig
    config: UNet2DConditionConfig
    _skip_layerwise_casting_patterns = ["norm"]  # as Diffusers'
    _supports_gradient_checkpointing = True
    _checkpointed_blocks = (UNetDownBlock, UNetUpBlock, UNetMidBlock, Transformer2DModel)

    def __init__(self, config: UNet2DConditionConfig | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__()
        cfg = self._init_config(config, kwargs)
        ch = cfg.block_out_channels
        n = len(ch)
        time_dim = cfg.time_embed_dim

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2)
        self.time_proj = Timesteps(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(
            ch[0], time_dim, cfg.act_fn, post_act_fn=cfg.timestep_post_act, cond_proj_dim=cfg.time_cond_proj_dim
        )
        self.encoder_hid_proj = (
            nn.Linear(cfg.encoder_hid_dim, cfg.cross_attention_dim) if cfg.encoder_hid_dim_type == "text_proj" else None
        )
        if cfg.class_embed_type == "timestep":  # IF-II: the noise level embedded like a timestep
            self.class_embedding = TimestepEmbedding(ch[0], time_dim, cfg.act_fn)
        elif cfg.class_embed_type == "projection":  # class labels (B, input_dim) through an MLP
            self.class_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, time_dim)
        elif cfg.class_embed_type == "simple_projection":
            self.class_embedding = nn.Linear(cfg.projection_class_embeddings_input_dim, time_dim)
        elif cfg.class_embed_type == "identity":  # class labels given as (B, time_embed_dim) embeddings
            self.class_embedding = nn.Identity()
        elif cfg.num_class_embeds is not None:  # x4 upscaler: one learned vector per noise level
            self.class_embedding = nn.Embedding(cfg.num_class_embeds, time_dim)
        else:
            self.class_embedding = None
        self.add_time_proj = None
        if cfg.addition_embed_type == "text":
            text_dim = cfg.encoder_hid_dim or cfg.cross_attention_dim
            self.add_embedding = TextTimeEmbedding(text_dim, time_dim, num_heads=cfg.addition_embed_type_num_heads)
        elif cfg.addition_embed_type == "text_time":  # SDXL: pooled text + sinusoidal size/crop micro-conditioning
            self.add_time_proj = Timesteps(cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, time_dim)
        else:
            self.add_embedding = None
        self.time_embed_act = activation(cfg.time_embedding_act_fn) if cfg.time_embedding_act_fn else None

        levels = level_options(cfg, cfg.blocks_time_embed_dim)
        layers = per_block(cfg.layers_per_block, n, "layers_per_block")
        up_depths = per_block(cfg.reverse_transformer_layers_per_block, n, "reverse_transformer_layers_per_block")
        self.down_blocks = nn.ModuleList(
            get_down_block(block_type, levels[i], ch[max(i - 1, 0)], ch[i], layers[i], add_downsample=i < n - 1)
            for i, block_type in enumerate(cfg.down_block_types)
        )

        # Built down, mid, up (Diffusers' random-init order) but registered down, up, mid (Diffusers' state-dict and
        # attn_processors order).
        self.up_blocks = nn.ModuleList()
        mid = dataclasses.replace(levels[-1], only_cross_attention=mid_only_cross_attention(cfg))
        self.mid_block = get_mid_block(cfg.mid_block_type, mid, ch[-1], cfg.mid_block_scale_factor)
        for i, block_type in enumerate(cfg.up_block_types):
            j = n - 1 - i  # the down level this up block mirrors
            # Diffusers' quirk, kept for weight compatibility: up blocks take every per-block option reversed except
            # attention_head_dim, which is indexed in down order.
            opts = dataclasses.replace(levels[j], head_dim=levels[i].head_dim)
            if cfg.reverse_transformer_layers_per_block is not None:  # asymmetric UNet: the up blocks' own depths
                opts = dataclasses.replace(opts, transformer_layers=up_depths[i])
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    opts,
                    in_channels=ch[max(j - 1, 0)],
                    prev_output_channel=ch[min(j + 1, n - 1)],
                    out_channels=ch[j],
                    num_layers=layers[j] + 1,
                    add_upsample=i < n - 1,
                )
            )
        for i, block in enumerate(self.up_blocks):
            block.resolution_idx = i
        self.num_upsamplers = n - 1

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_act = activation(cfg.act_fn)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2)

    # --- conditioning -----------------------------------------------------------------------------------------------
    def embed_conditions(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The (B, blocks_time_embed_dim) embedding every resnet receives."""
        batch = sample.shape[0]
        t_emb = self.time_proj(batch_timesteps(timestep, batch, sample.device)).to(sample.dtype)
        emb = self.time_embedding(t_emb, timestep_cond)
        if self.class_embedding is not None:
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(batch_timesteps(class_labels, batch, sample.device)).to(sample.dtype)
            class_emb = self.class_embedding(class_labels).to(sample.dtype)
            emb = torch.cat([emb, class_emb], dim=-1) if self.config.class_embeddings_concat else emb + class_emb
        if self.add_time_proj is not None:
            emb = emb + self.add_embedding(text_time_features(self.add_time_proj, added_cond_kwargs, emb.dtype))
        elif self.add_embedding is not None:
            emb = emb + self.add_embedding(encoder_hidden_states)  # the raw text, before encoder_hid_proj
        return self.time_embed_act(emb) if self.time_embed_act is not None else emb

    # --- forward ----------------------------------------------------------------------------------------------------
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        deep_cache: DeepCacheStep | None = None,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor, ...]:
        """Predict from `sample` (B, in_channels, H, W) at `timestep` (number, 0-d or (B,) tensor).

        encoder_hidden_states: (B, S, C) text embeddings. class_labels: noise level, for configs with a class
        embedding. attention_mask / encoder_attention_mask: (B, S) keep(1)/discard(0). down_block_additional_residuals
        (one per skip) and mid_block_additional_residual: ControlNet outputs, added to the skips and the mid output.
        timestep_cond: (B, time_cond_proj_dim), for an LCM-distilled UNet (time_cond_proj_dim set): the guidance-scale
        embedding (`guidance_scale_embedding`), added to the time features. added_cond_kwargs: for SDXL UNets
        (`addition_embed_type="text_time"`) {"text_embeds": (B, pooled width), "time_ids": (B, N)}; while IP-Adapters
        are loaded also (and then required) "image_embeds": [one tensor per adapter]; else None. Argument order as
        Diffusers; down_intrablock_additional_residuals (T2I-Adapter) must be None.
        deep_cache: one step of a DeepCache loop (models/deep_cache.py); the call then returns the tuple
        (sample, cached feature) whatever `return_dict`.
        """
        image_embeds, added_cond_kwargs = self._image_embeds(added_cond_kwargs)
        self._check_inputs(
            sample,
            encoder_hidden_states,
            class_labels,
            down_block_additional_residuals,
            mid_block_additional_residual,
            timestep_cond,
            unsupported=dict(down_intrablock_additional_residuals=down_intrablock_additional_residuals),
            # a DeepCache shallow step takes the ControlNet residuals of the levels it runs only
            partial_residuals=deep_cache is not None and deep_cache.feature is not None,
        )
        check_added_cond_kwargs(self.config, added_cond_kwargs, sample.shape[0])
        attention_mask = mask_to_bias(attention_mask, sample.dtype)
        encoder_attention_mask = mask_to_bias(encoder_attention_mask, sample.dtype)
        attn_kwargs = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            encoder_attention_mask=encoder_attention_mask,
        )
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.embed_conditions(
            sample, timestep, class_labels, encoder_hidden_states, timestep_cond, added_cond_kwargs
        )
        if self.config.encoder_hid_dim_type == "text_proj":
            attn_kwargs["encoder_hidden_states"] = self.encoder_hid_proj(encoder_hidden_states)
        elif self.config.encoder_hid_dim_type == "ip_image_proj":  # IP-Adapter: image tokens beside the text
            attn_kwargs["encoder_hidden_states"] = (encoder_hidden_states, self.encoder_hid_proj(image_embeds))
        if deep_cache is not None:
            return cached_forward(
                self,
                sample,
                emb,
                attn_kwargs,
                down_block_additional_residuals,
                mid_block_additional_residual,
                deep_cache,
            )

        hidden, skips = run_down_blocks(self.down_blocks, self.conv_in(sample), emb, **attn_kwargs)
        if down_block_additional_residuals is not None:
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))

        if self.mid_block is not None:
            hidden = self.mid_block(hidden, emb, **attn_kwargs)
        if mid_block_additional_residual is not None:
            hidden = hidden + mid_block_additional_residual

        # Diffusers passes the skip's size to the upsampler only when the input is not a multiple of the overall
        # down factor (an odd map rounded up on the way down). Shape-only logic.
        explicit_size = any(s % 2**self.num_upsamplers for s in sample.shape[-2:])
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if explicit_size and i < len(self.up_blocks) - 1 else None
            hidden = block(hidden, block_skips, emb, upsample_size=size, **attn_kwargs)

        out = self.conv_out(self.conv_act(self.conv_norm_out(hidden)))
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _check_inputs(
        self,
        sample: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None,
        down_residuals: tuple[torch.Tensor, ...] | None,
        mid_residual: torch.Tensor | None,
        timestep_cond: torch.Tensor | None,
        unsupported: dict[str, Any],
        partial_residuals: bool = False,
    ) -> None:
        cfg = self.config
        if timestep_cond is not None and cfg.time_cond_proj_dim is None:
            raise ValueError("timestep_cond given, but this UNet has no time_cond_proj_dim (not LCM-distilled)")
        if timestep_cond is not None and (timestep_cond.ndim != 2 or timestep_cond.shape[-1] != cfg.time_cond_proj_dim):
            raise ValueError(
                f"timestep_cond must be (batch, {cfg.time_cond_proj_dim}) (time_cond_proj_dim), "
                f"got {tuple(timestep_cond.shape)}"
            )
        for key, value in unsupported.items():
            if value is not None:
                raise ValueError(f"{key} is not supported by rapiddiff's UNet2DConditionModel; pass None")
        if not torch.is_tensor(sample) or sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            got = tuple(sample.shape) if torch.is_tensor(sample) else type(sample).__name__
            raise ValueError(f"sample must be a (batch, {cfg.in_channels}, height, width) tensor, got {got}")
        if not torch.is_tensor(encoder_hidden_states) or encoder_hidden_states.ndim != 3:
            got = (
                tuple(encoder_hidden_states.shape) if torch.is_tensor(encoder_hidden_states) else encoder_hidden_states
            )
            raise ValueError(f"encoder_hidden_states must be a (batch, tokens, dim) tensor, got {got}")
        if self.class_embedding is not None and class_labels is None:
            what = (
                f"class_embed_type={cfg.class_embed_type!r}"
                if cfg.class_embed_type
                else f"num_class_embeds={cfg.num_class_embeds}"
            )
            raise ValueError(f"class_labels is required: this UNet has {what}")
        if self.class_embedding is None and class_labels is not None:
            raise ValueError("class_labels given, but this UNet has no class embedding (class_embed_type is None)")
        if (down_residuals is None) != (mid_residual is None) and not partial_residuals:
            raise ValueError(
                "down_block_additional_residuals and mid_block_additional_residual (ControlNet outputs) go together; "
                f"got down={'None' if down_residuals is None else 'given'}, "
                f"mid={'None' if mid_residual is None else 'given'}"
            )
        n_skips = 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in self.down_blocks)
        if down_residuals is not None and (
            len(down_residuals) > n_skips or len(down_residuals) < n_skips and not partial_residuals
        ):
            raise ValueError(
                f"down_block_additional_residuals has {len(down_residuals)} tensors, this UNet has {n_skips} skips"
            )
