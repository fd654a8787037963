"""UNet down / mid / up blocks: resnets, an optional attention after each resnet, an optional resampler.

Diffusers has one class per combination; here the code is one class per direction (`UNetDownBlock`, `UNetUpBlock`,
`UNetMidBlock`), and a block type is data; each block type is a bodiless subclass with Diffusers' class name
(`CrossAttnDownBlock2D`...), so that `type(block).__name__` is what tools matching Diffusers' blocks by name expect:
    attention  "transformer": Transformer2DModel (Stable Diffusion)
               "added_kv":    Attention over its own pixels plus projected text tokens (DeepFloyd IF)
               None
    resampler  "conv":   Downsample2D (stride-2 conv) / Upsample2D (nearest x2 + conv)          (SD family)
               "resnet": ResnetBlock2D(down=True) / ResnetBlock2D(up=True): pool / nearest x2  (IF family)
Module names (`resnets.N`, `attentions.N`, `downsamplers.0`, `upsamplers.0`) are Diffusers' state-dict keys.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import torch
from torch import nn

from ..utils.torch_utils import apply_freeu
from .attention_processor import Attention
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .transformer_2d import Transformer2DModel

# block type -> (attention kind, resampler kind)
DOWN_BLOCK_TYPES = {
    "DownBlock2D": (None, "conv"),
    "CrossAttnDownBlock2D": ("transformer", "conv"),
    "ResnetDownsampleBlock2D": (None, "resnet"),
    "SimpleCrossAttnDownBlock2D": ("added_kv", "resnet"),
}
UP_BLOCK_TYPES = {
    "UpBlock2D": (None, "conv"),
    "CrossAttnUpBlock2D": ("transformer", "conv"),
    "ResnetUpsampleBlock2D": (None, "resnet"),
    "SimpleCrossAttnUpBlock2D": ("added_kv", "resnet"),
}
# The up blocks FreeU acts on (Diffusers applies it in these two only; IF's blocks ignore it).
FREEU_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
# mid block type -> attention kind; the mid block is resnet, then (attention, resnet) once (just a resnet if None)
MID_BLOCK_TYPES = {
    "UNetMidBlock2DCrossAttn": "transformer",
    "UNetMidBlock2DSimpleCrossAttn": "added_kv",
    "UNetMidBlock2D": None,
}


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """What the blocks of one UNet level need besides channel and layer counts (Diffusers' get_*_block kwargs)."""

    temb_channels: int
    groups: int
    eps: float
    act_fn: str
    time_embedding_norm: str = "default"
    # Honoured by the IF-family blocks (resnet resampling) only, as in Diffusers.
    skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    downsample_padding: int = 1
    cross_attention_dim: int = 1280
    num_heads: int = 8  # transformer attention: number of heads, channels split among them
    head_dim: int = 64  # added-KV attention: channels per head
    # Transformer depth: one for every layer of the block, or one per layer (Diffusers' asymmetric UNets; entries
    # past the block's layer count are unused, as in Diffusers).
    transformer_layers: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    cross_attention_norm: str | None = None


# --- building ---------------------------------------------------------------------------------------------------
def make_resnet(
    o: BlockOptions,
    in_channels: int,
    out_channels: int,
    *,
    skip_time_act: bool = False,
    output_scale_factor: float = 1.0,
    up: bool = False,
    down: bool = False,
) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels,
        out_channels,
        temb_channels=o.temb_channels,
        groups=o.groups,
        eps=o.eps,
        non_linearity=o.act_fn,
        time_embedding_norm=o.time_embedding_norm,
        skip_time_act=skip_time_act,
        output_scale_factor=output_scale_factor,
        up=up,
        down=down,
    )


def make_attention(kind: str, o: BlockOptions, channels: int, layer: int = 0) -> nn.Module:
    """The attention of the block's `layer`-th layer."""
    if kind == "transformer":
        depth = o.transformer_layers
        return Transformer2DModel(
            o.num_heads,
            channels // o.num_heads,
            channels,
            o.cross_attention_dim,
            num_layers=depth if isinstance(depth, int) else depth[layer],
            norm_num_groups=o.groups,
            use_linear_projection=o.use_linear_projection,
            only_cross_attention=o.only_cross_attention,
            upcast_attention=o.upcast_attention,
        )
    if kind == "added_kv":
        return Attention(
            query_dim=channels,
            cross_attention_dim=channels,
            heads=channels // o.head_dim,
            dim_head=o.head_dim,
            added_kv_proj_dim=o.cross_attention_dim,
            norm_num_groups=o.groups,
            bias=True,
            upcast_softmax=True,
            only_cross_attention=o.only_cross_attention,
            cross_attention_norm=o.cross_attention_norm,
        )
    raise ValueError(f"attention kind {kind!r}; allowed: 'transformer', 'added_kv'")


