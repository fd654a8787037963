"""One attention module for every model, and a handful of tiny processors.

`Attention` owns the projections and the data layout (norms, head split, added text key/values, residual). A processor
only chooses the kernel: `AttnProcessor` is Diffusers' vanilla path (baddbmm + softmax, deterministic, exportable),
`AttnProcessor2_0` calls `torch.nn.functional.scaled_dot_product_attention` (the default). The `AttnAddedKV*` pair are
the same kernels for layers that attend over projected text tokens too (DeepFloyd IF). A user processor written for
Diffusers (`__call__(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None)`) works as is:
`Attention` offers the helpers Diffusers' processors call (`prepare_attention_mask`, `head_to_batch_dim`,
`get_attention_scores`, `norm_encoder_hidden_states`...), and Diffusers' own processor instances run unchanged.
`SlicedAttnProcessor` / `SlicedAttnAddedKVProcessor` run SDPA over slices of the batch x heads (attention slicing).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .fused_projections import fuse_projections, fused_qkv
from .layout import tokens_to_map

logger = logging.getLogger(__name__)

# Diffusers' processor classes by the layers they fit: plain layers, or layers with added text key/values (IF).
# Any other class from the `diffusers` package is refused by `set_processor` (it needs parts this layer lacks).
DIFFUSERS_PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "AttnProcessorNPU")
DIFFUSERS_ADDED_KV_PROCESSORS = ("AttnAddedKVProcessor", "AttnAddedKVProcessor2_0", "SlicedAttnAddedKVProcessor")


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


class SlicedAttnProcessor(AttnProcessor2_0):
    """Attention slicing: SDPA over `slice_size` (batch x head) rows at a time, so the attention scores of only that
    many rows are held at once. Same outputs as `AttnProcessor2_0` (Diffusers' `SlicedAttnProcessor`, which slices the
    same way, computes the vanilla arithmetic)."""

    def __init__(self, slice_size: int):
        check_slice_size(slice_size)
        self.slice_size = slice_size

    def kernel(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        b, h, lq, d = q.shape
        q, k, v = (t.reshape(b * h, -1, d) for t in (q, k, v))
        if mask is not None:
            mask = mask.expand(b, h, *mask.shape[2:]).reshape(b * h, *mask.shape[2:])
        outs = [
            F.scaled_dot_product_attention(
                q[i : i + self.slice_size],
                k[i : i + self.slice_size],
                v[i : i + self.slice_size],
                attn_mask=None if mask is None else mask[i : i + self.slice_size],
                scale=attn.scale,
            )
            for i in range(0, b * h, self.slice_size)  # static: shapes, not data
        ]
        return torch.cat(outs).reshape(b, h, lq, d)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(slice_size={self.slice_size})"


class SlicedAttnAddedKVProcessor(SlicedAttnProcessor):
    """Attention slicing for layers with added text key/value projections (IF UNets)."""

    added_kv = True


def warn_sdpa_in_use(owner: str, attention_op: Any = None) -> None:
    """What `enable_xformers_memory_efficient_attention` says: not an error, rapiddiff needs no xFormers."""
    op = f" (attention_op={attention_op!r} is not used)" if attention_op is not None else ""
    logger.warning(
        "%s.enable_xformers_memory_efficient_attention: rapiddiff does not use xFormers; its attention already runs "
        "torch.nn.functional.scaled_dot_product_attention (memory-efficient / flash kernels), now selected on every "
        "attention layer%s.",
        owner,
        op,
    )


def check_slice_size(slice_size: Any) -> None:
    if not isinstance(slice_size, int) or isinstance(slice_size, bool) or slice_size < 1:
        raise ValueError(f"slice_size must be a positive int (rows of batch x heads per slice), got {slice_size!r}")


def _diffusers_processor_fit(processor: Any) -> bool | None:
    """For an instance of a Diffusers processor class: whether it is for added-KV layers; None for other objects.
    Raises for Diffusers processors that no rapiddiff layer can run."""
    cls = type(processor)
    if not cls.__module__.split(".")[0] == "diffusers":
        return None
    if cls.__name__ in DIFFUSERS_PLAIN_PROCESSORS:
        return False
    if cls.__name__ in DIFFUSERS_ADDED_KV_PROCESSORS:
        return True
    raise TypeError(
        f"Diffusers' {cls.__name__} needs attention parts rapiddiff's layers do not have (fused or extra projections, "
        f"weights inside the processor); Diffusers' processors that run here: "
        f"{', '.join(DIFFUSERS_PLAIN_PROCESSORS + DIFFUSERS_ADDED_KV_PROCESSORS)}, or any processor of your own"
    )


def _call_parameters(processor: Any) -> frozenset[str] | None:
    """Keyword names `processor(attn, hidden_states, ...)` accepts; None when it takes **kwargs (or is opaque).
    Raises when it cannot take Diffusers' call (attn, hidden_states, encoder_hidden_states=, attention_mask=)."""
    try:
        sig = inspect.signature(processor)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return None
    try:
        sig.bind(None, None, encoder_hidden_states=None, attention_mask=None)
    except TypeError as e:
        raise TypeError(
            f"processor {processor!r} cannot be called as Diffusers calls processors, "
            f"processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **cross_attention_kwargs)"
            f": {e}"
        ) from None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return frozenset(sig.parameters)


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
        # Attributes Diffusers' processors read (features rapiddiff's layers never have are None / False).
        self.scale_qk = True
        self.inner_dim = inner
        self.out_dim = query_dim
        self.use_bias = bias
        self.is_cross_attention = cross_attention_dim is not None
        self.sliceable_head_dim = heads
        self.spatial_norm = None
        self.norm_q = self.norm_k = None
        self.norm_added_q = self.norm_added_k = None
        self.context_pre_only = None
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
        added = _diffusers_processor_fit(processor)
        if added is None:
            added = getattr(processor, "added_kv", None)
        if added is not None and added != (self.added_kv_proj_dim is not None):
            want = self.vanilla_processor(), self.default_processor()
            raise TypeError(
                f"{type(processor).__name__} does not fit this attention layer "
                f"({'with' if self.added_kv_proj_dim else 'without'} added key/value projections); "
                f"use {type(want[1]).__name__} or {type(want[0]).__name__}"
            )
        params = _call_parameters(processor)
        # A processor with weights (an nn.Module: IP-Adapter's image key/value projections) is a submodule, so that
        # `.to()` and `state_dict` see its weights, as in Diffusers; the plain ones live in __dict__.
        self.__dict__.pop("processor", None)
        self._modules.pop("processor", None)
        if isinstance(processor, nn.Module):
            self._modules["processor"] = processor
        else:
            self.__dict__["processor"] = processor
        self.__dict__["_processor_params"] = params

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
        params = self.__dict__["_processor_params"]
        if kwargs and params is not None:
            # As Diffusers: cross_attention_kwargs the processor does not take are dropped, with a warning.
            unused = [k for k in kwargs if k not in params]
            if unused:
                logger.warning(
                    "cross_attention_kwargs %s are not expected by %s and will be ignored",
                    unused,
                    type(self.processor).__name__,
                )
                kwargs = {k: v for k, v in kwargs.items() if k in params}
        return self.processor(
            self, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Sliced attention with `slice_size` (batch x head) rows per slice; None: back to the default (SDPA)."""
        if slice_size is None:
            self.set_processor(self.default_processor())
            return
        check_slice_size(slice_size)
        if slice_size > self.sliceable_head_dim:
            raise ValueError(f"slice_size={slice_size} must be <= this layer's number of heads ({self.heads})")
        sliced = SlicedAttnAddedKVProcessor if self.added_kv_proj_dim is not None else SlicedAttnProcessor
        self.set_processor(sliced(slice_size))

    # --- the one attention path -----------------------------------------------------------------------------------
    def attend(
        self,
        kernel: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        extra: Any = None,
    ) -> torch.Tensor:
        """hidden_states (B, C, H, W) or (B, L, C); encoder_hidden_states (B, S, Ckv) -> same shape as hidden_states.

        extra(q, out) -> out: more attention added to the heads' output (B, H, L, D) before `to_out` (IP-Adapter)."""
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
        if extra is not None:
            out = extra(q, out)
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

    # --- Diffusers' processor API: the helpers Diffusers' processors call on `attn` -------------------------------
    def prepare_attention_mask(
        self, attention_mask: torch.Tensor | None, target_length: int, batch_size: int, out_dim: int = 3
    ) -> torch.Tensor | None:
        """Diffusers' mask preparation: pad to the key length (by `target_length`, Diffusers' own rule), then repeat
        per head: (B*heads, Lq|1, Lk) for out_dim=3, (B, heads, Lq|1, Lk) for out_dim=4."""
        if attention_mask is None:
            return None
        if attention_mask.shape[-1] != target_length:
            attention_mask = F.pad(attention_mask, (0, target_length), value=0.0)
        if out_dim == 3:
            if attention_mask.shape[0] < batch_size * self.heads:
                attention_mask = attention_mask.repeat_interleave(self.heads, dim=0)
        elif out_dim == 4:
            attention_mask = attention_mask.unsqueeze(1).repeat_interleave(self.heads, dim=1)
        else:
            raise ValueError(f"out_dim={out_dim!r}; allowed: 3 or 4")
        return attention_mask

    def head_to_batch_dim(self, tensor: torch.Tensor, out_dim: int = 3) -> torch.Tensor:
        """(B, L, H*D) -> (B*H, L, D) for out_dim=3, (B, H, L, D) for out_dim=4 (a 4-D input's dims 1-2 merge)."""
        if tensor.ndim == 3:
            batch, seq, dim = tensor.shape
            extra = 1
        else:
            batch, extra, seq, dim = tensor.shape
        tensor = tensor.reshape(batch, seq * extra, self.heads, dim // self.heads).permute(0, 2, 1, 3)
        if out_dim == 3:
            tensor = tensor.reshape(batch * self.heads, seq * extra, dim // self.heads)
        return tensor

    def batch_to_head_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B*H, L, D) -> (B, L, H*D)."""
        batch, seq, dim = tensor.shape
        tensor = tensor.reshape(batch // self.heads, self.heads, seq, dim)
        return tensor.permute(0, 2, 1, 3).reshape(batch // self.heads, seq, dim * self.heads)

    def get_attention_scores(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Softmax attention probabilities (B*H, Lq, Lk) with Diffusers' arithmetic and upcast rules."""
        dtype = query.dtype
        if self.upcast_attention:
            query, key = query.float(), key.float()
        if attention_mask is None:
            base = torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype, device=query.device)
            beta = 0
        else:
            base, beta = attention_mask, 1
        scores = torch.baddbmm(base, query, key.transpose(-1, -2), beta=beta, alpha=self.scale)
        if self.upcast_softmax:
            scores = scores.float()
        return scores.softmax(dim=-1).to(dtype)

    def norm_encoder_hidden_states(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """`norm_cross` applied to (B, S, C) text states (group norm over channels)."""
        if self.norm_cross is None:
            raise ValueError("norm_encoder_hidden_states: this layer has no norm_cross (cross_attention_norm=None)")
        return self.norm_context(encoder_hidden_states)


def mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Keep(1)/discard(0) mask (B, S) -> additive bias (B, 1, S), as Diffusers."""
    if mask is None:
        return None
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)
