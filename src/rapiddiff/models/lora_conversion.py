"""LoRA state dicts in every supported format -> {component: {module name: (down, up, alpha / rank)}}, checked.

One table per naming question, no chains of string replacements:

- which component a key belongs to (`unet.` / `text_encoder.` prefixes, Kohya's `lora_unet_` / `lora_te_`, or no
  prefix = the UNet, as Diffusers' oldest attention-processor files);
- which matrix of the pair a key suffix names (`MATRIX_SUFFIXES`: PEFT's `lora_A` / `lora_B`, Diffusers' older
  `lora.down` / `lora_linear_layer.down`, Kohya's `lora_down`, the attention-processor format's `to_q_lora.down`);
- which layer a module path names: the attention-processor names (`PROCESSOR_TARGETS`), and the model's own module
  names, also flattened with `_` for Kohya keys (`lora_unet_down_blocks_0_attentions_0_proj_in`) and with or without
  CLIP's `text_model.` prefix.

Everything is checked before anything is applied: a key naming no layer (a LoRA for another architecture), a pair
with a missing half, a rank or shape mismatch, an unsupported variant (DoRA, LoHa, LoKr) raise one ValueError naming
the source and the first offending keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..utils.torch_utils import first_non_finite
from .lora_layers import expected_shapes, lora_capable

# Key suffix of one LoRA matrix -> which half of the pair (checked in this order: the longest first).
MATRIX_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"),  # PEFT / Diffusers' save_lora_weights
    (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),  # Diffusers' older text-encoder format
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),  # Diffusers' LoRACompatibleLinear format
    (".lora.up.weight", "up"),
    (".lora_down.weight", "down"),  # Kohya / A1111 (also LoCon convolutions)
    (".lora_up.weight", "up"),
    (".down.weight", "down"),  # attention-processor format: `attn1.processor.to_q_lora.down.weight`
    (".up.weight", "up"),
    (".alpha", "alpha"),  # Kohya's network alpha (scale = alpha / rank)
)

# Attention-processor format: the processor's LoRA name -> the projection it adapts, per component.
PROCESSOR_TARGETS: dict[str, dict[str, str]] = {
    "unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
    "text_encoder": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"},
}

# Kohya key prefix -> component (te1/te2 are SDXL's two text encoders).
KOHYA_PREFIXES: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}

# Components a Diffusers-format key may start with.
COMPONENT_PREFIXES = ("unet", "text_encoder", "text_encoder_2", "transformer", "controlnet")

# Substrings of LoRA variants we do not implement -> their name in the error.
UNSUPPORTED: dict[str, str] = {
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "lora_mid": "LoCon with CP decomposition (lora_mid)",
    "lora_B.bias": "LoRA with bias",
    "lora_up.bias": "LoRA with bias",
}

METADATA_KEY = "lora_adapter_metadata"  # Diffusers' safetensors metadata entry (LoraConfig fields per component)

LayerLoRA = tuple[torch.Tensor, torch.Tensor, float]  # (down, up, alpha / rank)


class _Errors:
    """Offending keys grouped by reason; raised together."""

    def __init__(self) -> None:
        self.by_reason: dict[str, list[str]] = {}

    def add(self, reason: str, key: str) -> None:
        self.by_reason.setdefault(reason, []).append(key)

    def raise_if_any(self, source: str) -> None:
        if not self.by_reason:
            return
        lines = []
        for reason, keys in self.by_reason.items():
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} keys)" if len(keys) > 5 else "")
            lines.append(f"{reason}: {shown}")
        raise ValueError(f"cannot load the LoRA {source}: " + "; ".join(lines) + ". Nothing was loaded.")


def module_table(component: str, model: nn.Module) -> dict[str, str]:
    """Every name a LoRA file may use for a LoRA-capable layer of `model` -> the layer's module name.

    Includes Kohya's flattened spelling (dots as underscores) and, for CLIP, names with and without `text_model.`
    (transformers 5 dropped that level; LoRA files keep it).
    """
    table: dict[str, str] = {}
    original = original_unet_names(model) if component == "unet" else {}
    for name, module in model.named_modules():
        if not name or not lora_capable(module):
            continue
        spellings = {name}
        if component.startswith("text_encoder"):
            spellings.add(name.removeprefix("text_model.") if name.startswith("text_model.") else f"text_model.{name}")
        if name in original:
            spellings.add(original[name])
        for s in spellings:
            table[s] = name
            table[s.replace(".", "_")] = name
    return table


def original_unet_names(model: nn.Module) -> dict[str, str]:
    """UNet module name -> its name in the original (SGM / LDM) layout (`input_blocks.4.1.proj_in`), which Kohya's
    SDXL LoRAs use (`lora_unet_input_blocks_4_1_proj_in`); from the single-file key table, so it follows the config.
    Empty for models without a UNet config."""
    from .single_file_keys import UNET_PREFIX, unet_rules

    config = getattr(model, "config", None)
    if config is None or "down_block_types" not in config:
        return {}
    rules = sorted(unet_rules(config), key=lambda r: -len(r.diffusers))  # the most specific prefix first
    names: dict[str, str] = {}
    for name, _ in model.named_modules():
        key = name + "."
        rule = next((r for r in rules if key.startswith(r.diffusers)), None)
        if rule is None:
            continue
        rest = key[len(rule.diffusers) :]
        for orig, renamed in rule.inner.items():
            if rest.startswith(renamed):
                rest = orig + rest[len(renamed) :]
                break
        names[name] = (rule.original.removeprefix(UNET_PREFIX) + rest).rstrip(".")
    return names


def _split_suffix(rest: str) -> tuple[str, str] | None:
    for suffix, role in MATRIX_SUFFIXES:
        if rest.endswith(suffix):
            return rest[: -len(suffix)], role
    return None


def _processor_path(component: str, path: str) -> str:
    """`...attn1.processor.to_q_lora` -> `...attn1.to_q` (attention-processor format)."""
    parts = [p for p in path.split(".") if p != "processor"]
    targets = PROCESSOR_TARGETS.get(component.removesuffix("_2"), {})
    if parts and parts[-1] in targets:
        parts[-1] = targets[parts[-1]]
    return ".".join(parts)


def _locate(key: str, kohya: bool, default_component: str | None) -> tuple[str, str, str] | None:
    """(component, module path as written, role) of a key, or None if the key is not a LoRA matrix/alpha.

    A key without a component prefix belongs to `default_component` (Diffusers' oldest UNet files).
    """
    if kohya:
        prefix = next(p for p in KOHYA_PREFIXES if key.startswith(p))
        module, _, suffix = key[len(prefix) :].partition(".")
        role = _split_suffix("." + suffix)
        return (KOHYA_PREFIXES[prefix], module, role[1]) if role and role[0] == "" else None
    head, _, rest = key.partition(".")
    if head in COMPONENT_PREFIXES:
        component = head
    elif default_component is not None:
        component, rest = default_component, key
    else:
        return None
    split = _split_suffix(rest)
    if split is None:
        return None
    path, role = split
    return component, _processor_path(component, path), role


def _alpha_from_metadata(metadata: Mapping[str, Any] | None, component: str, module: str) -> float | None:
    """lora_alpha (or the alpha_pattern entry matching `module`) of Diffusers' adapter metadata."""
    if not metadata:
        return None
    pattern = metadata.get(f"{component}.alpha_pattern") or {}
    for key, alpha in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key.lstrip('^')}", module):
            return float(alpha)
    alpha = metadata.get(f"{component}.lora_alpha")
    return float(alpha) if alpha is not None else None


