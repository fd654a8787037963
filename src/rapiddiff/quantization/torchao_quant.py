"""Applying a `TorchAoConfig` to a loaded model, the way Diffusers' torchao quantizer does at loading time: the weight
of each `nn.Linear` not named by `modules_to_not_convert` becomes a torchao tensor (convolutions stay as loaded)."""

from __future__ import annotations

import importlib
import re
import sys
from typing import Any

import torch
from torch import nn

from .config import TorchAoConfig, import_torchao

# The inductor options torchao sets (globally) when it quantizes: `torchao.quantization.utils.
# recommended_inductor_config_setter`. compile_pipeline passes them per module for modules holding torchao weights.
TORCHAO_INDUCTOR_OPTIONS = {
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "force_fuse_int_mm_with_mul": True,
}


def _skipped(weight_name: str, skip: list[str]) -> bool:
    """Diffusers' rule: a name in modules_to_not_convert skips a weight it equals or that contains it followed by "."."""
    return any(key + "." in weight_name or key == weight_name for key in skip)


def _resolve_fqn(config: Any, module_fqn: str, param_fqn: str) -> Any:
    """The config an `FqnToConfig` gives one linear layer: an exact name (weight, then module), then "re:" patterns,
    then "_default" (None: left unquantized)."""
    table = config.fqn_to_config
    for fqn in (param_fqn, module_fqn):
        if fqn in table:
            return table[fqn]
    for fqn in (param_fqn, module_fqn):
        for pattern, pattern_config in table.items():
            if pattern.startswith("re:") and re.fullmatch(pattern[3:], fqn):
                return pattern_config
    return table.get("_default")


def check_quantization_config(config: Any, where: str) -> None:
    """A model's quantization_config is a rapiddiff.TorchAoConfig (a pipeline's is a PipelineQuantizationConfig)."""
    if not isinstance(config, TorchAoConfig):
        raise TypeError(
            f"{where}: quantization_config must be a rapiddiff.TorchAoConfig, got "
            f"{type(config).__module__}.{type(config).__name__}"
        )


def refuse_prequantized(raw_config: dict[str, Any], source: str) -> None:
    """A checkpoint saved quantized (Diffusers writes its quantization_config into config.json) is refused by name."""
    if raw_config.get("quantization_config") is not None:
        raise ValueError(
            f"{source}: this checkpoint was saved quantized ({raw_config['quantization_config'].get('quant_method')}); "
            "rapiddiff loads float checkpoints and quantizes them with from_pretrained(..., "
            "quantization_config=TorchAoConfig(...))"
        )


def quantize_model(model: nn.Module, config: TorchAoConfig, keep_in_fp32: list[str] | None = None) -> nn.Module:
    """Quantize `model`'s linear layers in place with `config` (see the module docstring); returns the model."""
    check_quantization_config(config, type(model).__name__)
    quantization = import_torchao("torchao.quantization")
    skip = [*(config.modules_to_not_convert or []), *(keep_in_fp32 or [])]
    quant_type = config.get_apply_tensor_subclass()
    is_table = isinstance(quant_type, quantization.FqnToConfig)
    for name, module in list(model.named_modules()):
        weight_name = f"{name}.weight" if name else "weight"
        if not isinstance(module, nn.Linear) or _skipped(weight_name, skip):
            continue
        layer_config = _resolve_fqn(quant_type, name, weight_name) if is_table else quant_type
        if layer_config is None:
            continue
        if isinstance(layer_config, quantization.FqnToConfig):
            raise ValueError(
                f"Nested `FqnToConfig` entries are not supported (resolved from `{weight_name}`). Map each fqn to a "
                "quantization config, or to `None` to leave the matching modules unquantized."
            )
        quantization.quantize_(module, layer_config)
    return model


def quantize_loaded(model: nn.Module, config: Any, dtype_given: Any, where: str) -> nn.Module:
    """A model built by a loader that is not from_pretrained (single files): without a dtype given it goes to
    bfloat16 first (Diffusers' default for torchao), then `quantize_model`. config None: the model as it is."""
    if config is None:
        return model
    if not isinstance(config, TorchAoConfig):
        raise ValueError(f"{where}: a single-file component is quantized with rapiddiff.TorchAoConfig, got {config!r}")
    if dtype_given is None:
        model.to(torch.bfloat16)
    return quantize_model(model, config)


def is_torchao_quantized(module: nn.Module) -> bool:
    """Whether any parameter of `module` is a torchao tensor (False without importing torchao if nobody did)."""
    if "torchao" not in sys.modules:
        return False
    base = importlib.import_module("torchao.utils").TorchAOBaseTensor  # loaded with torchao
    return any(isinstance(p, base) for p in module.parameters())


def check_castable(module: nn.Module, dtype: torch.dtype | None, where: str) -> None:
    """Diffusers' rule: a quantized model's dtype is chosen at loading, never cast afterwards."""
    if dtype is not None and is_torchao_quantized(module):
        raise ValueError(
            f"{where}: Casting a quantized model to a new `dtype` is unsupported. To set the dtype of unquantized "
            "layers, please use the `torch_dtype` argument when loading the model using `from_pretrained` or "
            "`from_single_file`"
        )


def refuse_save(module: nn.Module, where: str) -> None:
    if is_torchao_quantized(module):
        raise NotImplementedError(
            f"{where}: saving a torchao-quantized model is not supported by rapiddiff (its weights are torchao tensor "
            "subclasses): save the float model and quantize when loading, with "
            "from_pretrained(..., quantization_config=TorchAoConfig(...))"
        )
