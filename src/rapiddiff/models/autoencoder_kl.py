"""AutoencoderKL: the KL-regularised VAE of Stable Diffusion 1.x/2.x and the x4 upscaler (Diffusers' keys and config).

Encoder: conv_in -> down blocks (resnets + stride-2 conv) -> mid block (resnet, attention, resnet) -> norm/act/conv_out
giving the mean and log-variance of the latent. Decoder mirrors it with nearest-x2 upsampling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ..configuration import MODEL_MINIMUMS, Config, ConfigError
from ..utils.offload import onload
from ..utils.outputs import BaseOutput
from ..utils.torch_utils import randn_tensor
from .attention_processor import Attention
from .fused_projections import FusedProjectionsMixin
from .modeling_utils import ModelMixin
from .resnet import ACTIVATIONS, Downsample2D, ResnetBlock2D, Upsample2D

EPS = 1e-6  # every norm of the VAE (resnets, attention, output norms)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(Config):
    _minimums = MODEL_MINIMUMS

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32  # the tile size of tiled encoding/decoding (enable_tiling)
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        self.check_choice("down_block_types", ("DownEncoderBlock2D",))
        self.check_choice("up_block_types", ("UpDecoderBlock2D",))
        self.check_choice("act_fn", tuple(ACTIVATIONS))
        # Latent shift/normalisation belongs to SD3/Flux/SDXL-style pipelines, none of which rapiddiff implements.
        for key in ("shift_factor", "latents_mean", "latents_std"):
            self.check_choice(key, (None,))
        n = len(self.block_out_channels)
        for key in ("down_block_types", "up_block_types"):
            if len(getattr(self, key)) != n:
                raise ConfigError(
                    f"AutoencoderKLConfig: {key} has {len(getattr(self, key))} entries but block_out_channels has {n}"
                )


@dataclasses.dataclass
class DecoderOutput(BaseOutput):
    """`sample`: (B, C, H, W) decoded images in [-1, 1] (unclamped)."""

    sample: torch.Tensor


@dataclasses.dataclass
class AutoencoderKLOutput(BaseOutput):
    """`latent_dist`: the posterior over latents."""

    latent_dist: DiagonalGaussianDistribution


class DiagonalGaussianDistribution:
    """The encoder's posterior: `parameters` (B, 2*C, h, w) holds the mean and log-variance along channels."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        # Noise is drawn like Diffusers (on the generator's device, then moved), so a seed gives the same latents.
        noise = randn_tensor(
            self.mean.shape, generator=generator, device=self.parameters.device, dtype=self.parameters.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


def _resnet(in_channels: int, out_channels: int, groups: int, act_fn: str) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels, out_channels, temb_channels=None, groups=groups, eps=EPS, non_linearity=act_fn)


