"""Diffusers' LoRA API on models: reading LoRA files (`read_lora_weights`), `LoRAAdapters` (the API over a set of
named models, shared by the pipelines' mixin in `loaders/lora.py` and the model-level one here) and `LoraModelMixin`
(Diffusers' `PeftAdapterMixin`: `unet.load_lora_adapter`, `set_adapters`, `fuse_lora`...).

Converting and checking the keys of every LoRA format is `lora_conversion`; the layers and their compile-friendly
bookkeeping are `lora_layers`.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hub import given_weight_file, resolve_dir
from . import lora_layers
from .lora_conversion import convert_lora_state_dict, read_metadata

# File names tried in a folder / repo when `weight_name` is not given (Diffusers' save_lora_weights names).
LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
# Hub / file arguments `load_lora_weights` takes (as Diffusers'); anything else is a TypeError.
_HUB_KWARGS = ("cache_dir", "local_files_only", "revision", "token", "subfolder")
# Accepted for Diffusers compatibility, no effect: rapiddiff never initialises adapter weights randomly.
_NO_EFFECT_KWARGS = ("low_cpu_mem_usage", "force_download", "proxies")


def _load_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    try:
        if path.name.endswith(".safetensors"):
            import safetensors

            with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        return torch.load(str(path), map_location="cpu", weights_only=True), None
    except Exception as e:
        raise ValueError(f"could not read LoRA file {path}: {type(e).__name__}: {e}") from e


def _default_weight_file(folder: Path, source: str) -> Path:
    for name in LORA_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    if len(candidates) == 1:
        return candidates[0]
    raise FileNotFoundError(
        f"no LoRA weights in {source!r}: looked for {', '.join(LORA_WEIGHT_NAMES)}"
        + (f"; pass weight_name= one of {[p.name for p in candidates]}" if candidates else "")
    )


def read_lora_weights(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    weight_name: str | None = None,
    use_safetensors: bool | None = None,
    **kwargs: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str]:
    """(state dict, Diffusers' adapter metadata or None, a description for errors) of a file, folder, Hub id or dict."""
    unknown = sorted(set(kwargs) - set(_HUB_KWARGS) - set(_NO_EFFECT_KWARGS))
    if unknown:
        raise TypeError(f"load_lora_weights got unexpected argument(s) {unknown}; allowed: weight_name, "
                        f"use_safetensors, adapter_name, {', '.join(_HUB_KWARGS + _NO_EFFECT_KWARGS)}")  # fmt: skip
    if isinstance(source, Mapping):
        return dict(source), None, "(a state dict)"
    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    subfolder = hub.pop("subfolder", None)
    file = given_weight_file(source, weight_name, subfolder, **hub)
    if file is None:
        exts = ("safetensors",) if use_safetensors else ("safetensors", "bin")
        patterns = [f"{subfolder}/*.{e}" if subfolder else f"*.{e}" for e in exts]
        file = _default_weight_file(resolve_dir(source, subfolder, allow_patterns=patterns, **hub), str(source))
    if use_safetensors and not file.name.endswith(".safetensors"):
        raise ValueError(f"use_safetensors=True but the LoRA file is {file}")
    state_dict, raw_metadata = _load_file(file)
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{file} is not a LoRA state dict (values must be tensors)")
    return state_dict, read_metadata(raw_metadata), str(file)


def _as_list(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


class LoRAAdapters:
    """Diffusers' LoRA API over named models ({"unet": ..., "text_encoder": ...}; None entries are skipped)."""

    def __init__(self, models: Mapping[str, nn.Module | None], owner: str):
        self.models = {name: getattr(m, "_orig_mod", m) for name, m in models.items() if m is not None}
        self.owner = owner

    def adapters(self) -> dict[str, list[str]]:
        out = {}
        for name, model in self.models.items():
            state = lora_layers.lora_state(model)
            if state is not None and state.adapters:
                out[name] = list(state.adapters)
        return out

    def all_adapters(self) -> list[str]:
        return list(dict.fromkeys(n for names in self.adapters().values() for n in names))

    def load(
        self,
        state_dict: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any] | None,
        source: str,
        adapter_name: str | None,
        default_component: str | None,
        hotswap: bool = False,
    ) -> str:
        """Add adapter `adapter_name` (default `default_<n>`), or with `hotswap` replace the loaded one's weights."""
        present = self.all_adapters()
        if hotswap and adapter_name not in present:
            raise ValueError(
                f"hotswap=True needs the adapter_name of a loaded adapter ({present}), got {adapter_name!r}"
            )
        if not hotswap:
            if adapter_name is None:
                counts = [len(v) for v in self.adapters().values()]
                adapter_name = f"default_{max(counts, default=0)}"
            if not isinstance(adapter_name, str) or not adapter_name:
                raise ValueError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
            if adapter_name in present:
                raise ValueError(f"adapter_name={adapter_name!r} is already loaded ({present}): choose another name")
        # Everything is converted and checked before any model changes: a bad file leaves the pipeline as it was.
        per_model = convert_lora_state_dict(state_dict, self.models, f"{source} into {self.owner}", metadata,
                                            default_component=default_component)  # fmt: skip
        if hotswap:
            self._hotswap(per_model, source, adapter_name)
        else:
            for name, layers in per_model.items():
                lora_layers.register_adapter(self.models[name], adapter_name, layers)
        return adapter_name

    def _hotswap(self, per_model: Mapping[str, Any], source: str, adapter_name: str) -> None:
        """Replace a loaded adapter's weights in place (same layers and ranks): a compiled model does not recompile."""
        for name, model in self.models.items():
            state = lora_layers.lora_state(model)
            if (state is not None and adapter_name in state.adapters) or name in per_model:
                why = lora_layers.hotswap_mismatch(model, adapter_name, per_model.get(name, {}))
                if why:
                    raise ValueError(f"cannot hotswap {source} into adapter {adapter_name!r} of the {name}: {why}")
        for name, layers in per_model.items():
            lora_layers.hotswap(self.models[name], adapter_name, layers)

    def _check_names(self, names: list[str], what: str) -> None:
        present = self.all_adapters()
        missing = [n for n in names if n not in present]
        if missing:
            raise ValueError(f"{what}: adapter(s) {missing} are not loaded; loaded adapters: {present}")

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: Any = None) -> None:
        names = _as_list(adapter_names)
        self._check_names(names, "set_adapters")
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)) and not isinstance(adapter_weights, bool):
            weights = [float(adapter_weights)] * len(names)
        elif isinstance(adapter_weights, (list, tuple)):
            weights = list(adapter_weights)
        else:
            raise TypeError(
                f"adapter_weights must be None, a number or a list of numbers (one per adapter), got "
                f"{adapter_weights!r}; per-component and block-wise weights (dicts) are not supported by rapiddiff"
            )
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names {names} but {len(weights)} adapter_weights {weights}")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise TypeError(f"adapter_weights must be numbers, got {w!r}")
            if not math.isfinite(w):  # checked before any layer changes: a nan weight would give nan images
                raise ValueError(f"adapter_weights must be finite numbers, got {weights}")
        for model in self.models.values():
            state = lora_layers.lora_state(model)
            if state is not None:
                lora_layers.set_adapters(model, {n: float(w) for n, w in zip(names, weights) if n in state.adapters})

    def active_adapters(self) -> list[str]:
        for model in self.models.values():
            state = lora_layers.lora_state(model)
            if state is not None and state.adapters:
                return [n for n in state.adapters if n in state.weights]
        return []

    def set_enabled(self, enabled: bool) -> None:
        for model in self.models.values():
            lora_layers.set_enabled(model, enabled)

    def delete(self, adapter_names: str | Sequence[str]) -> None:
        names = _as_list(adapter_names)
        self._check_names(names, "delete_adapters")
        for model in self.models.values():
            lora_layers.delete_adapters(model, names)

    def _components(self, components: Sequence[str], what: str) -> list[nn.Module]:
        unknown = [c for c in components if c not in self.models]
        if unknown:
            raise ValueError(f"{what}: component(s) {unknown} have no LoRA here; LoRA components: {list(self.models)}")
        return [self.models[c] for c in components]

    def fuse(
        self, components: Sequence[str], lora_scale: float, safe_fusing: bool, adapter_names: Sequence[str] | None
    ) -> None:
        if isinstance(lora_scale, bool) or not isinstance(lora_scale, numbers.Real):
            raise TypeError(f"lora_scale must be a number, got {lora_scale!r}")
        if not math.isfinite(lora_scale):  # fusing adds it into the weights in place: nan would stay there for good
            raise ValueError(f"lora_scale must be a finite number, got {lora_scale!r}; the weights were not changed")
        if adapter_names is not None:
            adapter_names = _as_list(adapter_names)
            self._check_names(adapter_names, "fuse_lora")
        for model in self._components(components, "fuse_lora"):
            lora_layers.fuse(model, float(lora_scale), adapter_names, safe=safe_fusing)

    def unfuse(self, components: Sequence[str]) -> None:
        for model in self._components(components, "unfuse_lora"):
            lora_layers.unfuse(model)

    def unload(self) -> None:
        for model in self.models.values():
            lora_layers.unload(model)


