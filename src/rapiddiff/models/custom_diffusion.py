"""Custom Diffusion's attention processors (Diffusers' class names, arguments and state-dict keys) and the UNet's
`load_attn_procs` / `save_attn_procs` entry points for their weights (the files are the loaders' work).

A Custom Diffusion processor replaces a layer's key/value projections of the text (`train_kv`) and optionally its
query and output projections (`train_q_out`) with its own fine-tuned copies; everything else is the layer's.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .attention_processor import Attention, sdpa_kernel, vanilla_kernel


class CustomDiffusionAttnProcessor2_0(nn.Module):
    """Attention with Custom Diffusion's projections (SDPA)."""

    kernel = staticmethod(sdpa_kernel)
    added_kv = False

    def __init__(
        self,
        train_kv: bool = True,
        train_q_out: bool = True,
        hidden_size: int | None = None,
        cross_attention_dim: int | None = None,
        out_bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if (train_kv or train_q_out) and hidden_size is None:
            raise ValueError("hidden_size is required when train_kv or train_q_out is True")
        self.train_kv = train_kv
        self.train_q_out = train_q_out
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        if train_kv:
            kv_dim = cross_attention_dim or hidden_size
            self.to_k_custom_diffusion = nn.Linear(kv_dim, hidden_size, bias=False)
            self.to_v_custom_diffusion = nn.Linear(kv_dim, hidden_size, bias=False)
        if train_q_out:
            self.to_q_custom_diffusion = nn.Linear(hidden_size, hidden_size, bias=False)
            self.to_out_custom_diffusion = nn.ModuleList(
                [nn.Linear(hidden_size, hidden_size, bias=out_bias), nn.Dropout(dropout)]
            )

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if hidden_states.ndim != 3:
            raise ValueError(
                f"{type(self).__name__} runs on token layers (batch, tokens, channels), as in Diffusers; got "
                f"{tuple(hidden_states.shape)}"
            )
        x = hidden_states
        q = self.to_q_custom_diffusion(x) if self.train_q_out else attn.to_q(x)
        cross = encoder_hidden_states is not None
        context = attn.norm_context(encoder_hidden_states) if cross else x
        if self.train_kv:
            k = self.to_k_custom_diffusion(context.to(self.to_k_custom_diffusion.weight.dtype))
            v = self.to_v_custom_diffusion(context.to(self.to_v_custom_diffusion.weight.dtype))
            k, v = k.to(attn.to_q.weight.dtype), v.to(attn.to_q.weight.dtype)
        else:
            k, v = attn.to_k(context), attn.to_v(context)
        if cross:  # the first text token's key/value get no gradient, as Custom Diffusion trains them
            k = torch.cat([k[:, :1].detach(), k[:, 1:]], dim=1)
            v = torch.cat([v[:, :1].detach(), v[:, 1:]], dim=1)
        mask = attn.prepare_mask(attention_mask, x.shape[0], k.shape[1])
        out = self.kernel(attn, attn.split_heads(q), attn.split_heads(k), attn.split_heads(v), mask)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        if self.train_q_out:
            return self.to_out_custom_diffusion[1](self.to_out_custom_diffusion[0](out))
        return attn.to_out[0](out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(train_kv={self.train_kv}, train_q_out={self.train_q_out})"


class CustomDiffusionAttnProcessor(CustomDiffusionAttnProcessor2_0):
    """Custom Diffusion with the vanilla kernel (explicit baddbmm + softmax)."""

    kernel = staticmethod(vanilla_kernel)


class CustomDiffusionModelMixin:
    """Diffusers' `load_attn_procs` / `save_attn_procs` for Custom Diffusion weights (rapiddiff.loaders.custom_diffusion)."""

    def load_attn_procs(self, pretrained_model_name_or_path_or_dict: Any, **kwargs: Any) -> None:
        """Custom Diffusion processors from a file (`pytorch_custom_diffusion_weights.bin` / `.safetensors`), folder,
        Hub id or state dict. LoRA weights load with `load_lora_adapter` / `pipe.load_lora_weights`."""
        from ..loaders.custom_diffusion import load_attn_procs

        load_attn_procs(self, pretrained_model_name_or_path_or_dict, **kwargs)

    def save_attn_procs(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Any = None,
        safe_serialization: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write the Custom Diffusion processors' weights (Diffusers' file names and keys)."""
        from ..loaders.custom_diffusion import save_attn_procs

        if is_main_process:
            save_attn_procs(self, save_directory, weight_name, save_function, safe_serialization, **kwargs)
