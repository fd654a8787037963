"""ModelMixin: Diffusers-compatible loading and saving for every rapiddiff model.

Loading builds the module tree on the meta device (no memory, no random init), reads the state dict straight from the
checkpoint in the requested dtype and attaches it with `load_state_dict(assign=True)`: the weights are held once.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..configuration import ConfigMixin, read_json
from ..hub import resolve_dir
from ..quantization.torchao_quant import (
    check_castable,
    check_quantization_config,
    quantize_model,
    refuse_prequantized,
    refuse_save,
)
from ..utils.atomic_io import atomic_folder, read_lock
from .weight_files import (
    WEIGHTS_NAME,
    _not_model_file,
    find_weight_files,
    load_state_dict_file,
    write_weights,
)

M = TypeVar("M", bound="ModelMixin")
DtypeArg = torch.dtype | str | None

# Loading arguments of every model's from_pretrained (named in the error for an argument it does not take).
LOADING_ARGS = (
    "subfolder",
    "torch_dtype",
    "dtype",
    "variant",
    "use_safetensors",
    "local_files_only",
    "revision",
    "cache_dir",
    "token",
    "low_cpu_mem_usage",
    "device_map",
    "quantization_config",
)


def dtype_argument(torch_dtype: Any, dtype: Any, where: str, per_component: bool = False) -> Any:
    """`dtype=` (Diffusers 0.42's name) or `torch_dtype=`, not both: a torch.dtype or "auto" (as stored); pipelines
    also take a dict per component. Returns the value given (None if neither)."""
    if torch_dtype is not None and dtype is not None:
        raise TypeError(f"{where}: pass dtype= or torch_dtype= (the same argument), not both")
    name, value = ("dtype", dtype) if dtype is not None else ("torch_dtype", torch_dtype)
    values = value.values() if per_component and isinstance(value, Mapping) else [value]
    if any(
        v is not None and not isinstance(v, torch.dtype) and not (isinstance(v, str) and v == "auto") for v in values
    ):
        per = (
            " or a dict of them per component ({'unet': torch.float16, 'default': torch.float32})"
            if per_component
            else ""
        )
        raise TypeError(f"{where}: {name} must be a torch.dtype such as torch.float16 or 'auto'{per}, got {value!r}")
    return value


# Accelerate's device_map strategies: Diffusers spreads a model's layers (a pipeline's components for "balanced")
# over the GPUs by free memory. rapiddiff places a whole model or pipeline on one device, so it takes them where
# there is one device to place it on: the GPU when there is one, else the CPU.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map_device(
    device_map: Any, where: str, strategies: Sequence[str] = DEVICE_MAP_STRATEGIES
) -> torch.device | None:
    """The one device a `from_pretrained(device_map=...)` puts everything on (None: not given, stay on the CPU).

    Taken: a device ("cpu", "cuda:0", a torch.device, a GPU index, {"": device}) or one of `strategies` on a machine
    with at most one GPU. A map that splits a model across devices is refused, naming what is supported.
    """
    if device_map is None:
        return None
    supported = (
        f"rapiddiff places the whole model on one device: pass None, a device ('cpu', 'cuda:0', a torch.device, a "
        f"GPU index, {{'': device}}) or one of {', '.join(map(repr, strategies))} on a machine with at most one GPU; "
        "enable_model_cpu_offload() for models that do not fit"
    )
    value = device_map[""] if isinstance(device_map, Mapping) and set(device_map) == {""} else device_map
    if isinstance(value, str) and value in strategies:
        gpus = torch.cuda.device_count()
        if gpus > 1:
            raise ValueError(f"{where}: device_map={device_map!r} would spread it over {gpus} GPUs; {supported}")
        return torch.device("cuda:0" if gpus else "cpu")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return torch.device("cuda", value)
    if isinstance(value, (str, torch.device)):
        try:
            return torch.device(value)
        except RuntimeError:
            pass
    raise ValueError(f"{where}: device_map={device_map!r} is not supported; {supported}")


def resolve_dtype_arg(torch_dtype: Any, dtype: Any, where: str) -> torch.dtype | str:
    """One model's dtype: the argument given, else float32 (as Diffusers)."""
    value = dtype_argument(torch_dtype, dtype, where)
    return torch.float32 if value is None else value


class ModelMixin(nn.Module, ConfigMixin):
    """Base of every rapiddiff model: config handling, from_pretrained / save_pretrained, attention processors."""

    # Old Diffusers checkpoints name some weights differently: {old substring: new substring}, applied on load.
    _legacy_key_renames: ClassVar[dict[str, str]] = {}
    _config_example: ClassVar[str] = "unet"

    def __getattr__(self, name: str) -> Any:
        # Only called for names Python's lookup does not find; nn.Module's finds parameters, buffers and submodules
        # (torch.compile reads those directly). Then a config key (Diffusers' deprecated `unet.in_channels`).
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        return self._config_attribute(name)

    # --- construction ---------------------------------------------------------------------------------------------
    def _init_config(self, config: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> Any:
        """Models are built as `Model(**diffusers_kwargs)` or `Model(config)`; returns the parsed config."""
        self.config = self._parse_config(config, kwargs, source=type(self).__name__)
        return self.config

    @classmethod
    def from_config(cls: type[M], config: Mapping[str, Any] | None = None, **kwargs: Any) -> M:
        """A randomly initialised model from a config dict (as Diffusers' `Model.from_config`)."""
        return cls(cls._parse_config(config, kwargs, source=cls.__name__))

    @classmethod
    def from_pretrained(
        cls: type[M],
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: DtypeArg = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        local_files_only: bool = False,
        *,
        dtype: DtypeArg = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        low_cpu_mem_usage: bool = True,  # always the case here: weights are loaded onto a meta-built model
        device_map: Any = None,
        quantization_config: Any = None,
        **config_overrides: Any,
    ) -> M:
        """Load a model saved in Diffusers' layout. `dtype=` or `torch_dtype=` (float32 if neither; "auto": as stored).

        quantization_config: a `rapiddiff.TorchAoConfig`: the linear layers' weights become torchao tensors once
        loaded (on the target device), as Diffusers does; the dtype then defaults to bfloat16, as in Diffusers.

        Other keyword arguments override config values, as in Diffusers; a loading argument rapiddiff does not take
        is a TypeError naming it.
        """
        where = f"{cls.__name__}.from_pretrained"
        if quantization_config is not None:
            check_quantization_config(quantization_config, where)
            if torch_dtype is None and dtype is None:
                torch_dtype = torch.bfloat16
        load_dtype = resolve_dtype_arg(torch_dtype, dtype, where)
        device = device_map_device(device_map, f"{cls.__name__}.from_pretrained")
        cls._check_overrides(config_overrides)
        hub_kwargs = {"revision": revision, "cache_dir": cache_dir, "token": token}
        pattern = f"{subfolder}/*" if subfolder else None
        folder = resolve_dir(
            pretrained_model_name_or_path,
            subfolder,
            allow_patterns=[pattern] if pattern else None,
            local_files_only=local_files_only,
            **hub_kwargs,
        )
        with read_lock(folder):
            config_path = folder / cls.config_name
            if not config_path.is_file():
                raise FileNotFoundError(f"{cls.config_name} not found in {folder}")
            raw_config = read_json(config_path)
            refuse_prequantized(raw_config, str(config_path))
            config = cls._parse_config(raw_config, config_overrides, source=str(config_path))
            files = find_weight_files(folder, variant=variant, use_safetensors=use_safetensors)
            with torch.device("meta"):
                model = cls(config)
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(load_state_dict_file(f, None if load_dtype == "auto" else load_dtype))
        source = str(files[0]) if len(files) == 1 else f"{folder} (shards {[f.name for f in files]})"
        model.load_checkpoint_state(state, source=source)
        model = model.eval() if device is None else model.to(device).eval()
        return model if quantization_config is None else quantize_model(model, quantization_config)

    @classmethod
    def _check_overrides(cls, overrides: Mapping[str, Any]) -> None:
        """Keyword arguments of from_pretrained beyond the loading ones must be config keys (Diffusers' overrides)."""
        fields = set(cls.config_class._field_names())
        unknown = sorted(k for k in overrides if k not in fields)
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_pretrained got unexpected keyword argument(s) {unknown}: neither a loading "
                f"argument rapiddiff takes ({', '.join(LOADING_ARGS)}) nor a key of {cls.config_class.__name__}"
            )

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Attach a checkpoint's tensors to a (meta-device) model; missing or unexpected keys are an error."""
        state = self._rename_legacy_keys(state)
        expected = set(self.state_dict().keys())
        missing = sorted(expected - state.keys())
        unexpected = sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"{source} does not fit {type(self).__name__}: "
                f"missing keys {_short(missing)}; unexpected keys {_short(unexpected)}"
            )
        own = self.state_dict()
        not_float = [
            f"{k} ({v.dtype})" for k, v in state.items() if own[k].is_floating_point() and not v.is_floating_point()
        ]
        if not_float:
            raise ValueError(
                f"{source}: tensor(s) {_short(not_float)} are not floating point, but {type(self).__name__} "
                "stores them as float parameters"
            )
        bad = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state.items()
            if v.shape != own[k].shape
        ]
        if bad:
            raise ValueError(f"{source}: tensor shapes do not fit {type(self).__name__}: {_short(bad)}")
        self.load_state_dict(state, strict=True, assign=True)
        left = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"{type(self).__name__}: tensors left uninitialised after loading: {_short(left)}")

    def _rename_legacy_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self._legacy_key_renames:
            return state
        out = {}
        for k, v in state.items():
            for old, new in self._legacy_key_renames.items():
                if old in k:
                    k = k.replace(old, new)
                    break
            out[k] = v
        return out

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        variant: str | None = None,
        safe_serialization: bool = True,
        max_shard_size: int | str = "10GB",
    ) -> None:
        """Write config.json and the weights (sharded with an index above `max_shard_size`), atomically: the folder
        is replaced whole, so old weights of another variant or format do not survive."""
        refuse_save(self, f"{type(self).__name__}.save_pretrained")
        with atomic_folder(save_directory, keep=_not_model_file) as tmp:
            self.save_config(tmp)
            state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
            write_weights(state, tmp, WEIGHTS_NAME, variant, safe_serialization, max_shard_size)

    # --- properties Diffusers users rely on -----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The first floating-point parameter's dtype, else a floating-point buffer's, else any tensor's (as
        Diffusers looks); float32 for a model that holds no tensors. With layerwise casting: the compute dtype."""
        casting = self.__dict__.get("_layerwise_casting")
        if casting is not None:
            return casting.compute_dtype
        other = None
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
            other = other or tensor.dtype
        return other or torch.float32

    @property
    def device(self) -> torch.device:
        """Where the first parameter (else buffer) lives; the CPU for a model that holds no tensors."""
        first = next(itertools.chain(self.parameters(), self.buffers()), None)
        return first.device if first is not None else torch.device("cpu")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- gradient checkpointing (models/gradient_checkpointing.py) ---------------------------------------------------
    _supports_gradient_checkpointing: ClassVar[bool] = False
    _checkpointed_blocks: ClassVar[tuple[type[nn.Module], ...]] = ()  # the blocks that recompute in the backward

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Callable[..., Any] | None = None) -> None:
        """Diffusers' method: blocks recompute their activations in the backward pass (training)."""
        from .gradient_checkpointing import enable

        enable(self, self._checkpointed_blocks, gradient_checkpointing_func)

    def disable_gradient_checkpointing(self) -> None:
        from .gradient_checkpointing import disable

        disable(self)

    @property
    def is_gradient_checkpointing(self) -> bool:
        from .gradient_checkpointing import enabled

        return enabled(self)

    # --- layerwise casting (models/layerwise_casting.py) -------------------------------------------------------------
    _keep_in_fp32_modules: ClassVar[list[str] | None] = None
    _skip_layerwise_casting_patterns: ClassVar[list[str] | None] = None

    def enable_layerwise_casting(
        self,
        storage_dtype: torch.dtype = torch.float8_e4m3fn,
        compute_dtype: torch.dtype | None = None,
        skip_modules_pattern: tuple[str, ...] | None = None,
        skip_modules_classes: tuple[type[nn.Module], ...] | None = None,
        non_blocking: bool = False,
    ) -> None:
        """Diffusers' method: weights stored in `storage_dtype`, each layer computed in `compute_dtype` (default:
        the model's dtype); norms and the model's `_skip_layerwise_casting_patterns` are not cast."""
        from .layerwise_casting import enable

        enable(self, storage_dtype, compute_dtype, skip_modules_pattern, skip_modules_classes, non_blocking)

    # --- attention processors -------------------------------------------------------------------------------------
    @property
    def attn_processors(self) -> dict[str, Any]:
        """Every attention layer's processor, keyed `<module path>.processor` as in Diffusers."""
        from .attention_processor import Attention

        return {f"{n}.processor": m.processor for n, m in self.named_modules() if isinstance(m, Attention)}

    def set_attn_processor(self, processor: Any) -> None:
        """One processor for every attention layer, or a dict with one entry per layer (keys as `attn_processors`)."""
        from .attention_processor import Attention

        layers = {f"{n}.processor": m for n, m in self.named_modules() if isinstance(m, Attention)}
        if isinstance(processor, Mapping):
            if set(processor) != set(layers):
                missing = sorted(set(layers) - set(processor))
                extra = sorted(set(processor) - set(layers))
                raise ValueError(
                    f"set_attn_processor got a dict of processors, but the number of processors ({len(processor)}) "
                    f"does not match the number of attention layers of {type(self).__name__} ({len(layers)}); "
                    f"missing {_short(missing)}, unknown {_short(extra)}"
                )
            for key, module in layers.items():
                module.set_processor(processor[key])
        else:
            for module in layers.values():
                module.set_processor(processor)

    def set_default_attn_processor(self) -> None:
        """Back to the vanilla (explicit matmul + softmax) processor of each layer's kind, as Diffusers does."""
        from .attention_processor import Attention

        for m in self.modules():
            if isinstance(m, Attention):
                m.set_processor(m.vanilla_processor())

    # --- memory switches ------------------------------------------------------------------------------------------
    def enable_xformers_memory_efficient_attention(self, attention_op: Any = None) -> None:
        """Diffusers' switch to xFormers. rapiddiff's default processors already call PyTorch's memory-efficient SDPA
        kernels, so this only (re)selects them on every layer and says so; `attention_op` is not used."""
        from .attention_processor import warn_sdpa_in_use

        warn_sdpa_in_use(type(self).__name__, attention_op)
        self.set_use_memory_efficient_attention_xformers(True, attention_op)

    def disable_xformers_memory_efficient_attention(self) -> None:
        self.set_use_memory_efficient_attention_xformers(False)

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Any = None) -> None:
        """Either way every attention layer gets its default SDPA processor (as Diffusers' disable does)."""
        from .attention_processor import Attention

        for m in self.modules():
            if isinstance(m, Attention):
                m.set_processor(m.default_processor())

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """nn.Module.to; a torchao-quantized model refuses a new dtype (Diffusers' rule: choose it at loading)."""
        check_castable(self, torch._C._nn._parse_to(*args, **kwargs)[1], f"{type(self).__name__}.to")
        return super().to(*args, **kwargs)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """`nn.Module.compile`, keeping a model-offload hook (rapiddiff.pipelines.offload) outside the graph."""
        from ..utils.offload import check_compilable, keep_offload_hook_outside

        check_compilable(self)
        super().compile(*args, **kwargs)
        keep_offload_hook_outside(self)