def _resnet_options(resampler: str, o: BlockOptions) -> dict[str, Any]:
    # Diffusers' IF-family blocks pass resnet_skip_time_act / resnet_out_scale_factor to their resnets; SD's do not.
    if resampler == "resnet":
        return dict(skip_time_act=o.skip_time_act, output_scale_factor=o.resnet_out_scale_factor)
    return {}


def _lookup(table: dict[str, Any], block_type: str, what: str) -> Any:
    try:
        return table[block_type]
    except KeyError:
        raise ValueError(f"{what}={block_type!r} is not supported; allowed: {', '.join(table)}") from None


def get_down_block(
    block_type: str, o: BlockOptions, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool
) -> UNetDownBlock:
    attention, resampler = _lookup(DOWN_BLOCK_TYPES, block_type, "down block type")
    res = _resnet_options(resampler, o)
    resnets, attentions = [], [] if attention else None
    for i in range(num_layers):  # resnet, attention, resnet...: Diffusers' construction (random-init) order
        resnets.append(make_resnet(o, in_channels if i == 0 else out_channels, out_channels, **res))
        if attention:
            attentions.append(make_attention(attention, o, out_channels, i))
    if not add_downsample:
        downsampler = None
    elif resampler == "resnet":
        downsampler = make_resnet(o, out_channels, out_channels, down=True, **res)
    else:
        downsampler = Downsample2D(out_channels, padding=o.downsample_padding)
    return BLOCK_CLASSES[block_type](resnets, attentions, downsampler)


def get_up_block(
    block_type: str,
    o: BlockOptions,
    in_channels: int,
    prev_output_channel: int,
    out_channels: int,
    num_layers: int,
    add_upsample: bool,
) -> UNetUpBlock:
    """`in_channels`: the skip width of the level below (taken by the last resnet); `prev_output_channel`: input."""
    attention, resampler = _lookup(UP_BLOCK_TYPES, block_type, "up block type")
    res = _resnet_options(resampler, o)
    resnets, attentions = [], [] if attention else None
    for i in range(num_layers):  # Diffusers' construction order, as in get_down_block
        skip = in_channels if i == num_layers - 1 else out_channels
        resnets.append(make_resnet(o, (prev_output_channel if i == 0 else out_channels) + skip, out_channels, **res))
        if attention:
            attentions.append(make_attention(attention, o, out_channels, i))
    if not add_upsample:
        upsampler = None
    elif resampler == "resnet":
        upsampler = make_resnet(o, out_channels, out_channels, up=True, **res)
    else:
        upsampler = Upsample2D(out_channels)
    return BLOCK_CLASSES[block_type](resnets, attentions, upsampler)


def get_mid_block(
    block_type: str | None, o: BlockOptions, channels: int, output_scale_factor: float
) -> UNetMidBlock | None:
    if block_type is None:
        return None
    attention = _lookup(MID_BLOCK_TYPES, block_type, "mid_block_type")
    # As Diffusers: the mid resnets scale by mid_block_scale_factor; only the added-KV mid block passes
    # skip_time_act, and the transformer mid block has no only_cross_attention.
    res = dict(output_scale_factor=output_scale_factor, skip_time_act=o.skip_time_act and attention == "added_kv")
    if attention == "transformer":
        o = dataclasses.replace(o, only_cross_attention=False)
    resnets = [make_resnet(o, channels, channels, **res)]  # resnet, attention, resnet: Diffusers' order
    attentions = [make_attention(attention, o, channels)] if attention else None
    if attention:
        resnets.append(make_resnet(o, channels, channels, **res))
    return BLOCK_CLASSES[block_type](resnets, attentions)


# --- running ----------------------------------------------------------------------------------------------------
def attend(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    encoder_attention_mask: torch.Tensor | None,
    cross_attention_kwargs: dict[str, Any] | None,
) -> torch.Tensor:
    """Run either attention kind on a feature map (B, C, H, W); masks are additive (B, 1, S)."""
    if isinstance(attn, Transformer2DModel):
        return attn(
            hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask, cross_attention_kwargs
        )
    # Added-KV layers take one mask: attention_mask if given, else the text mask (Diffusers' rule).
    mask = attention_mask
    if mask is None and encoder_hidden_states is not None:
        mask = encoder_attention_mask
    return attn(hidden_states, encoder_hidden_states, attention_mask=mask, **(cross_attention_kwargs or {}))