class DownEncoderBlock2D(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, downsample: bool
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
        )
        # padding=0: the encoder pads right/bottom by one before its stride-2 conv.
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, None)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, None)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class UNetMidBlock2D(nn.Module):
    """Resnet, single-head self-attention over all pixels (with its own GroupNorm and residual), resnet: the VAE's
    mid block, under Diffusers' class name."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        first = _resnet(channels, channels, groups, act_fn)  # resnet, attention, resnet: Diffusers' order
        attention = Attention(
            channels,
            heads=1,
            dim_head=channels,
            bias=True,
            upcast_softmax=True,
            norm_num_groups=groups,
            eps=EPS,
            residual_connection=True,
        )
        self.attentions = nn.ModuleList([attention] if add_attention else [])
        self.resnets = nn.ModuleList([first, _resnet(channels, channels, groups, act_fn)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, None)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x, None)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * latent_channels, H / f, W / f), f = 2 ** (len(block_out_channels) - 1)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        ch, groups, act = cfg.block_out_channels, cfg.norm_num_groups, cfg.act_fn
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, act, i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = UNetMidBlock2D(ch[-1], groups, act, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_act = nn.SiLU()  # SiLU whatever act_fn says, as in Diffusers
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, out_channels, h * f, w * f)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        ch, groups, act = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.act_fn
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(ch[0], groups, act, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, act, i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class AutoencoderKL(ModelMixin, FusedProjectionsMixin):
    """Diffusers' AutoencoderKL. `encode(x).latent_dist.sample(generator)` and `decode(z).sample` as in Diffusers.

    Latents are unscaled here: pipelines multiply by `config.scaling_factor` after encoding and divide before decoding.
    """

    config_class = AutoencoderKLConfig
    _supports_gradient_checkpointing = True
    _checkpointed_blocks = (Encoder, Decoder, UNetMidBlock2D)
    # Checkpoints from before Diffusers 0.14 name the mid-block attention projections like the original LDM code.
    _legacy_key_renames: ClassVar[dict[str, str]] = {
        ".query.": ".to_q.",
        ".key.": ".to_k.",
        ".value.": ".to_v.",
        ".proj_attn.": ".to_out.0.",
    }

    def __init__(self, config: AutoencoderKLConfig | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__()
        cfg = self._init_config(config, kwargs)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        latent = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if cfg.use_post_quant_conv else None
        self.use_slicing = False
        # Tiling, with Diffusers' attribute names and defaults: image tiles of `sample_size` pixels, latent tiles of
        # sample_size / 2**(levels - 1), overlapping by a quarter and blended linearly.
        self.use_tiling = False
        sample = cfg.sample_size[0] if isinstance(cfg.sample_size, (list, tuple)) else cfg.sample_size
        self.tile_sample_min_size = sample
        self.tile_latent_min_size = int(sample / self.downsampling_factor)
        self.tile_overlap_factor = 0.25

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    # --- options ---------------------------------------------------------------------------------------------------
    def enable_slicing(self) -> None:
        """Encode and decode a batch one sample at a time (less peak memory, same result)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_sample_min_size: int | None = None, tile_overlap_factor: float | None = None) -> None:
        """Encode and decode large images in overlapping tiles, blended (Diffusers' tiling: same pixels).

        Images larger than `tile_sample_min_size` (default: the config's `sample_size`) pixels, or latents larger than
        `tile_sample_min_size / downsampling_factor`, go tile by tile; `tile_overlap_factor` (default 0.25) is the
        share of a tile shared with its neighbour. Both arguments are rapiddiff extras; Diffusers users set the
        attributes `tile_sample_min_size`, `tile_latent_min_size`, `tile_overlap_factor`, which work here too."""
        sample, latent, overlap = self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor
        if tile_sample_min_size is not None:
            sample = tile_sample_min_size
            if isinstance(sample, int) and not isinstance(sample, bool):
                latent = sample // self.downsampling_factor
        if tile_overlap_factor is not None:
            overlap = tile_overlap_factor
        self._check_tiling(sample, latent, overlap)  # before anything changes
        self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor = sample, latent, overlap
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def _check_tiling(self, sample: Any = None, latent: Any = None, overlap: Any = None) -> None:
        """The tile settings (default: the attributes) fit this VAE: errors name them, before any tile runs."""
        f = self.downsampling_factor
        sample = self.tile_sample_min_size if sample is None else sample
        latent = self.tile_latent_min_size if latent is None else latent
        overlap = self.tile_overlap_factor if overlap is None else overlap
        for name, value in (("tile_sample_min_size", sample), ("tile_latent_min_size", latent)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AutoencoderKL tiling: {name} must be a positive int, got {value!r}")
        if sample % f or latent != sample // f:
            raise ValueError(
                f"AutoencoderKL tiling: tile_sample_min_size={sample} must be a multiple of the downsampling factor "
                f"{f}, and tile_latent_min_size={latent} must be tile_sample_min_size / {f} = {sample / f:g}"
            )
        if not isinstance(overlap, (int, float)) or isinstance(overlap, bool) or not 0 <= overlap < 1:
            raise ValueError(f"AutoencoderKL tiling: tile_overlap_factor must be in [0, 1), got {overlap!r}")
        if int(latent * (1 - overlap)) < 1:
            raise ValueError(
                f"AutoencoderKL tiling: tile_latent_min_size={latent} with tile_overlap_factor={overlap} leaves no "
                "stride between tiles; use larger tiles or less overlap"
            )

    @property
    def needs_upcasting(self) -> bool:
        """Whether Diffusers would decode this VAE in float32: float16 weights and `force_upcast` in the config."""
        return self.dtype == torch.float16 and self.config.force_upcast

    # --- encode / decode -------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """x: (B, in_channels, H, W) images in [-1, 1]; H and W multiples of the downsampling factor."""
        self._check_input("x", x, self.config.in_channels)
        onload(self)  # model CPU offload: encode is an entry point besides forward (Diffusers' apply_forward_hook)
        posterior = DiagonalGaussianDistribution(self._sliced(self._encode, x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple:
        """z: (B, latent_channels, h, w) unscaled latents. `generator` is accepted for Diffusers' signature only:
        the KL decoder is deterministic (Diffusers ignores it too)."""
        self._check_input("z", z, self.config.latent_channels)
        onload(self)
        image = self._sliced(self._decode, z)
        return DecoderOutput(sample=image) if return_dict else (image,)

    @contextlib.contextmanager
    def upcast(self) -> Iterator[None]:
        """Inside the block the VAE runs in float32 when `needs_upcasting` (cast back to float16 after), as
        Diffusers' SDXL and x4-upscale pipelines encode and decode."""
        if not self.needs_upcasting:
            yield
            return
        self.to(torch.float32)
        try:
            yield
        finally:
            self.to(torch.float16)

    def decode_upcast(self, z: torch.Tensor) -> torch.Tensor:
        """Decode as Diffusers' x4-upscale and SDXL pipelines do: in float32 when `needs_upcasting` (`upcast`); `z`
        is cast to the weights' dtype. Returns the image tensor."""
        with self.upcast():
            return self.decode(z.to(self.dtype), return_dict=False)[0]

    def decode_finite(self, z: torch.Tensor) -> torch.Tensor:
        """Decode in the VAE's own dtype (as Diffusers' SD pipelines do, at float16 speed); if a float16 VAE with
        `force_upcast` overflows (inf/NaN pixels: black images), decode again in float32 and say so.

        The finiteness check is one host sync after the denoising loop, never inside it."""
        image = self.decode(z.to(self.dtype), return_dict=False)[0]
        if self.needs_upcasting and not bool(torch.isfinite(image).all()):
            logger.warning("AutoencoderKL: float16 decode overflowed (force_upcast=True); decoding again in float32")
            image = self.decode_upcast(z)
        return image

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> DecoderOutput | tuple:
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self.tiled_encode_tensor(x)
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self.tiled_decode(z, return_dict=False)[0]
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # --- tiling (Diffusers' tiles, overlap and blending, so the same pixels) -----------------------------------------
    def tiled_encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> the encoder's moments (B, 2 * latent_channels, H / f, W / f), tile by tile."""
        self._check_tiling()
        onload(self)

        def encode_tile(tile: torch.Tensor) -> torch.Tensor:
            h = self.encoder(tile)
            return self.quant_conv(h) if self.quant_conv is not None else h

        return _tiled(x, encode_tile, self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor)

    def tiled_encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Diffusers' `tiled_encode`: the posterior of a tiled encoding, whatever the image size."""
        posterior = DiagonalGaussianDistribution(self.tiled_encode_tensor(x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Diffusers' `tiled_decode`: z (B, latent_channels, h, w) decoded tile by tile, whatever its size."""
        self._check_tiling()
        onload(self)

        def decode_tile(tile: torch.Tensor) -> torch.Tensor:
            return self.decoder(self.post_quant_conv(tile) if self.post_quant_conv is not None else tile)

        image = _tiled(z, decode_tile, self.tile_latent_min_size, self.tile_sample_min_size, self.tile_overlap_factor)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def blend_v(self, a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
        """The top `blend_extent` rows of b faded in from the bottom rows of a (returns a new tensor)."""
        return _blend(a, b, blend_extent, dim=2)

    def blend_h(self, a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
        """The left `blend_extent` columns of b faded in from the right columns of a (returns a new tensor)."""
        return _blend(a, b, blend_extent, dim=3)

    def _sliced(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(s) for s in x.split(1)])
        return fn(x)

    @staticmethod
    def _check_input(name: str, x: torch.Tensor, channels: int) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a (batch, {channels}, height, width) tensor, got {got}")

    def _rename_legacy_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = super()._rename_legacy_keys(state)
        # Some converted LDM checkpoints keep the attention projections as 1x1 convs: (out, in, 1, 1) -> (out, in).
        return {
            k: v[:, :, 0, 0] if v.ndim == 4 and ".attentions." in k and k.endswith(".weight") else v
            for k, v in state.items()
        }


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Diffusers' linear cross-fade over the first `extent` rows (dim=2) / columns (dim=3) of b, vectorised.

    The weights are computed in float64 and rounded to b's dtype, as Diffusers' Python-float factors are: same pixels."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    ramp = torch.arange(extent, dtype=torch.float64, device=b.device) / extent
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    w_b = ramp.to(b.dtype).reshape(shape)
    w_a = (1 - ramp).to(b.dtype).reshape(shape)
    head = a.narrow(dim, a.shape[dim] - extent, extent) * w_a + b.narrow(dim, 0, extent) * w_b
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)


def _tiled(
    x: torch.Tensor,
    run: Callable[[torch.Tensor], torch.Tensor],
    in_tile: int,
    out_tile: int,
    overlap_factor: float,
) -> torch.Tensor:
    """Run `run` on overlapping `in_tile` squares of x (stride in_tile * (1 - overlap)), blend each output tile with
    its already-blended upper and left neighbours over out_tile * overlap rows / columns, crop and stitch.

    Diffusers blends in place, so a tile's neighbours are blended before it is: kept here by storing blended tiles."""
    stride = int(in_tile * (1 - overlap_factor))
    extent = int(out_tile * overlap_factor)
    limit = out_tile - extent
    rows = [
        [run(x[:, :, i : i + in_tile, j : j + in_tile]) for j in range(0, x.shape[3], stride)]
        for i in range(0, x.shape[2], stride)
    ]
    for i, row in enumerate(rows):
        for j in range(len(row)):
            if i > 0:
                row[j] = _blend(rows[i - 1][j], row[j], extent, dim=2)
            if j > 0:
                row[j] = _blend(row[j - 1], row[j], extent, dim=3)
    return torch.cat([torch.cat([t[:, :, :limit, :limit] for t in row], dim=3) for row in rows], dim=2)
