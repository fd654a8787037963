"""Diffusers' quantization configs: `TorchAoConfig` (one model) and `PipelineQuantizationConfig` (a pipeline's
components), with Diffusers 0.42.1's arguments and the errors it gives for the forms it refuses.

torchao is optional (`pip install "rapiddiff[quant]"`); building a `TorchAoConfig` without it says so.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from ..utils.optional import import_optional

TORCHAO_INSTALL = (
    'torchao quantization (TorchAoConfig, quantize_pipeline) needs torchao >= 0.15: pip install "rapiddiff[quant]"'
)
TORCHAO_MIN_VERSION = (0, 15)


class QuantizationMethod(str, enum.Enum):
    """The `quant_method` of a config (Diffusers' enum, with the backend rapiddiff has)."""

    TORCHAO = "torchao"


def import_torchao(name: str = "torchao") -> ModuleType:
    """Import torchao (or one of its modules), refusing versions older than Diffusers accepts."""
    torchao = import_optional("torchao", TORCHAO_INSTALL)
    version = tuple(int(p) for p in torchao.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if version < TORCHAO_MIN_VERSION:
        raise ImportError(f"{TORCHAO_INSTALL} (installed: torchao {torchao.__version__})")
    return import_optional(name, TORCHAO_INSTALL)


class TorchAoConfig:
    """A torchao quantization for one model, as Diffusers' `TorchAoConfig`.

    quant_type: a torchao config instance (`Int8WeightOnlyConfig()`, `Int8DynamicActivationInt8WeightConfig()`,
        `Float8WeightOnlyConfig()`, `Int4WeightOnlyConfig()`, an `FqnToConfig` mapping module names to them, ...);
        strings such as "int8wo" are refused, as in Diffusers 0.42.
    modules_to_not_convert: names of modules kept in their loaded precision; a name matches a linear layer when it
        equals the layer's name or is found, followed by ".", in its weight's name ("attn1" skips every `attn1.*`).

    Loading with it quantizes the weight of every `nn.Linear` (not the convolutions), as Diffusers does; without a
    dtype the model loads in bfloat16 (Diffusers' default for torchao).
    """

    def __init__(self, quant_type: Any, modules_to_not_convert: list[str] | None = None, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"TorchAoConfig got unexpected keyword argument(s) {sorted(kwargs)}")
        self.quant_method = QuantizationMethod.TORCHAO
        self.quant_type = quant_type
        self.modules_to_not_convert = modules_to_not_convert
        self.post_init()

    def post_init(self) -> None:
        ao_base = import_torchao("torchao.core.config").AOBaseConfig
        if not isinstance(self.quant_type, ao_base):
            raise TypeError(f"quant_type must be an AOBaseConfig instance, got {type(self.quant_type).__name__}")
        skip = self.modules_to_not_convert
        if skip is not None and (isinstance(skip, str) or not all(isinstance(s, str) for s in skip)):
            raise TypeError(f"modules_to_not_convert must be a list of module names, got {skip!r}")

    def get_apply_tensor_subclass(self) -> Any:
        return self.quant_type

    def to_dict(self) -> dict[str, Any]:
        config_to_dict = import_torchao("torchao.core.config").config_to_dict
        return {
            "quant_method": self.quant_method.value,
            "quant_type": {"default": config_to_dict(self.quant_type)},
            "modules_to_not_convert": self.modules_to_not_convert,
        }

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any]) -> TorchAoConfig:
        config_from_dict = import_torchao("torchao.core.config").config_from_dict
        config = dict(config_dict)
        config.pop("quant_method", None)
        quant_type = config.pop("quant_type")
        if not (isinstance(quant_type, Mapping) and set(quant_type) == {"default"}):
            raise ValueError("Expected only one key 'default' in quant_type dictionary")
        return cls(quant_type=config_from_dict(quant_type["default"]), **config)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


# The backends Diffusers 0.42.1 names; rapiddiff implements torchao.
DIFFUSERS_BACKENDS = (
    "bfl",
    "bitsandbytes_4bit",
    "bitsandbytes_8bit",
    "gguf",
    "quanto",
    "torchao",
    "modelopt",
    "auto-round",
    "nunchaku_lite",
    "sdnq",
)
BACKENDS: dict[str, type] = {"torchao": TorchAoConfig}


def _transformers_config_class() -> type | None:
    """transformers' quantization config base: such configs pass through to a transformers component's loading."""
    try:
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:
        return None
    return QuantizationConfigMixin