def read_metadata(raw: Mapping[str, str] | None) -> dict[str, Any] | None:
    if not raw or METADATA_KEY not in raw:
        return None
    metadata = json.loads(raw[METADATA_KEY])
    dora = [k for k, v in metadata.items() if k.endswith("use_dora") and v]
    if dora:
        raise ValueError(f"LoRA metadata sets {dora[0]}=True: DoRA is not supported by rapiddiff")
    return metadata


def _fit(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """`t` reshaped to `shape` when only 1x1 spatial dims differ (Kohya stores Linear LoRAs of 1x1 convs as 4-D)."""
    if tuple(t.shape) == shape:
        return t
    if t.numel() == torch.Size(shape).numel() and t.shape[:2] == torch.Size(shape[:2]):
        return t.reshape(shape)
    return None


def convert_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    models: Mapping[str, nn.Module | None],
    source: str,
    metadata: Mapping[str, Any] | None = None,
    default_component: str | None = "unet",
) -> dict[str, dict[str, LayerLoRA]]:
    """Check a LoRA state dict against the pipeline's models and return it per component and layer."""
    bad = first_non_finite(state_dict)
    if bad is not None:
        key, count, size = bad
        raise ValueError(f"{source}: tensor {key!r} holds {count} non-finite value(s) (nan/inf) out of {size}; nothing "
                         "was loaded (fusing or running it would turn the model's outputs into nan)")  # fmt: skip
    errors = _Errors()
    if not state_dict:
        errors.add("the state dict is empty", "(no keys)")
    kohya = bool(state_dict) and all(k.startswith(tuple(KOHYA_PREFIXES)) for k in state_dict)
    tables = {c: module_table(c, m) for c, m in models.items() if m is not None}
    groups: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        variant = next((name for marker, name in UNSUPPORTED.items() if marker in key), None)
        if variant is not None:
            errors.add(f"{variant} is not supported", key)
            continue
        located = _locate(key, kohya, default_component)
        if located is None:
            errors.add("not a LoRA key of a known format", key)
            continue
        component, path, role = located
        if component not in tables:
            errors.add(f"the LoRA has weights for {component!r}, which this pipeline does not have", key)
            continue
        module = tables[component].get(path)
        if module is None:
            errors.add(f"no layer of the {component} has this name (a LoRA for another architecture?)", key)
            continue
        groups.setdefault((component, module), {})[role] = (key, value)

    out: dict[str, dict[str, LayerLoRA]] = {}
    for (component, module_name), parts in groups.items():
        if "down" not in parts or "up" not in parts:
            missing = "up" if "down" in parts else "down"
            errors.add(f"the {missing} matrix of the pair is missing", next(iter(parts.values()))[0])
            continue
        (down_key, down), (up_key, up) = parts["down"], parts["up"]
        rank = down.shape[0] if down.ndim >= 2 else -1
        if rank <= 0 or up.ndim < 2 or up.shape[1] != rank:
            errors.add(f"rank mismatch (down has rank {rank}, up {tuple(up.shape)})", up_key)
            continue
        module = models[component].get_submodule(module_name)
        want_down, want_up = expected_shapes(module, rank)
        fit_down, fit_up = _fit(down, want_down), _fit(up, want_up)
        if fit_down is None or fit_up is None:
            errors.add(
                f"shapes {tuple(down.shape)} / {tuple(up.shape)} do not fit {component}.{module_name} "
                f"({type(module).__name__}, needs {want_down} / {want_up})",
                down_key,
            )
            continue
        if "alpha" in parts:
            alpha = float(parts["alpha"][1].float().reshape(-1)[0])
        else:
            alpha = _alpha_from_metadata(metadata, component, module_name) or float(rank)
        out.setdefault(component, {})[module_name] = (fit_down, fit_up, alpha / rank)
    errors.raise_if_any(source)
    return out
