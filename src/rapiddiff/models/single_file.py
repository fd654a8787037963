"""Single-file checkpoints in the original layout, the models' side: reading a file, building a model from converted
tensors, and `ControlNetModel.from_single_file` (ControlNet's `control_model.*` files). The key table is
`single_file_keys`; pipelines' files (UNet, VAE and text encoder in one) are the loaders' (`loaders/single_file.py`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..configuration import read_json
from ..presets import PRESETS_DIR
from ..quantization.torchao_quant import check_quantization_config, quantize_loaded
from .modeling_utils import resolve_dtype_arg
from .single_file_keys import CONTROLNET_PREFIX, controlnet_rules, to_diffusers
from .weight_files import load_state_dict_file

CONTROLNET_PRESET = "sd-controlnet-canny"  # the config of an SD 1.x ControlNet file when no config= is given


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A `.safetensors` or `.ckpt` / `.pt` / `.bin` file (pickles read with weights_only=True): the raw key -> tensor dict,
    plus `global_step` where a .ckpt stores it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a folder: from_single_file reads one checkpoint file (from_pretrained reads folders)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"single-file checkpoint {str(path)!r} does not exist")
    data = load_state_dict_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    step = data.get("global_step")
    state = data.get("state_dict", data)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: no tensors found (keys: {sorted(state)[:8]})")
    return {"state": tensors, "global_step": step if isinstance(step, int) else None}


def read_model_config(folder: Path, name: str | None) -> dict[str, Any]:
    path = (folder / name if name else folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found")
    return read_json(path)


def cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype | str) -> dict[str, torch.Tensor]:
    if dtype == "auto":
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def load_model(
    cls: type, config: Mapping[str, Any], state: dict[str, torch.Tensor], source: str, **overrides: Any
) -> Any:
    """A rapiddiff model built on the meta device from `config`, holding the converted tensors."""
    parsed = cls._parse_config(config, overrides, source=source)
    with torch.device("meta"):
        model = cls(parsed)
    model.load_checkpoint_state(state, source=source)
    return model.eval()


def controlnet_from_single_file(
    cls: type,
    path: str | os.PathLike,
    config: str | os.PathLike | None,
    torch_dtype: Any,
    dtype: Any,
    quantization_config: Any = None,
) -> Any:
    """`ControlNetModel.from_single_file`: an original ControlNet file (`control_model.*` or bare keys)."""
    where = f"{cls.__name__}.from_single_file"
    if quantization_config is not None:
        check_quantization_config(quantization_config, where)
    load_dtype = resolve_dtype_arg(torch_dtype, dtype, where)
    state, source = read_checkpoint(path)["state"], str(path)
    prefix = CONTROLNET_PREFIX if any(k.startswith(CONTROLNET_PREFIX) for k in state) else ""
    if prefix + "input_hint_block.0.weight" not in state:
        raise ValueError(f"{source} is not a ControlNet in the original layout: no {prefix}input_hint_block.0.weight")
    if config is not None:
        folder = Path(os.path.expanduser(str(config)))
        if not (folder / "config.json").is_file() and (folder / "controlnet" / "config.json").is_file():
            folder = folder / "controlnet"
    else:
        context = state[prefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[-1]
        if context != 768:
            raise ValueError(
                f"{source}: a ControlNet for a cross-attention width of {context} (not SD 1.x): pass config="
            )
        folder = PRESETS_DIR / CONTROLNET_PRESET
    net_config = read_model_config(folder, None)
    converted = cast_floats(to_diffusers(state, controlnet_rules(net_config, prefix), source, (prefix,)), load_dtype)
    model = load_model(cls, net_config, converted, f"{source} (ControlNet)")
    return quantize_loaded(model, quantization_config, torch_dtype or dtype, where)
