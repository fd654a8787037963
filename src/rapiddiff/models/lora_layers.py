"""LoRA-carrying Linear / Conv2d layers and the per-model adapter bookkeeping.

A layer that receives a LoRA keeps its class's name, parameters and state-dict keys: its class is swapped for a
subclass (`LoRALinear` / `LoRAConv2d`) whose forward adds the low-rank path. Every adapter loaded into the layer is
concatenated into three non-persistent buffers (so `state_dict`, `save_pretrained` and strict loading never see them):

    lora_down (R, in[, kh, kw])   lora_up (out, R[, 1, 1])   lora_scale (R,)

and the forward is `base(x) + up(down(x) * lora_scale)`: one pair of matmuls whatever the number of adapters. Which
adapters are active, their weights, `disable_lora`, the per-call scale (`cross_attention_kwargs={"scale": s}`) and
fusing only change the *values* of `lora_scale` (in place), so a compiled graph or a captured CUDA graph stays valid;
fusing adds the low-rank product to `weight` in place (and `unfuse` copies the original back, exactly). Only loading
or deleting an adapter changes shapes (one recompile, as for any new weights).

The model-level state (adapters, weights, fused or not) lives in `LoRAState`, attached to the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.concurrency import check_idle


@dataclasses.dataclass
class AdapterSlot:
    """Where one adapter sits in a layer's concatenated buffers, and its alpha / rank."""

    start: int
    stop: int
    scale: float


class LoRALayerMixin:
    """What `LoRALinear` and `LoRAConv2d` share; never instantiated directly (layers are converted in place)."""

    lora_down: torch.Tensor
    lora_up: torch.Tensor
    lora_scale: torch.Tensor
    lora_slots: dict[str, AdapterSlot]
    lora_base_class: type[nn.Module]

    def lora_delta(self, scale: torch.Tensor) -> torch.Tensor:
        """The weight delta of the adapters with per-rank `scale`, in the shape of `weight` (for fusing)."""
        down = self.lora_down.flatten(1)  # (R, in*kh*kw)
        up = self.lora_up.flatten(1) * scale  # (out, R)
        return (up @ down).reshape(self.weight.shape)


