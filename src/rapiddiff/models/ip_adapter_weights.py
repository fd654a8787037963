"""IP-Adapter weights on a UNet: Diffusers' (the original release's) files read and checked, the image projection
built from its keys (IP-Adapter, Plus, Full Face, FaceID), the processors' `to_k_ip` / `to_v_ip` placed on the
cross-attention layers, their scales set and everything removed again. The pipelines' API over it is
`rapiddiff.loaders.ip_adapter`."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hub import resolve_file
from ..utils.concurrency import check_idle
from .attention_processor import Attention, AttnProcessor
from .ip_adapter import (
    IP_ADAPTER_PROCESSORS,
    ImageProjection,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterFaceIDImageProjection,
    IPAdapterFullImageProjection,
    IPAdapterPlusImageProjection,
    MultiIPAdapterImageProjection,
)

# The UNet's image-token count per projection kind (Diffusers' `num_image_text_embeds`).
FULL_FACE_TOKENS = 257  # 256 CLIP patches + the class token
PLUS_RESAMPLER_RENAMES = (  # original perceiver-resampler block names -> Diffusers' (after "0.to" -> "2.to")
    *((f"{i}.0.norm1", f"{i}.ln0") for i in range(4)),
    *((f"{i}.0.norm2", f"{i}.ln1") for i in range(4)),
)


# --- reading files ------------------------------------------------------------------------------------------------------
def _split_prefixed(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head in out and rest:
            out[head][rest] = value
    return out


def read_ip_adapter_file(
    source: str | os.PathLike, subfolder: str | None, weight_name: str, **hub: Any
) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} from a `.safetensors` (prefixed keys) or `.bin` file of a folder or Hub id."""
    path = Path(os.path.expanduser(str(source)))
    file = path if path.is_file() else resolve_file(source, weight_name, subfolder or None, **hub)
    try:
        if file.name.endswith(".safetensors"):
            import safetensors.torch

            state = _split_prefixed(safetensors.torch.load_file(str(file)))
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read IP-Adapter file {file}: {type(e).__name__}: {e}") from e
    return check_state_dict(state, str(file))


def check_state_dict(state: Any, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Diffusers' IP-Adapter layout, tensors only, finite values."""
    if not isinstance(state, Mapping) or not {"image_proj", "ip_adapter"} <= set(state):
        keys = sorted(state)[:5] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"IP-Adapter {source}: required keys (`image_proj` and `ip_adapter`) missing from the state dict; got {keys}"
        )
    for part in ("image_proj", "ip_adapter"):
        if not isinstance(state[part], Mapping) or not state[part]:
            raise ValueError(f"IP-Adapter {source}: {part!r} must be a non-empty dict of tensors")
        for key, value in state[part].items():
            if not torch.is_tensor(value):
                raise ValueError(f"IP-Adapter {source}: {part}.{key} is a {type(value).__name__}, not a tensor")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"IP-Adapter {source}: {part}.{key} holds nan/inf values")
    return {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state["ip_adapter"])}