class LoraApiMixin:
    """The LoRA methods whose Diffusers signatures are the same on pipelines and on models; `_lora()` says over which
    models they run."""

    def _lora(self) -> LoRAAdapters:
        raise NotImplementedError

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        self._lora().delete(adapter_names)

    def disable_lora(self) -> None:
        self._lora().set_enabled(False)

    def enable_lora(self) -> None:
        self._lora().set_enabled(True)


class LoraModelMixin(LoraApiMixin):
    """Diffusers' model-level LoRA API (`PeftAdapterMixin`) for rapiddiff's UNet."""

    _lora_component = "unet"

    def _lora(self) -> LoRAAdapters:
        return LoRAAdapters({self._lora_component: self}, type(self).__name__)

    def load_lora_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping[str, torch.Tensor],
        prefix: str | None = "transformer",
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs: Any,
    ) -> None:
        """Load a LoRA into this model; `prefix` selects the keys of a pipeline file (e.g. "unet"), None takes all."""
        state_dict, metadata, source = read_lora_weights(pretrained_model_name_or_path_or_dict, **kwargs)
        if prefix is not None:
            state_dict = {k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
            if not state_dict:
                raise ValueError(f"the LoRA {source} has no keys starting with prefix={prefix!r}")
            if metadata:
                metadata = {
                    f"{self._lora_component}.{k[len(prefix) + 1 :]}": v
                    for k, v in metadata.items()
                    if k.startswith(f"{prefix}.")
                }
        self._lora().load(
            state_dict, metadata, source, adapter_name, default_component=self._lora_component, hotswap=hotswap
        )

    def set_adapters(self, adapter_names: str | list[str], weights: float | list[float] | None = None) -> None:
        self._lora().set_adapters(adapter_names, weights)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self._lora().set_adapters(adapter_name)

    @property
    def active_adapters(self) -> list[str]:
        return self._lora().active_adapters()

    def get_list_adapters(self) -> list[str]:
        return self._lora().all_adapters()

    def fuse_lora(
        self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: list[str] | None = None
    ) -> None:
        self._lora().fuse([self._lora_component], lora_scale, safe_fusing, adapter_names)

    def unfuse_lora(self) -> None:
        self._lora().unfuse([self._lora_component])

    def unload_lora(self) -> None:
        self._lora().unload()