class LoRALinear(nn.Linear, LoRALayerMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + F.linear(F.linear(x, self.lora_down) * self.lora_scale, self.lora_up)


class LoRAConv2d(nn.Conv2d, LoRALayerMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        # peft's convolution LoRA: down has the base kernel, stride and padding; up is 1x1.
        h = F.conv2d(x, self.lora_down, None, self.stride, self.padding, self.dilation, self.groups)
        return out + F.conv2d(h * self.lora_scale[:, None, None], self.lora_up)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """A 1x1 convolution applied to tokens (B, L, C) as the equivalent linear map (Transformer2D's proj_out)."""
        out = F.linear(x, self.weight.flatten(1), self.bias)
        return out + F.linear(F.linear(x, self.lora_down.flatten(1)) * self.lora_scale, self.lora_up.flatten(1))


_LORA_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def lora_capable(module: nn.Module) -> bool:
    return type(module) in _LORA_CLASSES or isinstance(module, LoRALayerMixin)


def expected_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(down, up) shapes of a rank-`rank` LoRA for `module` (a Linear or Conv2d)."""
    if isinstance(module, nn.Conv2d):
        return (rank, module.in_channels // module.groups, *module.kernel_size), (module.out_channels, rank, 1, 1)
    return (rank, module.in_features), (module.out_features, rank)


# --- per-layer buffers ----------------------------------------------------------------------------------------------
def _convert(layer: nn.Module) -> None:
    base = type(layer)
    layer.__class__ = _LORA_CLASSES[base]
    layer.lora_base_class = base
    layer.lora_slots = {}
    w = layer.weight
    down, up = expected_shapes(layer, 0)
    layer.register_buffer("lora_down", w.new_zeros(down), persistent=False)
    layer.register_buffer("lora_up", w.new_zeros(up), persistent=False)
    layer.register_buffer("lora_scale", w.new_zeros(0), persistent=False)


# A layer's adapters while it is a plain layer again (fused): (down, up, slots).
Stash = tuple[torch.Tensor, torch.Tensor, dict[str, AdapterSlot]]


def _restore(layer: LoRALayerMixin) -> Stash:
    """Make the layer a plain Linear / Conv2d again; returns its adapters."""
    stash = (layer.lora_down, layer.lora_up, layer.lora_slots)
    for name in ("lora_down", "lora_up", "lora_scale"):
        delattr(layer, name)
    base = layer.lora_base_class
    del layer.lora_slots, layer.lora_base_class
    layer.__class__ = base
    return stash


def _reattach(layer: nn.Module, stash: Stash) -> None:
    down, up, slots = stash
    _convert(layer)
    layer.lora_down, layer.lora_up = _like_weight(down, layer.weight), _like_weight(up, layer.weight)
    layer.lora_scale = layer.weight.new_zeros(down.shape[0])
    layer.lora_slots = slots


def _like_weight(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    t = t.to(device=weight.device, dtype=weight.dtype)
    if t.ndim == 4 and weight.is_contiguous(memory_format=torch.channels_last):
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def add_to_layer(layer: nn.Module, name: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
    """Append one adapter (shapes already checked) to a layer's buffers; its runtime scale starts at 0."""
    if not isinstance(layer, LoRALayerMixin):
        _convert(layer)
    w = layer.weight
    start = layer.lora_down.shape[0]
    layer.lora_down = _like_weight(torch.cat([layer.lora_down, down.to(layer.lora_down)]), w)
    layer.lora_up = _like_weight(torch.cat([layer.lora_up, up.to(layer.lora_up)], dim=1), w)
    layer.lora_scale = torch.cat([layer.lora_scale, w.new_zeros(down.shape[0])])
    layer.lora_slots[name] = AdapterSlot(start, start + down.shape[0], scale)


def remove_from_layer(layer: LoRALayerMixin, names: Sequence[str]) -> None:
    """Drop adapters from a layer; a layer left without adapters becomes a plain Linear / Conv2d again."""
    keep = [(n, s) for n, s in layer.lora_slots.items() if n not in names]
    if not keep:
        _restore(layer)
        return
    index = torch.cat([torch.arange(s.start, s.stop) for _, s in keep]).to(layer.lora_down.device)
    w = layer.weight
    layer.lora_down = _like_weight(layer.lora_down.index_select(0, index), w)
    layer.lora_up = _like_weight(layer.lora_up.index_select(1, index), w)
    layer.lora_scale = layer.lora_scale.index_select(0, index)
    start, slots = 0, {}
    for n, s in keep:
        slots[n] = AdapterSlot(start, start + s.stop - s.start, s.scale)
        start += s.stop - s.start
    layer.lora_slots = slots


# --- model-level state ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoRAState:
    """The adapters of one model: load order, active ones with their weights, enabled, call scale, fused."""

    adapters: list[str] = dataclasses.field(default_factory=list)
    weights: dict[str, float] = dataclasses.field(default_factory=dict)  # active adapters -> weight
    enabled: bool = True
    call_scale: float = 1.0
    fused: list[str] = dataclasses.field(default_factory=list)
    # Original weights of fused layers (on the CPU), copied back by `unfuse` so it is exact.
    backups: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # While fused, every layer is a plain Linear / Conv2d (no low-rank path to pay for: fused is free); its adapters
    # wait here for `unfuse`.
    stash: dict[str, Stash] = dataclasses.field(default_factory=dict)


def lora_state(model: nn.Module) -> LoRAState | None:
    model = getattr(model, "_orig_mod", model)  # under a torch.compile wrapper
    return model.__dict__.get("_lora_state")


def state_for_loading(model: nn.Module) -> LoRAState:
    model = getattr(model, "_orig_mod", model)
    state = lora_state(model)
    if state is None:
        state = LoRAState()
        model.__dict__["_lora_state"] = state
    return state


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayerMixin]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALayerMixin):
            yield name, module


