"""Diffusers' model-level LoRA API (`PeftAdapterMixin`): `unet.load_lora_adapter`, `set_adapters`, `fuse_lora`...

The layers and their bookkeeping are `lora_layers` (this package). Reading and converting LoRA files is the loaders'
work: like `from_single_file`, these entry points reach `rapiddiff.loaders` when called, never when imported, so
models import nothing above them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..loaders.lora import LoRAAdapters


class LoraModelMixin:
    """Diffusers' model-level LoRA API (`PeftAdapterMixin`) for rapiddiff's UNet."""

    _lora_component = "unet"

    def _lora(self) -> LoRAAdapters:
        from ..loaders.lora import LoRAAdapters

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
        from ..loaders.lora import read_lora_weights

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

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        self._lora().delete(adapter_names)

    def disable_lora(self) -> None:
        self._lora().set_enabled(False)

    def enable_lora(self) -> None:
        self._lora().set_enabled(True)

    def fuse_lora(
        self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: list[str] | None = None
    ) -> None:
        self._lora().fuse([self._lora_component], lora_scale, safe_fusing, adapter_names)

    def unfuse_lora(self) -> None:
        self._lora().unfuse([self._lora_component])

    def unload_lora(self) -> None:
        self._lora().unload()
