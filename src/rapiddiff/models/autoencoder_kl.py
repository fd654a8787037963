"""AutoencoderKL: the KL-regularised VAE of Stable Diffusion 1.x/2.x and the x4 upscaler (Diffusers' keys and config).

Encoder: conv_in -> down blocks (resnets + stride-2 conv) -> mid block (resnet, attention, resnet) -> norm/act/conv_out
giving the mean and log-variance of the latent. Decoder mirrors it with nearest-x2 upsampling.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..configuration import MODEL_MINIMUMS, Config, ConfigError
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
    sample_size: int | tuple[int, ...] = 32  # only used by Diffusers' tiling, which rapiddiff does not implement
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
class DecoderOutput:
    """`sample`: (B, C, H, W) decoded images in [-1, 1] (unclamped)."""

    sample: torch.Tensor

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.sample,)[i]


@dataclasses.dataclass
class AutoencoderKLOutput:
    """`latent_dist`: the posterior over latents."""

    latent_dist: DiagonalGaussianDistribution

    def __getitem__(self, i: int) -> DiagonalGaussianDistribution:
        return (self.latent_dist,)[i]


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


class MidBlock(nn.Module):
    """Resnet, single-head self-attention over all pixels (with its own GroupNorm and residual), resnet."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
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
        self.resnets = nn.ModuleList([_resnet(channels, channels, groups, act_fn) for _ in range(2)])

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
        self.mid_block = MidBlock(ch[-1], groups, act, cfg.mid_block_add_attention)
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
        self.mid_block = MidBlock(ch[0], groups, act, cfg.mid_block_add_attention)
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

    # --- options ---------------------------------------------------------------------------------------------------
    def enable_slicing(self) -> None:
        """Encode and decode a batch one sample at a time (less peak memory, same result)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self) -> None:
        raise NotImplementedError(
            "AutoencoderKL.enable_tiling: tiled VAE encoding/decoding is not implemented in rapiddiff; "
            "use enable_slicing() to lower memory for batches, or decode smaller images."
        )

    def disable_tiling(self) -> None:
        """Tiling is never enabled in rapiddiff, so there is nothing to disable."""

    @property
    def needs_upcasting(self) -> bool:
        """Whether Diffusers would decode this VAE in float32: float16 weights and `force_upcast` in the config."""
        return self.dtype == torch.float16 and self.config.force_upcast

    # --- encode / decode -------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """x: (B, in_channels, H, W) images in [-1, 1]; H and W multiples of the downsampling factor."""
        self._check_input("x", x, self.config.in_channels)
        posterior = DiagonalGaussianDistribution(self._sliced(self._encode, x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple:
        """z: (B, latent_channels, h, w) unscaled latents. `generator` is accepted for Diffusers' signature only:
        the KL decoder is deterministic (Diffusers ignores it too)."""
        self._check_input("z", z, self.config.latent_channels)
        image = self._sliced(self._decode, z)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def decode_upcast(self, z: torch.Tensor) -> torch.Tensor:
        """Decode as Diffusers' x4-upscale pipeline does: when `needs_upcasting`, the whole VAE runs in float32 for
        this call (and is cast back to float16 after); `z` is cast to the weights' dtype. Returns the image tensor."""
        if not self.needs_upcasting:
            return self.decode(z.to(self.dtype), return_dict=False)[0]
        self.to(torch.float32)
        try:
            return self.decode(z.to(torch.float32), return_dict=False)[0]
        finally:
            self.to(torch.float16)

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
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

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