class PipelineQuantizationConfig:
    """Quantization of a pipeline's components at `from_pretrained`, as Diffusers' `PipelineQuantizationConfig`.

    quant_mapping: {component name: config}: a `rapiddiff.TorchAoConfig` (for any torch component) or a transformers
        quantization config (for a transformers component, handed to its `from_pretrained`).
    quant_backend + quant_kwargs (+ components_to_quantize, default all): one `TorchAoConfig(**quant_kwargs)` per
        component. Diffusers 0.42.1 refuses quant_backend="torchao" when transformers is installed (its two
        `TorchAoConfig`s take different arguments); rapiddiff has one, which quantizes transformers components too.
    """

    def __init__(
        self,
        quant_backend: str | None = None,
        quant_kwargs: dict[str, Any] | None = None,
        components_to_quantize: list[str] | str | None = None,
        quant_mapping: dict[str, Any] | None = None,
    ) -> None:
        self.quant_backend = quant_backend
        self.quant_kwargs = quant_kwargs or {}
        if isinstance(components_to_quantize, str):
            components_to_quantize = [components_to_quantize]
        self.components_to_quantize = components_to_quantize or None
        self.quant_mapping = quant_mapping
        self.config_mapping: dict[str, Any] = {}
        self.post_init()

    def post_init(self) -> None:
        self.is_granular = self.quant_mapping is not None
        if self.quant_backend and self.quant_mapping:
            raise ValueError("Both `quant_backend` and `quant_mapping` cannot be specified at the same time.")
        if not self.quant_mapping and not self.quant_backend:
            raise ValueError("Must provide a `quant_backend` when not providing a `quant_mapping`.")
        if not self.quant_kwargs and not self.quant_mapping:
            raise ValueError("Both `quant_kwargs` and `quant_mapping` cannot be None.")
        if self.quant_backend is not None and self.quant_backend not in BACKENDS:
            known = (
                " (a Diffusers backend rapiddiff does not implement)"
                if self.quant_backend in DIFFUSERS_BACKENDS
                else ""
            )
            raise ValueError(
                f"Provided quant_backend={self.quant_backend} was not found{known}.\n"
                f"Available ones (rapiddiff): {list(BACKENDS)}."
            )
        if self.quant_backend is not None:
            BACKENDS[self.quant_backend](**self.quant_kwargs)  # bad kwargs fail here, not at the first component
        if self.quant_mapping is not None:
            if not isinstance(self.quant_mapping, Mapping):
                raise TypeError(f"quant_mapping must be a dict of component name -> config, got {self.quant_mapping!r}")
            transformers_cls = _transformers_config_class()
            for name, config in self.quant_mapping.items():
                if isinstance(config, TorchAoConfig) or (transformers_cls and isinstance(config, transformers_cls)):
                    continue
                raise ValueError(
                    f"Provided config for module_name={name} could not be found. Available rapiddiff configs: "
                    f"[rapiddiff.TorchAoConfig]; transformers components also take transformers' quantization "
                    f"configs. Got {type(config).__module__}.{type(config).__name__}."
                )

    def _resolve_quant_config(self, is_diffusers: bool = True, module_name: str | None = None) -> Any:
        """The config for one component (None: not quantized). `is_diffusers` is Diffusers' argument: rapiddiff
        gives every component a `TorchAoConfig` for quant_backend="torchao"."""
        if self.is_granular and module_name in self.quant_mapping:
            config = self.quant_mapping[module_name]
        elif (self.components_to_quantize and module_name in self.components_to_quantize) or (
            not self.is_granular and not self.components_to_quantize
        ):
            config = BACKENDS[self.quant_backend](**self.quant_kwargs)
        else:
            return None
        self.config_mapping[module_name] = config
        return config

    def check_components(self, components: Mapping[str, Any], where: str) -> None:
        """Names in quant_mapping / components_to_quantize must be components of the pipeline being loaded."""
        named = [*(self.quant_mapping or {}), *(self.components_to_quantize or [])]
        unknown = sorted(n for n in named if n not in components)
        if unknown:
            raise ValueError(
                f"{where}: quantization_config names component(s) {unknown} the pipeline does not load; "
                f"its components are {sorted(components)}"
            )

    def __repr__(self) -> str:
        return "".join(f"{name} {config}" for name, config in sorted(self.config_mapping.items()))


def pipeline_quantization(config: Any, where: str) -> PipelineQuantizationConfig | None:
    """A pipeline's `quantization_config=`: None or a PipelineQuantizationConfig (Diffusers' error otherwise)."""
    if config is not None and not isinstance(config, PipelineQuantizationConfig):
        raise ValueError(
            f"{where}: `quantization_config` must be an instance of `PipelineQuantizationConfig`, got "
            f"{type(config).__module__}.{type(config).__name__}"
        )
    return config