def resample(
    layer: nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor | None, size: torch.Size | None = None
) -> torch.Tensor:
    if isinstance(layer, ResnetBlock2D):  # always exactly x2 or /2, as Diffusers (which ignores `size` here)
        return layer(hidden_states, temb)
    if isinstance(layer, Upsample2D):
        return layer(hidden_states, size)
    return layer(hidden_states)


def run_down_blocks(
    blocks: nn.ModuleList, hidden_states: torch.Tensor, temb: torch.Tensor, **attn_kwargs: Any
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The encoder half shared by the UNet and the ControlNet: (last output, skips), the skips starting with
    `hidden_states` (the conv_in output) and holding every intermediate map of every down block."""
    skips = (hidden_states,)
    for block in blocks:
        hidden_states, block_skips = block(hidden_states, temb, **attn_kwargs)
        skips += block_skips
    return hidden_states, skips


def first_skips(
    blocks: nn.ModuleList, hidden_states: torch.Tensor, temb: torch.Tensor, count: int, **attn_kwargs: Any
) -> tuple[torch.Tensor, ...]:
    """The first `count` skips of `run_down_blocks`, running no layer past the last one needed."""
    skips = (hidden_states,)
    for block in blocks:
        need = count - len(skips)
        if need <= 0:
            break
        stop = need if need <= len(block.resnets) else None  # None: the whole block, downsampler included
        hidden_states, block_skips = block(hidden_states, temb, stop=stop, **attn_kwargs)
        skips += block_skips
    return skips[:count]


class _Block(nn.Module):
    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        # empty, not None, when the block has none: tools that walk Diffusers' blocks iterate `attentions` (DeepCache)
        self.attentions = nn.ModuleList(attentions or [])
        self.has_cross_attention = attentions is not None  # Diffusers' flag, read by callers

    @property
    def block_type(self) -> str:
        """The config's block type: Diffusers' class name, which this block's class has."""
        return type(self).__name__


class UNetDownBlock(_Block):
    """resnet [-> attention] x N, then an optional downsampler; returns the output and every intermediate (skips)."""

    def __init__(
        self,
        resnets: list[nn.Module],
        attentions: list[nn.Module] | None,
        downsampler: nn.Module | None,
    ):
        super().__init__(resnets, attentions)
        self.downsamplers = nn.ModuleList([downsampler]) if downsampler is not None else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        stop: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """`stop`: run only the first `stop` layers (resnet and attention), not the downsampler (DeepCache's shallow
        steps)."""
        skips = []
        for i, resnet in enumerate(list(self.resnets)[:stop]):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions:
                hidden_states = attend(
                    self.attentions[i],
                    hidden_states,
                    encoder_hidden_states,
                    attention_mask,
                    encoder_attention_mask,
                    cross_attention_kwargs,
                )
            skips.append(hidden_states)
        if self.downsamplers is not None and stop is None:
            hidden_states = resample(self.downsamplers[0], hidden_states, temb)
            skips.append(hidden_states)
        return hidden_states, tuple(skips)


class UNetUpBlock(_Block):
    """(concat the last skip -> resnet [-> attention]) x N, then an optional upsampler."""

    def __init__(
        self,
        resnets: list[nn.Module],
        attentions: list[nn.Module] | None,
        upsampler: nn.Module | None,
    ):
        super().__init__(resnets, attentions)
        self.upsamplers = nn.ModuleList([upsampler]) if upsampler is not None else None
        self.resolution_idx: int | None = None  # this block's index among the UNet's up blocks (FreeU's stage)
        # FreeU factors (Diffusers' attribute names), set by UNet2DConditionModel.enable_freeu; None: off.
        self.s1: float | None = None
        self.s2: float | None = None
        self.b1: float | None = None
        self.b2: float | None = None

    def freeu_factors(self) -> tuple[float, float, float, float] | None:
        """(s1, s2, b1, b2) when FreeU acts on this block: Diffusers' rule, every factor set and non-zero."""
        factors = (self.s1, self.s2, self.b1, self.b2)
        if self.block_type not in FREEU_BLOCK_TYPES or not all(factors):
            return None
        return factors  # type: ignore[return-value]

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        upsample_size: torch.Size | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """`res_hidden_states_tuple`: this block's skips, consumed last first; `upsample_size`: (H, W) or None (x2).
        `start` / `stop`: run layers start..stop-1 only, the upsampler only when `stop` is None (DeepCache's split of
        the block at its cached feature; resnet i always takes skip -1 - i)."""
        freeu = self.freeu_factors()  # module attributes, not data: a compiled graph guards on them
        for i in range(start, len(self.resnets) if stop is None else stop):
            resnet = self.resnets[i]
            skip = res_hidden_states_tuple[-1 - i]
            if freeu is not None:
                hidden_states, skip = apply_freeu(self.resolution_idx, hidden_states, skip, *freeu)
            hidden_states = torch.cat([hidden_states, skip], dim=1)
            hidden_states = resnet(hidden_states, temb)
            if self.attentions:
                hidden_states = attend(
                    self.attentions[i],
                    hidden_states,
                    encoder_hidden_states,
                    attention_mask,
                    encoder_attention_mask,
                    cross_attention_kwargs,
                )
        if self.upsamplers is not None and stop is None:
            hidden_states = resample(self.upsamplers[0], hidden_states, temb, upsample_size)
        return hidden_states


class UNetMidBlock(_Block):
    """resnet, then (attention -> resnet) for each attention."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        # a list, not `self.resnets[1:]`: slicing a ModuleList builds (and registers) a new module at every call
        for attn, resnet in zip(self.attentions, list(self.resnets)[1:]):
            hidden_states = attend(
                attn,
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                encoder_attention_mask,
                cross_attention_kwargs,
            )
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


# --- Diffusers' block classes (the block types of the tables above) ---------------------------------------------
class DownBlock2D(UNetDownBlock):
    """Resnets, stride-2 conv downsampler."""


class CrossAttnDownBlock2D(UNetDownBlock):
    """Resnet -> Transformer2DModel layers, stride-2 conv downsampler."""


class ResnetDownsampleBlock2D(UNetDownBlock):
    """Resnets, resnet downsampler (IF)."""


class SimpleCrossAttnDownBlock2D(UNetDownBlock):
    """Resnet -> added-KV attention layers, resnet downsampler (IF)."""


class UpBlock2D(UNetUpBlock):
    """Resnets, nearest x2 + conv upsampler."""


class CrossAttnUpBlock2D(UNetUpBlock):
    """Resnet -> Transformer2DModel layers, nearest x2 + conv upsampler."""


class ResnetUpsampleBlock2D(UNetUpBlock):
    """Resnets, resnet upsampler (IF)."""


class SimpleCrossAttnUpBlock2D(UNetUpBlock):
    """Resnet -> added-KV attention layers, resnet upsampler (IF)."""


class UNetMidBlock2DCrossAttn(UNetMidBlock):
    """Resnet, Transformer2DModel, resnet."""


class UNetMidBlock2DSimpleCrossAttn(UNetMidBlock):
    """Resnet, added-KV attention, resnet (IF)."""


class UNetMidBlock2D(UNetMidBlock):
    """One resnet (a UNet's mid block without attention)."""


BLOCK_CLASSES: dict[str, type[_Block]] = {
    cls.__name__: cls
    for cls in (
        DownBlock2D,
        CrossAttnDownBlock2D,
        ResnetDownsampleBlock2D,
        SimpleCrossAttnDownBlock2D,
        UpBlock2D,
        CrossAttnUpBlock2D,
        ResnetUpsampleBlock2D,
        SimpleCrossAttnUpBlock2D,
        UNetMidBlock2DCrossAttn,
        UNetMidBlock2DSimpleCrossAttn,
        UNetMidBlock2D,
    )
}
assert set(BLOCK_CLASSES) == {*DOWN_BLOCK_TYPES, *UP_BLOCK_TYPES, *MID_BLOCK_TYPES}


class FreeUMixin:
    """Diffusers' `enable_freeu` / `disable_freeu` on a UNet: the factors live on its up blocks."""

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (https://huggingface.co/papers/2309.11497) as Diffusers: in the first two up levels, the backbone's
        first half of channels times b1 / b2 and the skips' low frequencies times s1 / s2. Diffusers' rule applies:
        a factor of 0 turns FreeU off; IF's up blocks ignore it. Changing the factors recompiles a compiled UNet."""
        for name, value in (("s1", s1), ("s2", s2), ("b1", b1), ("b2", b2)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"enable_freeu: {name} must be a float, got {value!r}")
        for block in self.up_blocks:
            block.s1, block.s2, block.b1, block.b2 = float(s1), float(s2), float(b1), float(b2)

    def disable_freeu(self) -> None:
        for block in self.up_blocks:
            block.s1 = block.s2 = block.b1 = block.b2 = None


def mid_only_cross_attention(cfg: Any) -> bool:
    """Diffusers: mid_block_only_cross_attention, else a bool only_cross_attention, else False."""
    if cfg.mid_block_only_cross_attention is not None:
        return cfg.mid_block_only_cross_attention
    return cfg.only_cross_attention if isinstance(cfg.only_cross_attention, bool) else False
