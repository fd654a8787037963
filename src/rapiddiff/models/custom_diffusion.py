"""Custom Diffusion's attention processors (Diffusers' class names, arguments and state-dict keys) and the UNet's
`load_attn_procs` / `save_attn_procs` entry points for their weights (the files are the loaders' work).

A Custom Diffusion processor replaces a layer's key/value projections of the text (`train_kv`) and optionally its
query and output projections (`train_q_out`) with its own fine-tuned copies; everything else is the layer's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hub import resolve_dir, resolve_file
from ..utils.concurrency import check_idle
from .attention_processor import Attention, AttnProcessor, sdpa_kernel, vanilla_kernel


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
    """Diffusers' `load_attn_procs` / `save_attn_procs` for Custom Diffusion weights (their files: load_attn_procs / save_attn_procs below)."""

    def load_attn_procs(self, pretrained_model_name_or_path_or_dict: Any, **kwargs: Any) -> None:
        """Custom Diffusion processors from a file (`pytorch_custom_diffusion_weights.bin` / `.safetensors`), folder,
        Hub id or state dict. LoRA weights load with `load_lora_adapter` / `pipe.load_lora_weights`."""
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
        if is_main_process:
            save_attn_procs(self, save_directory, weight_name, save_function, safe_serialization, **kwargs)


# --- files -----------------------------------------------------------------------------------------------------------
WEIGHT_NAME = "pytorch_custom_diffusion_weights.bin"
WEIGHT_NAME_SAFE = "pytorch_custom_diffusion_weights.safetensors"
_HUB_KWARGS = ("cache_dir", "local_files_only", "revision", "token", "subfolder")
_NO_EFFECT_KWARGS = ("low_cpu_mem_usage", "force_download", "proxies", "network_alphas", "adapter_name")


def _read(source: Any, weight_name: str | None, use_safetensors: bool | None, hub: dict) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(os.path.expanduser(str(source)))
    subfolder = hub.pop("subfolder", None)
    if path.is_file():
        file = path
    elif weight_name is not None:
        file = resolve_file(source, weight_name, subfolder, **hub)
    else:
        folder = resolve_dir(source, subfolder, allow_patterns=[WEIGHT_NAME_SAFE, WEIGHT_NAME], **hub)
        names = (WEIGHT_NAME_SAFE,) if use_safetensors else (WEIGHT_NAME_SAFE, WEIGHT_NAME)
        found = [folder / n for n in names if (folder / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no Custom Diffusion weights in {source!r}: looked for {', '.join(names)}")
        file = found[0]
    try:
        if file.name.endswith(".safetensors"):
            import safetensors.torch

            return safetensors.torch.load_file(str(file))
        return torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read Custom Diffusion file {file}: {type(e).__name__}: {e}") from e


def load_attn_procs(unet: nn.Module, source: Any, **kwargs: Any) -> None:
    """Custom Diffusion processors on the layers the weights name; the other layers keep their processors."""
    weight_name = kwargs.pop("weight_name", None)
    use_safetensors = kwargs.pop("use_safetensors", None)
    unknown = sorted(set(kwargs) - set(_HUB_KWARGS) - set(_NO_EFFECT_KWARGS))
    if unknown:
        raise TypeError(f"load_attn_procs got unexpected argument(s) {unknown}")
    check_idle(unet, "load_attn_procs")
    state = _read(source, weight_name, use_safetensors, {k: v for k, v in kwargs.items() if k in _HUB_KWARGS})
    if not any("custom_diffusion" in k for k in state):
        raise ValueError(
            "load_attn_procs loads Custom Diffusion weights (`*_custom_diffusion.*` keys); LoRA weights load with "
            "unet.load_lora_adapter(...) or pipe.load_lora_weights(...)"
        )
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if not torch.is_tensor(value):  # Diffusers' marker of a weightless processor: the layer keeps its own
            continue
        parts = key.split(".")
        cut = -3 if "to_out" in key else -2
        grouped.setdefault(".".join(parts[:cut]), {})[".".join(parts[cut:])] = value
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"Custom Diffusion weights: {key} holds nan/inf values")
    layers = {f"{n}.processor": m for n, m in unet.named_modules() if isinstance(m, Attention)}
    unknown_layers = sorted(set(grouped) - set(layers))
    if unknown_layers:
        raise ValueError(f"Custom Diffusion weights for layers this UNet does not have: {unknown_layers[:3]}")
    processors = {}
    for name, weights in grouped.items():
        if "to_k_custom_diffusion.weight" not in weights:
            raise ValueError(f"Custom Diffusion weights for {name}: to_k_custom_diffusion.weight missing")
        hidden, cross = weights["to_k_custom_diffusion.weight"].shape
        cls = (
            CustomDiffusionAttnProcessor
            if isinstance(layers[name].processor, AttnProcessor)
            else CustomDiffusionAttnProcessor2_0
        )
        proc = cls(train_kv=True, train_q_out="to_q_custom_diffusion.weight" in weights, hidden_size=hidden,
                   cross_attention_dim=cross, out_bias="to_out_custom_diffusion.0.bias" in weights)  # fmt: skip
        try:
            proc.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise ValueError(f"Custom Diffusion weights do not fit {name}: {e}") from None
        processors[name] = proc.to(device=unet.device, dtype=unet.dtype)
    for name, proc in processors.items():
        layers[name].set_processor(proc)


def save_attn_procs(
    unet: nn.Module,
    save_directory: str | os.PathLike,
    weight_name: str | None,
    save_function: Callable[..., Any] | None,
    safe_serialization: bool,
    **kwargs: Any,
) -> Path:
    if kwargs:
        raise TypeError(f"save_attn_procs got unexpected argument(s) {sorted(kwargs)}")
    procs = unet.attn_processors
    custom = {n: p for n, p in procs.items() if isinstance(p, CustomDiffusionAttnProcessor2_0)}
    if not custom:
        raise ValueError("save_attn_procs: no Custom Diffusion processors are set (LoRA weights: save_lora_weights)")
    state: dict[str, Any] = {
        f"{name}.{k}": v.detach().cpu().contiguous() for name, p in custom.items() for k, v in p.state_dict().items()
    }
    if not safe_serialization:  # Diffusers' layout marks the weightless processors
        state.update({name: {} for name, p in procs.items() if name not in custom or not p.state_dict()})
    folder = Path(save_directory)
    if folder.is_file():
        raise ValueError(f"save_attn_procs: {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (weight_name or (WEIGHT_NAME_SAFE if safe_serialization else WEIGHT_NAME))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if save_function is not None:
            save_function(state, str(tmp))
        elif safe_serialization:
            import safetensors.torch

            safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(state, str(tmp))
        os.replace(tmp, path)  # the file whole or not at all
    finally:
        tmp.unlink(missing_ok=True)
    return path