# --- image projections ---------------------------------------------------------------------------------------------------
def image_projection(state: Mapping[str, torch.Tensor]) -> tuple[nn.Module, int]:
    """(the projection with its weights, image tokens per image) for an `image_proj` state dict."""
    if "proj.weight" in state:  # IP-Adapter: 4 tokens
        cross = state["proj.weight"].shape[0] // 4
        module: nn.Module = ImageProjection(state["proj.weight"].shape[-1], cross, num_image_text_embeds=4)
        renamed = {k.replace("proj", "image_embeds"): v for k, v in state.items()}
        tokens = 4
    elif "proj.3.weight" in state:  # Full Face: every CLIP hidden state
        module = IPAdapterFullImageProjection(state["proj.0.weight"].shape[0], state["proj.3.weight"].shape[0])
        renames = (("proj.0", "ff.net.0.proj"), ("proj.2", "ff.net.2"), ("proj.3", "norm"))
        renamed = {_rename(k, renames): v for k, v in state.items()}
        tokens = FULL_FACE_TOKENS
    elif "perceiver_resampler.proj_in.weight" in state:
        raise ValueError("IP-Adapter FaceID Plus projections are not supported by rapiddiff (IP-Adapter, Plus, Full "
                         "Face and FaceID are)")  # fmt: skip
    elif "norm.weight" in state:  # FaceID
        dim_in, dim_hidden = state["proj.0.weight"].shape[1], state["proj.0.weight"].shape[0]
        cross = state["norm.weight"].shape[0]
        tokens = state["proj.2.weight"].shape[0] // cross
        module = IPAdapterFaceIDImageProjection(dim_in, cross, mult=dim_hidden // dim_in, num_tokens=tokens)
        renamed = {_rename(k, (("proj.0", "ff.net.0.proj"), ("proj.2", "ff.net.2"))): v for k, v in state.items()}
    elif "latents" in state:  # Plus: a perceiver resampler
        tokens, hidden = state["latents"].shape[1], state["latents"].shape[2]
        q_key = "layers.0.attn.to_q.weight" if "layers.0.attn.to_q.weight" in state else "layers.0.0.to_q.weight"
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        module = IPAdapterPlusImageProjection(
            embed_dims=state["proj_in.weight"].shape[1],
            output_dims=state["proj_out.weight"].shape[0],
            hidden_dims=hidden,
            depth=depth,
            heads=state[q_key].shape[0] // 64,
            num_queries=tokens,
        )
        renamed = _plus_keys(state)
    else:
        raise ValueError(f"unknown IP-Adapter image projection (keys {sorted(state)[:6]})")
    try:
        module.load_state_dict(renamed, strict=True)
    except RuntimeError as e:
        raise ValueError(f"IP-Adapter image projection does not fit its {type(module).__name__}: {e}") from None
    return module, tokens


def _rename(key: str, renames: Sequence[tuple[str, str]]) -> str:
    for old, new in renames:
        key = key.replace(old, new)
    return key


def _plus_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original perceiver resampler's keys (`layers.i.0` attention, `layers.i.1` MLP) -> Diffusers' modules."""
    out = {}
    for key, value in state.items():
        name = _rename(key.replace("0.to", "2.to"), PLUS_RESAMPLER_RENAMES)
        parts = name.split(".")
        if "to_kv" in name:
            parts[2] = "attn"
            k, v = value.chunk(2, dim=0)
            out[".".join(parts).replace("to_kv", "to_k")] = k
            out[".".join(parts).replace("to_kv", "to_v")] = v
        elif "to_q" in name or "to_out" in name:
            parts[2] = "attn"
            out[".".join(parts).replace("to_out", "to_out.0")] = value
        else:
            for i in range(4):
                name = _rename(
                    name,
                    ((f"{i}.1.0", f"{i}.ff.0"), (f"{i}.1.1", f"{i}.ff.1.net.0.proj"), (f"{i}.1.3", f"{i}.ff.1.net.2")),
                )
            out[name] = value
    return out


# --- the UNet ----------------------------------------------------------------------------------------------------------
def _cross_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """The UNet's cross-attention layers by `attn_processors` key, in that order (which numbers the file's keys)."""
    return {
        f"{name}.processor": m
        for name, m in unet.named_modules()
        if isinstance(m, Attention) and m.is_cross_attention and not name.endswith("attn1")
    }


def load_ip_adapter_weights(unet: nn.Module, state_dicts: Any) -> None:
    """Diffusers' `unet._load_ip_adapter_weights`: IP-Adapter processors on every cross-attention layer (replacing
    adapters loaded before), the projections as `encoder_hid_proj`, `config.encoder_hid_dim_type="ip_image_proj"`."""
    check_idle(unet, "load_ip_adapter")
    state_dicts = [
        check_state_dict(s, "state dict") for s in (state_dicts if isinstance(state_dicts, list) else [state_dicts])
    ]
    if not state_dicts:
        raise ValueError("load_ip_adapter: no IP-Adapter state dicts given")
    if unet.config.encoder_hid_dim_type == "text_proj":
        raise ValueError("this UNet projects its text (encoder_hid_dim_type='text_proj'); IP-Adapter cannot be added")
    unet.encoder_hid_proj = None  # a Plus projection has attention layers of its own: out of the way first
    projections = [image_projection(s["image_proj"]) for s in state_dicts]
    tokens = [n for _, n in projections]
    processors = {}
    layers = _cross_attention_layers(unet)
    for index, (name, layer) in enumerate(layers.items()):
        key_id = 2 * index + 1  # the original numbering counts self- and cross-attention layers
        weights = {}
        for i, s in enumerate(state_dicts):
            for kind in ("to_k_ip", "to_v_ip"):
                key = f"{key_id}.{kind}.weight"
                if key not in s["ip_adapter"]:
                    raise ValueError(f"IP-Adapter {i}: ip_adapter.{key} missing (for {name[: -len('.processor')]})")
                weights[f"{kind}.{i}.weight"] = s["ip_adapter"][key]
        cross = weights["to_k_ip.0.weight"].shape[1]
        # The vanilla kernel where the layer ran it (set_default_attn_processor), else SDPA.
        cls = IPAdapterAttnProcessor if isinstance(layer.processor, AttnProcessor) else IPAdapterAttnProcessor2_0
        proc = cls(hidden_size=layer.inner_dim, cross_attention_dim=cross, num_tokens=tokens, scale=1.0)
        try:
            proc.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise ValueError(f"IP-Adapter weights do not fit {name}: {e}") from None
        processors[name] = proc
    for i, s in enumerate(state_dicts):
        extra = sorted(
            set(s["ip_adapter"])
            - {f"{2 * j + 1}.{k}.weight" for j in range(len(layers)) for k in ("to_k_ip", "to_v_ip")}
        )
        if extra:
            raise ValueError(
                f"IP-Adapter {i}: keys this UNet has no layer for (or IP-Adapter LoRA weights, not supported): "
                f"{extra[:4]}{'...' if len(extra) > 4 else ''}"
            )
    for name, proc in processors.items():
        layers[name].set_processor(proc.to(device=unet.device, dtype=unet.dtype))
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([m for m, _ in projections]).to(unet.device, unet.dtype)
    _set_hid_dim_type(unet, "ip_image_proj")


def _set_hid_dim_type(unet: nn.Module, value: str | None) -> None:
    """`config.encoder_hid_dim_type` as Diffusers sets it while IP-Adapters are loaded (a state of the model, not a
    config a checkpoint can be built from, so it bypasses the config's checks)."""
    config = copy.copy(unet.config)
    object.__setattr__(config, "encoder_hid_dim_type", value)
    unet.config = config


def unload_ip_adapter_weights(unet: nn.Module) -> None:
    check_idle(unet, "unload_ip_adapter")
    for layer in unet.modules():
        if isinstance(layer, Attention) and isinstance(layer.processor, IP_ADAPTER_PROCESSORS):
            layer.set_processor(layer.default_processor())
    unet.encoder_hid_proj = None
    if unet.config.encoder_hid_dim_type == "ip_image_proj":
        _set_hid_dim_type(unet, None)


def set_scales(unet: nn.Module, scale: Any) -> None:
    """Diffusers' `set_ip_adapter_scale`: a scale for all adapters, one per adapter, or per-block dicts (InstantStyle:
    {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}; blocks not named get 0)."""
    check_idle(unet, "set_ip_adapter_scale")
    configs = scale if isinstance(scale, list) else [scale]
    configs = [_expand_block_scales(unet, c) if isinstance(c, Mapping) else c for c in configs]
    for name, proc in unet.attn_processors.items():
        if not isinstance(proc, IP_ADAPTER_PROCESSORS):
            continue
        adapters = len(proc.to_k_ip)
        if len(configs) not in (1, adapters):
            raise ValueError(f"set_ip_adapter_scale: {len(configs)} scale configs for {adapters} IP-Adapters")
        values = []
        for i, config in enumerate(configs * adapters if len(configs) == 1 else configs):
            if isinstance(config, Mapping):
                matches = [s for layer, s in config.items() if name.startswith(layer)]
                values.append(matches[-1] if matches else proc.scale[i])
            else:
                values.append(config)
        proc.scale = values


def _expand_block_scales(unet: nn.Module, scales: Mapping[str, Any]) -> dict[str, Any]:
    """{"down"/"mid"/"up": number, or {"block_i": number or one per transformer}} -> {layer prefix: scale}; as
    Diffusers, blocks not named get 0."""
    unknown = set(scales) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"set_ip_adapter_scale: unknown block group(s) {sorted(unknown)}; allowed: down, mid, up")
    out: dict[str, Any] = {"mid_block.attentions.0": _one(scales.get("mid", 0.0), "mid")}
    for group in ("down", "up"):
        blocks = getattr(unet, f"{group}_blocks")
        with_attn = {i: len(b.attentions) for i, b in enumerate(blocks) if getattr(b, "attentions", None)}
        value = scales.get(group, 0.0)
        per_block = value if isinstance(value, Mapping) else {f"block_{i}": value for i in with_attn}
        for block in per_block:
            i = int(block.removeprefix("block_")) if block.removeprefix("block_").isdigit() else -1
            if not block.startswith("block_") or i not in with_attn:
                raise ValueError(
                    f"set_ip_adapter_scale: {group}.{block} does not exist in this UNet or has no attentions"
                )
        for i, n in with_attn.items():
            v = per_block.get(f"block_{i}", 0.0)
            values = v if isinstance(v, list) else [v] * n
            if len(values) == 1:
                values = values * n
            if len(values) != n:
                raise ValueError(f"set_ip_adapter_scale: expected {n} scales for {group}.block_{i}, got {len(values)}")
            for j, s in enumerate(values):
                out[f"{group}_blocks.{i}.attentions.{j}"] = s
    return out