def refresh_scales(model: nn.Module) -> None:
    """Write every layer's runtime scales (in place) from the model's state.

    scale of an adapter = alpha / rank x its set_adapters weight x the call scale, 0 when inactive or disabled. While
    adapters are fused nothing else is added (as peft: a merged layer runs its base weights only).
    """
    state = lora_state(model)
    if state is None:
        return
    for _, layer in lora_layers(model):
        values = [0.0] * layer.lora_scale.shape[0]
        if state.enabled and not state.fused:
            for name, slot in layer.lora_slots.items():
                weight = state.weights.get(name, 0.0) * state.call_scale * slot.scale
                values[slot.start : slot.stop] = [weight] * (slot.stop - slot.start)
        with torch.no_grad():
            layer.lora_scale.copy_(torch.tensor(values, dtype=layer.lora_scale.dtype))


def register_adapter(model: nn.Module, name: str, layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """Add a checked adapter {module name: (down, up, alpha / rank)} to `model`; it becomes the only active one."""
    check_idle(model, "load_lora_weights")
    state = state_for_loading(model)
    _check_not_fused(state, "loading another adapter")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for module_name, (down, up, scale) in layers.items():
            add_to_layer(modules[module_name], name, down, up, scale)
    state.adapters.append(name)
    state.weights = {name: 1.0}  # as Diffusers: the adapter just loaded is the active one
    refresh_scales(model)


def hotswap_mismatch(model: nn.Module, name: str, layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> str:
    """Why `layers` cannot replace adapter `name` in place ('' if it can): same layers, same ranks."""
    state = lora_state(model)
    if state is None or name not in state.adapters:
        return f"adapter {name!r} is not loaded here"
    if state.fused:
        return f"adapter(s) {state.fused} are fused"
    have = {n: layer.lora_slots[name] for n, layer in lora_layers(model) if name in layer.lora_slots}
    if set(have) != set(layers):
        diff = sorted(set(have) ^ set(layers))
        return f"the new LoRA adapts other layers ({len(diff)} differ, e.g. {diff[:3]})"
    for n, (down, _, _) in layers.items():
        if have[n].stop - have[n].start != down.shape[0]:
            return f"rank {down.shape[0]} != {have[n].stop - have[n].start} at {n}"
    return ""


def hotswap(model: nn.Module, name: str, layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """Replace adapter `name`'s weights in place (checked by `hotswap_mismatch`): no new shapes, no recompile."""
    check_idle(model, "load_lora_weights(hotswap=True)")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for n, (down, up, scale) in layers.items():
            layer = modules[n]
            slot = layer.lora_slots[name]
            layer.lora_down[slot.start : slot.stop].copy_(down)
            layer.lora_up[:, slot.start : slot.stop].copy_(up)
            slot.scale = scale
    refresh_scales(model)


def set_adapters(model: nn.Module, weights: dict[str, float]) -> None:
    check_idle(model, "set_adapters")
    state = lora_state(model)
    if state is None:
        return
    state.weights = dict(weights)
    refresh_scales(model)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    check_idle(model, "enable_lora / disable_lora")
    state = lora_state(model)
    if state is not None:
        state.enabled = enabled
        refresh_scales(model)


def set_call_scale(model: nn.Module | None, scale: float) -> None:
    """Multiply every adapter's scale by `scale` (the LoRA scale of a pipeline call); values only, in place."""
    state = lora_state(model) if model is not None else None
    if state is not None and state.call_scale != scale:
        state.call_scale = float(scale)
        refresh_scales(model)


@contextlib.contextmanager
def call_scale(model: nn.Module | None, scale: float | None) -> Iterator[None]:
    """`set_call_scale` inside the block only (the text encoder's `lora_scale` in `encode_prompt`)."""
    state = lora_state(model) if model is not None else None
    if state is None or scale is None:
        yield
        return
    previous = state.call_scale
    set_call_scale(model, scale)
    try:
        yield
    finally:
        set_call_scale(model, previous)


def delete_adapters(model: nn.Module, names: Sequence[str]) -> None:
    check_idle(model, "delete_adapters")
    state = lora_state(model)
    if state is None:
        return
    names = [n for n in names if n in state.adapters]
    if not names:
        return
    _check_not_fused(state, "deleting adapters")
    for _, layer in list(lora_layers(model)):
        remove_from_layer(layer, names)
    state.adapters = [n for n in state.adapters if n not in names]
    state.weights = {n: w for n, w in state.weights.items() if n not in names}
    _drop_state_if_empty(model)
    refresh_scales(model)


def _check_not_fused(state: LoRAState, what: str) -> None:
    if state.fused:
        raise ValueError(f"adapter(s) {state.fused} are fused: call unfuse_lora() before {what}")


def fuse(
    model: nn.Module, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None, safe: bool = False
) -> None:
    """Add the adapters' scaled low-rank products to the weights in place (keeping the originals to unfuse).

    Afterwards every adapted layer is a plain Linear / Conv2d again: a fused LoRA costs nothing per step, and a model
    compiled before the LoRA was loaded runs its first graph again (the weights changed in place: no recompile).
    safe: check every fused weight is finite first (nothing is fused if one is not).
    """
    check_idle(model, "fuse_lora")
    state = lora_state(model)
    if state is None:
        return
    names = list(state.weights) if adapter_names is None else [n for n in adapter_names if n in state.adapters]
    names = [n for n in names if n not in state.fused]  # as peft: an adapter is merged once
    if not names:
        return
    weights = {n: state.weights.get(n, 1.0) * lora_scale for n in names}
    _unstash(model, state)
    try:
        scales: dict[str, torch.Tensor] = {}  # layer -> per-rank scale of the adapters being fused
        for layer_name, layer in lora_layers(model):
            values = [0.0] * layer.lora_scale.shape[0]
            for name, slot in layer.lora_slots.items():
                if name in weights:
                    values[slot.start : slot.stop] = [weights[name] * slot.scale] * (slot.stop - slot.start)
            if any(values):
                scales[layer_name] = torch.tensor(values, dtype=layer.lora_scale.dtype, device=layer.lora_scale.device)
        layers = dict(lora_layers(model))
        with torch.no_grad():
            if safe:
                bad = [n for n, sc in scales.items() if not torch.isfinite(layers[n].weight + layers[n].lora_delta(sc)).all()]  # fmt: skip
                if bad:
                    raise ValueError(f"safe_fusing: fusing gives non-finite weights in {bad[:5]}; nothing fused")
            for layer_name, scale in scales.items():
                layer = layers[layer_name]
                if layer_name not in state.backups:
                    state.backups[layer_name] = layer.weight.detach().to("cpu", copy=True)
                layer.weight.add_(layer.lora_delta(scale))
        state.fused = list(dict.fromkeys(state.fused + names))
    finally:
        if state.fused:  # as peft: while fused, no unfused adapter runs, so every layer can be plain
            state.stash = {name: _restore(layer) for name, layer in list(lora_layers(model))}
        refresh_scales(model)


def _unstash(model: nn.Module, state: LoRAState) -> None:
    modules = dict(model.named_modules())
    for layer_name, stash in state.stash.items():
        _reattach(modules[layer_name], stash)
    state.stash = {}


def unfuse(model: nn.Module) -> None:
    """Copy the original weights back (exactly) and let the unfused adapters run again."""
    check_idle(model, "unfuse_lora")
    state = lora_state(model)
    if state is None or not state.fused:
        return
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer_name, original in state.backups.items():
            modules[layer_name].weight.copy_(original)
    state.backups.clear()
    state.fused = []
    _unstash(model, state)
    refresh_scales(model)


def unload(model: nn.Module) -> None:
    """Remove every adapter: layers become plain Linear / Conv2d again. Fused weights stay fused (as Diffusers)."""
    check_idle(model, "unload_lora_weights")
    state = lora_state(model)
    if state is None:
        return
    for _, layer in list(lora_layers(model)):
        _restore(layer)
    getattr(model, "_orig_mod", model).__dict__.pop("_lora_state")


def _drop_state_if_empty(model: nn.Module) -> None:
    state = lora_state(model)
    if state is not None and not state.adapters and not state.fused:
        getattr(model, "_orig_mod", model).__dict__.pop("_lora_state")