class AttentionSlicingMixin:
    """`set_attention_slice` as Diffusers' UNet and ControlNet have it."""

    def set_attention_slice(self, slice_size: str | int | list[int | None] | None = "auto") -> None:
        """Sliced attention in every layer: "auto" (half the layer's heads, at least 1), "max" (1), an int, a list
        with one int (or None) per attention layer, or None (back to the default SDPA processors)."""
        from .attention_processor import Attention, check_slice_size

        layers = [m for m in self.modules() if isinstance(m, Attention)]
        if slice_size == "auto":
            sizes: list[int | None] = [max(m.sliceable_head_dim // 2, 1) for m in layers]
        elif slice_size == "max":
            sizes = [1] * len(layers)
        elif isinstance(slice_size, list):
            if len(slice_size) != len(layers):
                raise ValueError(
                    f"slice_size is a list of {len(slice_size)} sizes, but {type(self).__name__} has {len(layers)} "
                    "attention layers: give one per layer"
                )
            sizes = slice_size
        elif slice_size is None or (isinstance(slice_size, int) and not isinstance(slice_size, bool)):
            sizes = [slice_size] * len(layers)
        else:
            raise ValueError(f"slice_size={slice_size!r}; allowed: 'auto', 'max', a positive int, a list, or None")
        for size, m in zip(sizes, layers):
            if size is not None:
                check_slice_size(size)
                if size > m.sliceable_head_dim:
                    raise ValueError(f"slice_size={size} must be <= the number of heads ({m.sliceable_head_dim})")
        for size, m in zip(sizes, layers):
            m.set_attention_slice(size)


def _short(items: list[str], n: int = 8) -> str:
    if not items:
        return "none"
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more