def _one(value: Any, where: str) -> Any:
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"set_ip_adapter_scale: expected 1 scale for {where}, got {len(value)}")
        return value[0]
    return value


# --- the pipeline mixin --------------------------------------------------------------------------------------------------


class IPAdapterUNetMixin:
    """The UNet's side of IP-Adapter: Diffusers' `_load_ip_adapter_weights` entry point, and the image embeddings
    taken out of `added_cond_kwargs` in its forward."""

    def _load_ip_adapter_weights(self, state_dicts: Any, low_cpu_mem_usage: bool = True) -> None:
        """Diffusers' method: IP-Adapter state dicts ({"image_proj": ..., "ip_adapter": ...}, one or a list) into
        this UNet, replacing those loaded before. `low_cpu_mem_usage` has no effect (weights are never initialised)."""
        load_ip_adapter_weights(self, state_dicts)

    def _image_embeds(self, added_cond_kwargs: dict[str, Any] | None) -> tuple[Any, dict[str, Any] | None]:
        """IP-Adapter's image embeddings out of added_cond_kwargs (required while IP-Adapters are loaded), and what
        else it holds (None when nothing)."""
        added = dict(added_cond_kwargs or {})
        if self.config.encoder_hid_dim_type != "ip_image_proj":
            return None, added or None
        if "image_embeds" not in added:
            raise ValueError(
                'IP-Adapter weights are loaded (encoder_hid_dim_type="ip_image_proj"): pass the image embeddings as '
                'added_cond_kwargs={"image_embeds": [one tensor per adapter]}'
            )
        return added.pop("image_embeds"), added or None
