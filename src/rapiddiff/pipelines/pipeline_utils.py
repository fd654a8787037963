"""DiffusionPipeline: Diffusers' pipeline container - loading a `model_index.json` checkpoint, saving, `.to()`.

A pipeline's components are the parameters of its `__init__` without a default plus `_optional_components`
(Diffusers' rule); the other keyword parameters (`requires_safety_checker`, `max_noise_level`...) are config values
stored in model_index.json. How components are found, loaded and saved is `loading.py`; the argument checks every
`__call__` shares are `checks.py`; the call template the pipelines follow is `template.py`. The names of those
modules that other code imports from here are re-exported.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from ..configuration import read_json
from ..exports import DIFFUSERS_VERSION, exported_class
from ..hub import _is_local, resolve_file
from ..models.modeling_utils import device_map_device, dtype_argument
from ..quantization.config import pipeline_quantization
from ..utils.atomic_io import atomic_folder, read_lock
from ..utils.outputs import BaseOutput  # noqa: F401 - re-exported: the pipelines' outputs derive from it
from .checks import (  # noqa: F401 - re-exported: pipelines and tests import the checks from here
    callback_tensor_names,
    check_generator,
    check_number,
    check_output_type,
    check_positive_int,
)
from .image_processor import VaeImageProcessor
from .loading import (  # noqa: F401 - re-exported
    CONTROLNET_PIPELINES,
    MODEL_INDEX,
    _check_variant_present,
    _fetch_components,
    _indexed_components,
    _load_component,
    _save_component,
    _unwrap,
    file_variant,
    library_entry,
    pick_weight_files,
)
from .memory import MemoryMixin

P = TypeVar("P", bound="DiffusionPipeline")


# --- the pipeline config (model_index.json) ---------------------------------------------------------------------------
class PipelineConfig(Mapping):
    """Read-only view of a pipeline's model_index.json entries; keys also read as attributes (`config.foo`)."""

    def __init__(self, values: dict[str, Any]):
        self._values = values

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"pipeline config has no key {key!r}") from None

    def __repr__(self) -> str:
        return f"PipelineConfig({self._values!r})"


