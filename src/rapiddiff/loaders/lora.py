"""LoRA loading with Diffusers' pipeline API: `pipe.load_lora_weights`, `set_adapters`, `fuse_lora`, ...,
`save_lora_weights`.

Reading files, converting their keys and the API over a set of named models (`LoRAAdapters`) are the models' side
(`models/lora_adapter.py`, shared with the model-level `unet.load_lora_adapter`); the layers are `models/lora_layers`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.lora_adapter import LORA_WEIGHT_NAMES, LoRAAdapters, LoraApiMixin, read_lora_weights
from ..models.lora_conversion import METADATA_KEY


class StableDiffusionLoraLoaderMixin(LoraApiMixin):
    """Diffusers' pipeline LoRA API for the SD pipelines: adapters on the UNet and the CLIP text encoder."""

    _lora_loadable_modules: tuple[str, ...] = ("unet", "text_encoder")

    def _lora(self) -> LoRAAdapters:
        models = {name: getattr(self, name, None) for name in self._lora_loadable_modules}
        return LoRAAdapters(models, type(self).__name__)

    @property
    def lora_scale(self) -> float:
        """The LoRA scale of the current call (`cross_attention_kwargs["scale"]`), 1.0 outside calls."""
        state = self.running_call
        scale = None if state is None else state.lora_scale
        return 1.0 if scale is None else float(scale)

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs: Any,
    ) -> None:
        """Load a LoRA (Diffusers/PEFT, Kohya/A1111 incl. LoCon, or Diffusers' older formats) into the UNet and the
        text encoder, as adapter `adapter_name` (default `default_<n>`), which becomes the active adapter.
        hotswap=True replaces the weights of the loaded adapter `adapter_name` in place instead (same layers and
        ranks; a compiled model does not recompile).

        kwargs: weight_name, subfolder, use_safetensors, cache_dir, local_files_only, revision, token.
        """
        state_dict, metadata, source = read_lora_weights(pretrained_model_name_or_path_or_dict, **kwargs)
        self._lora().load(state_dict, metadata, source, adapter_name, default_component="unet", hotswap=hotswap)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Activate exactly these adapters, with these weights (1.0 by default); the others stay loaded, inactive."""
        self._lora().set_adapters(adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return self._lora().active_adapters()

    def get_list_adapters(self) -> dict[str, list[str]]:
        """{component: [adapter names]} of the components that hold adapters."""
        return self._lora().adapters()

    def fuse_lora(
        self,
        components: Sequence[str] = ("unet", "text_encoder"),
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the (active, or `adapter_names`) adapters times `lora_scale` to the weights, in place.

        Fused weights cost nothing per step; the original weights are kept on the CPU so `unfuse_lora` is exact.
        """
        if kwargs:
            raise TypeError(f"fuse_lora got unexpected argument(s) {sorted(kwargs)}")
        lora = self._lora()
        lora.fuse([c for c in components if c in lora.models], lora_scale, safe_fusing, adapter_names)

    def unfuse_lora(self, components: Sequence[str] = ("unet", "text_encoder"), **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"unfuse_lora got unexpected argument(s) {sorted(kwargs)}")
        lora = self._lora()
        lora.unfuse([c for c in components if c in lora.models])

    def unload_lora_weights(self) -> None:
        """Remove every adapter (the layers become plain Linear/Conv2d again); fused weights stay fused."""
        self._lora().unload()

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        unet_lora_layers: Mapping[str, torch.Tensor | nn.Module] | None = None,
        text_encoder_lora_layers: Mapping[str, torch.Tensor | nn.Module] | None = None,
        weight_name: str | None = None,
        safe_serialization: bool = True,
        unet_lora_adapter_metadata: Mapping[str, Any] | None = None,
        text_encoder_lora_adapter_metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write PEFT-format LoRA layers as Diffusers does (`unet.` / `text_encoder.` prefixes, adapter metadata in
        the safetensors header); returns the file written."""
        layers = {"unet": unet_lora_layers, "text_encoder": text_encoder_lora_layers}
        metadata = {"unet": unet_lora_adapter_metadata, "text_encoder": text_encoder_lora_adapter_metadata}
        if not any(layers.values()):
            raise ValueError("save_lora_weights needs unet_lora_layers and/or text_encoder_lora_layers")
        state: dict[str, torch.Tensor] = {}
        packed: dict[str, Any] = {}
        for prefix, entries in layers.items():
            for key, value in (entries or {}).items():
                tensors = value.state_dict() if isinstance(value, nn.Module) else {"": value}
                for sub, tensor in tensors.items():
                    state[".".join(p for p in (prefix, key, sub) if p)] = tensor.detach().cpu().contiguous()
            packed.update({f"{prefix}.{k}": v for k, v in (metadata[prefix] or {}).items()})
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (weight_name or LORA_WEIGHT_NAMES[0 if safe_serialization else 1])
        if safe_serialization:
            import json

            import safetensors.torch

            header = {"format": "pt"}
            if packed:
                header[METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True, default=list)
            safetensors.torch.save_file(state, str(path), metadata=header)
        else:
            if packed:
                raise ValueError("adapter metadata needs safe_serialization=True (it lives in the safetensors header)")
            torch.save(state, str(path))
        return path