class DiffusionPipeline(MemoryMixin):
    """Base of every rapiddiff pipeline: holds the components, loads, saves and moves them (offloading and the other
    memory switches: `MemoryMixin`)."""

    config_name: ClassVar[str] = MODEL_INDEX
    _optional_components: ClassVar[tuple[str, ...]] = ()
    # names a `callback_on_step_end` may ask for; each pipeline lists its own
    _callback_tensor_inputs: ClassVar[tuple[str, ...]] = ("latents",)

    _name_or_path: str | None = None

    # Diffusers' helper: (N, H, W, C) floats in [0, 1] to PIL images.
    numpy_to_pil = staticmethod(VaeImageProcessor.numpy_to_pil)

    # --- components and config --------------------------------------------------------------------------------------
    @classmethod
    def _init_parameters(cls) -> dict[str, inspect.Parameter]:
        params = inspect.signature(cls.__init__).parameters
        return {n: p for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}

    @classmethod
    def component_names(cls) -> tuple[str, ...]:
        """Components in `__init__` order: parameters without a default, plus the optional components."""
        params = cls._init_parameters()
        return tuple(n for n, p in params.items() if p.default is p.empty or n in cls._optional_components)

    @classmethod
    def config_names(cls) -> tuple[str, ...]:
        """Non-component `__init__` parameters, stored in model_index.json (`requires_safety_checker`...)."""
        components = set(cls.component_names())
        return tuple(n for n in cls._init_parameters() if n not in components)

    def register_components(self, components: dict[str, Any], config: dict[str, Any]) -> None:
        """What `__init__` (`call_signature.pipeline_init`) does with its arguments; a model family adds its checks."""
        self.register_modules(**components)
        self.register_to_config(**config)

    def register_modules(self, **modules: Any) -> None:
        for name, module in modules.items():
            setattr(self, name, module)

    def register_to_config(self, **values: Any) -> None:
        self.__dict__.setdefault("_config_values", {}).update(values)

    @property
    def config(self) -> PipelineConfig:
        values: dict[str, Any] = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_VERSION}
        if self._name_or_path is not None:
            values["_name_or_path"] = self._name_or_path
        values.update({n: library_entry(getattr(self, n, None)) for n in self.component_names()})
        values.update(self.__dict__.get("_config_values", {}))
        return PipelineConfig(values)

    @property
    def components(self) -> dict[str, Any]:
        """Name -> component, e.g. to build another pipeline on the same weights: `Img2Img(**pipe.components)`."""
        return {n: getattr(self, n, None) for n in self.component_names()}

    @property
    def name_or_path(self) -> str | None:
        return self._name_or_path

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in self.components.values() if isinstance(m, torch.nn.Module)]

    def __repr__(self) -> str:
        lines = [f"  {n}: {library_entry(c)[1]}" for n, c in self.components.items()]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"

    # --- device and dtype -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for m in self._modules():
            return next(m.parameters()).device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for m in self._modules():
            return next(m.parameters()).dtype
        return torch.float32

    def to(self: P, *args: Any, device: Any = None, dtype: torch.dtype | None = None) -> P:
        """Move every torch module: `pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to("cuda", torch.float16)`."""
        if len(args) > 2:
            raise TypeError(f"to() takes at most a device and a dtype, got {len(args)} arguments: {args!r}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                if dtype is not None:
                    raise TypeError(f"to(): dtype given twice ({dtype} and {arg})")
                dtype = arg
            else:
                if device is not None:
                    raise TypeError(f"to(): device given twice ({device!r} and {arg!r})")
                device = arg
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"to(): dtype must be a torch.dtype such as torch.float16, got {dtype!r}")
        device = torch.device(device) if device is not None else None
        self._check_move_under_offload(device)
        for module in self._modules():
            module.to(device=device, dtype=dtype)
        return self

    # --- progress bar -----------------------------------------------------------------------------------------------
    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the tqdm bar over the denoising steps, e.g. `disable=True`."""
        self._progress_bar_config = kwargs

    @torch.compiler.disable
    def progress_bar(self, iterable: Any = None, total: int | None = None) -> Any:
        """A tqdm bar over `iterable`, or counting to `total` (Diffusers' signature)."""
        from tqdm.auto import tqdm

        config = getattr(self, "_progress_bar_config", {})
        if iterable is not None:
            return tqdm(iterable, **config)
        if total is not None:
            return tqdm(total=total, **config)
        raise ValueError("progress_bar: give an iterable or total=")

    # --- loading ----------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls: type[P],
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | str | Mapping[str, torch.dtype | str] | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        dtype: torch.dtype | str | Mapping[str, torch.dtype | str] | None = None,
        **kwargs: Any,
    ) -> P:
        """Load a pipeline saved in Diffusers' layout (a local folder or a Hub id).

        `dtype` (Diffusers 0.42's name) or `torch_dtype`, not both: one dtype for every torch component, "auto" (as
        stored), or {"unet": ..., "default": ...}; float32 if not given.
        Keyword arguments named after components replace them (`safety_checker=None`, `controlnet=...`); those named
        after config values (`requires_safety_checker=False`) replace model_index.json's.
        """
        kwargs.pop("low_cpu_mem_usage", None)  # always the case: models are built on the meta device
        quantization = pipeline_quantization(kwargs.pop("quantization_config", None), f"{cls.__name__}.from_pretrained")
        device_map = kwargs.pop("device_map", None)
        if device_map is not None and not isinstance(device_map, str):
            raise ValueError(f"{cls.__name__}.from_pretrained: device_map must be a string, got {device_map!r}")
        device = device_map_device(device_map, f"{cls.__name__}.from_pretrained", strategies=("balanced",))
        torch_dtype = dtype_argument(torch_dtype, dtype, f"{cls.__name__}.from_pretrained", per_component=True)
        hub = dict(local_files_only=local_files_only, revision=revision, cache_dir=cache_dir, token=token)
        source = str(pretrained_model_name_or_path)
        index_path = resolve_file(pretrained_model_name_or_path, MODEL_INDEX, **hub)
        index = read_json(index_path)
        pipeline_cls = cls._pipeline_class(index, source, with_controlnet=kwargs.get("controlnet") is not None)

        overrides, config = pipeline_cls._split_kwargs(kwargs)
        entries = pipeline_cls._index_entries(index, overrides, source)
        config = {k: v for k, v in index.items() if k in pipeline_cls.config_names()} | config

        to_load = {n: e for n, e in entries.items() if e != (None, None)}
        if quantization is not None:
            quantization.check_components(pipeline_cls.component_names(), f"{cls.__name__}.from_pretrained")
        if _is_local(pretrained_model_name_or_path):
            root = index_path.parent
        else:
            root = _fetch_components(source, list(to_load), variant, use_safetensors, hub)
        _check_variant_present(root, list(to_load), variant, source)
        loaded: dict[str, Any] = {n: None for n in entries}
        with read_lock(root):  # a save_pretrained swapping this folder waits: old or new, never a mix
            for name, (library, class_name) in to_load.items():
                component_dtype = (
                    torch_dtype.get(name, torch_dtype.get("default"))
                    if isinstance(torch_dtype, Mapping)
                    else torch_dtype
                )
                quant = None if quantization is None else quantization._resolve_quant_config(module_name=name)
                loaded[name] = _load_component(
                    root, name, library, class_name, component_dtype, variant, use_safetensors, quant
                )
        pipe = pipeline_cls(**loaded, **overrides, **config)
        pipe._name_or_path = source
        return pipe if device is None else pipe.to(device)

    @classmethod
    def from_single_file(cls: type[P], pretrained_model_link_or_path: str | os.PathLike, **kwargs: Any) -> P:
        """A Stable Diffusion pipeline from one checkpoint file in the original layout (`.safetensors` / `.ckpt`),
        offline: see `rapiddiff.loaders.single_file.pipeline_from_single_file` for the arguments."""
        from ..loaders.single_file import pipeline_from_single_file

        return pipeline_from_single_file(cls, pretrained_model_link_or_path, **kwargs)

    @classmethod
    def _split_kwargs(cls, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """from_pretrained's extra keyword arguments: (component overrides, config overrides); others are an error."""
        components, config_names = cls.component_names(), cls.config_names()
        unknown = sorted(k for k in kwargs if k not in components and k not in config_names)
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_pretrained got unexpected keyword argument(s) {unknown}; "
                f"components: {list(components)}; config values: {list(config_names)}"
            )
        overrides = {k: v for k, v in kwargs.items() if k in components}
        return overrides, {k: v for k, v in kwargs.items() if k in config_names}

    @classmethod
    def _pipeline_class(
        cls, index: Mapping[str, Any], source: str, with_controlnet: bool = False
    ) -> type[DiffusionPipeline]:
        if cls is not DiffusionPipeline:
            return cls
        name = index.get("_class_name")
        if not isinstance(name, str):
            raise ValueError(f"{source}/{MODEL_INDEX} has no '_class_name' naming the pipeline class")
        if with_controlnet:
            name = CONTROLNET_PIPELINES.get(name, name)
        pipeline_cls = exported_class(name, f"{source}/{MODEL_INDEX} _class_name")
        if not (isinstance(pipeline_cls, type) and issubclass(pipeline_cls, DiffusionPipeline)):
            raise ValueError(f"{source}/{MODEL_INDEX}: _class_name {name!r} is not a pipeline class")
        return pipeline_cls

    @classmethod
    def _index_entries(
        cls, index: Mapping[str, Any], overrides: Mapping[str, Any], source: str
    ) -> dict[str, tuple[str | None, str | None]]:
        """The `[library, class]` entry of each component to load; checks the index fits this class."""
        where = f"{source}/{MODEL_INDEX}"
        components, config_names = cls.component_names(), cls.config_names()
        entries, foreign = {}, []
        for key, value in index.items():
            if key.startswith("_") or key in config_names:
                continue
            if key not in components:
                foreign.append(key)
            elif key not in overrides:
                if not (isinstance(value, (list, tuple)) and len(value) == 2):
                    raise ValueError(f"{where}: entry {key!r} must be [library, class name], got {value!r}")
                entries[key] = tuple(value)
        if foreign:
            raise ValueError(
                f"{where} (written for {index.get('_class_name')}) has entries {foreign} that {cls.__name__} does not "
                f"take; its components are {list(components)} and its config values {list(config_names)}"
            )
        missing = [n for n in components if n not in entries and n not in overrides]
        required = [n for n in missing if n not in cls._optional_components]
        if required:
            raise ValueError(
                f"{where} (written for {index.get('_class_name')}) has no component(s) {required} needed by "
                f"{cls.__name__}; pass them to from_pretrained, e.g. {required[0]}=..."
            )
        return entries | {n: (None, None) for n in missing}

    @classmethod
    def from_pipe(cls: type[P], pipeline: DiffusionPipeline, **kwargs: Any) -> P:
        """A pipeline of this class on `pipeline`'s components (the same objects, no copy), as Diffusers' `from_pipe`.

        Keyword arguments named after components or config values replace them; `dtype=` / `torch_dtype=` moves the
        new pipeline's modules (and so the shared ones). Components this class has and `pipeline` lacks are None
        if optional, else an error naming them.
        """
        if not isinstance(pipeline, DiffusionPipeline):
            raise TypeError(f"from_pipe takes a rapiddiff pipeline, got {type(pipeline).__name__}")
        target = type(pipeline) if cls is DiffusionPipeline else cls
        dtype = dtype_argument(
            kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None), f"{target.__name__}.from_pipe"
        )
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"{target.__name__}.from_pipe: dtype must be one torch.dtype, got {dtype!r}")
        overrides, config = target._split_kwargs(kwargs)
        components = {n: overrides.get(n, getattr(pipeline, n, None)) for n in target.component_names()}
        missing = [n for n, c in components.items() if c is None and n not in target._optional_components]
        if missing:
            raise ValueError(
                f"{target.__name__}.from_pipe: {type(pipeline).__name__} has no component(s) {missing}; pass them, "
                f"e.g. {missing[0]}=..."
            )
        old_config = pipeline.config
        config = {k: old_config[k] for k in target.config_names() if k in old_config} | config
        new = target(**components, **config)
        new._name_or_path = pipeline.name_or_path
        if isinstance(dtype, torch.dtype):
            new.to(dtype=dtype)
        return new

    # --- saving -----------------------------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
    ) -> None:
        """Write Diffusers' layout: model_index.json and one folder per component (Diffusers can load it).

        Atomic: the whole checkpoint is written beside `save_directory` and swapped in at the end, so a failure
        leaves the old checkpoint as it was, and component folders hold only what this save wrote (no stale variant,
        format or shard). Files of the folder that belong to no component (a README) are kept.
        """
        directory = Path(save_directory)
        index = {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items() if k != "_name_or_path"}
        owned = {MODEL_INDEX, *self.component_names(), *_indexed_components(directory)}
        with atomic_folder(directory, keep=lambda name: name not in owned) as tmp:
            (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            for name, component in self.components.items():
                if component is not None:
                    _save_component(_unwrap(component), tmp / name, safe_serialization, variant, max_shard_size)
