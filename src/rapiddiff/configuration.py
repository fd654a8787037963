"""Config dataclasses parsed from Diffusers' `config.json` / `scheduler_config.json`.

Every model and scheduler declares a frozen dataclass whose fields are exactly the Diffusers keys it implements.
Parsing is strict: a key that is neither a field nor in `IGNORED_KEYS` raises `ConfigError` naming it. A config is also
a read-only mapping, so `dict(unet.config)`, `config["in_channels"]` and `Cls.from_config(other.config)` work as in
Diffusers.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .hub import resolve_file

# Keys that Diffusers writes but that do not change inference. Ignored on purpose, here and nowhere else.
IGNORED_KEYS = frozenset(
    {
        "_class_name",
        "_diffusers_version",
        "_name_or_path",
        "_use_default_values",
        "_commit_hash",
        "dropout",  # inference runs in eval mode
        "attention_type",  # only "default" exists for the SD/IF UNets (checked where it matters)
        "use_memory_efficient_attention",
        "sample_size_is_deprecated",
    }
)

C = TypeVar("C", bound="Config")

# Range of the size-like keys shared by the model configs (UNet, ControlNet, VAE): {key: smallest allowed value}.
MODEL_MINIMUMS: dict[str, float] = {
    **dict.fromkeys(
        (
            "in_channels",
            "out_channels",
            "latent_channels",
            "conditioning_channels",
            "block_out_channels",
            "conditioning_embedding_out_channels",
            "layers_per_block",
            "transformer_layers_per_block",
            "reverse_transformer_layers_per_block",
            "norm_num_groups",
            "cross_attention_dim",
            "attention_head_dim",
            "num_attention_heads",
            "addition_embed_type_num_heads",
            "encoder_hid_dim",
            "num_class_embeds",
            "time_embedding_dim",
            "conv_in_kernel",
            "conv_out_kernel",
            "sample_size",
        ),
        1,
    ),
    "downsample_padding": 0,
    "norm_eps": 0,
    "scaling_factor": 0,
}


class ConfigError(ValueError):
    """A config that rapiddiff cannot honour: the message names the file or key and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Config(Mapping):
    """Base of every config: a frozen dataclass that also reads as a mapping."""

    # Keys that used to mean something in old Diffusers configs and are renamed on load: {old: new}.
    _renamed: ClassVar[dict[str, str]] = {}
    # Smallest allowed value of numeric keys (every number of a per-block tuple too): {key: minimum}.
    _minimums: ClassVar[dict[str, float]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Runs before the subclass's @dataclass decorator, which then keeps this __eq__ instead of generating one.
        cls.__eq__ = Config.__eq__  # type: ignore[method-assign]

    def __eq__(self, other: object) -> bool:
        """Equal to any mapping with the same keys and values, as Diffusers' FrozenDict is to a dict (a list and a
        tuple of the same values are equal: JSON gives lists where a config holds tuples)."""
        if not isinstance(other, Mapping):
            return NotImplemented
        return _thaw(dict(self)) == _thaw(dict(other))

    # Mapping interface over the dataclass fields, plus `_class_name` (the owner class) as Diffusers' configs have,
    # and the hidden keys.
    def __getitem__(self, key: str) -> Any:
        if key == "_class_name" and self.class_name is not None:
            return self.class_name
        if key in self.hidden:
            return self.hidden[key]
        if key not in self._field_names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        yield from self._own_keys()
        yield from self.hidden

    def _own_keys(self) -> Iterator[str]:
        if self.class_name is not None:
            yield "_class_name"
        yield from self._field_names()

    def __len__(self) -> int:
        return len(self._field_names()) + (self.class_name is not None) + len(self.hidden)

    @property
    def hidden(self) -> dict[str, Any]:
        """Keys kept with the config that are not fields: those `register_to_config` added, and a scheduler's keys of
        other schedulers. Read as keys and attributes, and saved; the model or scheduler does not use them."""
        return self.__dict__.get("_hidden", {})

    def with_hidden(self: C, hidden: Mapping[str, Any]) -> C:
        object.__setattr__(self, "_hidden", dict(hidden))
        return self

    def __getattr__(self, name: str) -> Any:  # only called for names that are not fields
        hidden = self.__dict__.get("_hidden", {})
        if name in hidden:
            return hidden[name]
        raise AttributeError(f"{type(self).__name__} has no key {name!r}")

    @property
    def class_name(self) -> str | None:
        return self.__dict__.get("_owner")

    def with_owner(self: C, owner: str) -> C:
        object.__setattr__(self, "_owner", owner)
        return self

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any], *, strict: bool = True, source: str = "config") -> C:
        """Parse a Diffusers config dict.

        strict=True: an unknown key is an error naming it. strict=False: keys of another class's config are dropped
        (used when swapping schedulers: `Euler.from_config(pndm.config)`).
        """
        names = set(cls._field_names())
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in values.items():
            key = cls._renamed.get(key, key)
            if key in names:
                kwargs[key] = _freeze(value)
            elif key in IGNORED_KEYS or key.startswith("_"):
                continue
            else:
                unknown.append(key)
        if unknown and strict:
            shown = ", ".join(f"{k}={values[k]!r}" for k in unknown)
            raise ConfigError(
                f"{source}: key(s) not supported by rapiddiff's {cls.__name__}: {shown}. "
                f"Supported keys: {', '.join(sorted(names))}."
            )
        cls.check_values(kwargs, source)
        try:
            return cls(**kwargs)
        except TypeError as e:  # e.g. a required field missing
            raise ConfigError(f"{source}: {e}") from e
        except ConfigError as e:  # a __post_init__ check: say which file it came from
            raise ConfigError(f"{source}: {e}") from e

    @classmethod
    def check_values(cls, values: Mapping[str, Any], source: str) -> None:
        """Every value against its field's annotation and `_minimums`, before any model code sees it."""
        hints = _field_types(cls)
        for key, value in values.items():
            expected = hints.get(key, Any)
            if not _fits(value, expected):
                raise ConfigError(
                    f"{source}: {key}={value!r} has the wrong type; {cls.__name__} expects {_type_name(expected)}"
                )
            low = cls._minimums.get(key)
            if low is not None:
                bad = [v for v in _numbers(value) if not math.isfinite(v) or v < low]
                if bad:
                    raise ConfigError(f"{source}: {key}={value!r} is out of range; each value must be >= {low}")
            else:
                bad = [v for v in _numbers(value) if isinstance(v, float) and math.isnan(v)]
                if bad:
                    raise ConfigError(f"{source}: {key}={value!r}: NaN is not a valid config value")

    def replace(self: C, **changes: Any) -> C:
        frozen = {k: _freeze(v) for k, v in changes.items()}
        self.check_values(frozen, f"{type(self).__name__}.replace")
        new = dataclasses.replace(self, **frozen).with_hidden(self.hidden)
        return new.with_owner(self.class_name) if self.class_name else new

    def to_dict(self) -> dict[str, Any]:
        return {**self.hidden, **{k: _thaw(getattr(self, k)) for k in self._field_names()}}

    def check_choice(self, key: str, allowed: tuple[Any, ...]) -> None:
        """Raise ConfigError unless self.<key> is one of `allowed` (for __post_init__ validation)."""
        value = getattr(self, key)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if v not in allowed:
                raise ConfigError(
                    f"{type(self).__name__}: {key}={v!r} is not supported by rapiddiff; allowed: "
                    f"{', '.join(repr(a) for a in allowed)}."
                )


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the modules use `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a (frozen) JSON value fits a field annotation: int, float, bool, str, None, unions, tuple[X, ...]."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON writes 1.0 as 1
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(args) == len(value) and all(_fits(v, h) for v, h in zip(value, args, strict=True))
    if origin is not None:  # dict[...] and the like: checked by the owner
        return isinstance(value, origin)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if hint is type(None) or hint is None:
        return "null"
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return {"int": "an int", "float": "a number", "bool": "true/false", "str": "a string"}.get(
            hint.__name__, hint.__name__
        )
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_type_name(args[0])})"
        return f"a list of {len(args)} values"
    return str(hint)


def _numbers(value: Any) -> list[float]:
    if isinstance(value, tuple):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _freeze(value: Any) -> Any:
    if hasattr(value, "tolist"):  # a numpy array or torch tensor (e.g. trained_betas), as Diffusers accepts
        value = value.tolist()
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (tuple, list)):
        return [_thaw(v) for v in value]
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    return value


def per_block(value: Any, n: int, name: str) -> tuple:
    """Expand an int-or-list config value to one entry per block; a list of the wrong length is an error."""
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ConfigError(f"{name} has {len(value)} entries, the model has {n} blocks: {value!r}")
        return tuple(value)
    return (value,) * n


def with_config_signature(init: Callable[..., None], config_class: type[Config]) -> Callable[..., None]:
    """`init` (which takes the config as keywords) with a signature naming each config key and its default, as
    Diffusers' constructors have: `inspect.signature`, IDEs and tools that read it see the real arguments (an unknown
    key is still refused by the config's parsing)."""

    @functools.wraps(init)
    def __init__(self: Any, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        init(self, config, **kwargs)

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params.append(inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None))
    for field in dataclasses.fields(config_class):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = inspect.Parameter.empty
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default))
    __init__.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return __init__


class ConfigMixin:
    """Config loading and saving shared by models and schedulers."""

    config_class: ClassVar[type[Config]]
    config_name: ClassVar[str] = "config.json"
    config: Config

    # The variable Diffusers' deprecation message names in its example (`unet.config.x`, `scheduler.config.x`).
    _config_example: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A class declaring its config (constructed as `Cls(config)` or `Cls(**keys)`) shows its keys as arguments.
        if "config_class" in cls.__dict__:
            cls.__init__ = with_config_signature(cls.__init__, cls.config_class)  # type: ignore[method-assign]

    @classmethod
    def load_config(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        **hub_kwargs: Any,
    ) -> dict[str, Any]:
        path = resolve_file(pretrained_model_name_or_path, cls.config_name, subfolder=subfolder, **hub_kwargs)
        return read_json(path)

    @classmethod
    def _parse_config(cls, config: Mapping[str, Any] | None, overrides: Mapping[str, Any], source: str) -> Config:
        config = dict(config or {})
        name = config.get("_class_name")
        strict = name is None or name == cls.__name__
        if not strict and not cls._accepts_config_of(name):
            raise ConfigError(f"{source}: is a config for {name!r}, not for {cls.__name__}")
        parsed = cls.config_class.from_dict({**config, **overrides}, strict=strict, source=source)
        return parsed.with_owner(cls.__name__)

    @classmethod
    def _accepts_config_of(cls, class_name: str) -> bool:
        """Whether a config written for `class_name` may be used (foreign keys dropped). Schedulers say yes."""
        return False

    def register_to_config(self, **values: Any) -> None:
        """Diffusers' ConfigMixin method: set config values after construction. A key of this class's config is
        checked and replaced (what `__init__` built from it stays as it is, as in Diffusers); any other key is kept
        with the config as a hidden key (`config.key`, `config["key"]`, saved with `save_pretrained`; a config file
        with a key rapiddiff does not know is still refused on load)."""
        fields = set(self.config_class._field_names())
        config = self.config.replace(**{k: v for k, v in values.items() if k in fields})
        extra = {k: v for k, v in values.items() if k not in fields}
        self.config = config.with_hidden({**config.hidden, **extra})

    def _config_attribute(self, name: str) -> Any:
        """Diffusers' deprecated read of a config key as an attribute (`obj.key`): the value, with a FutureWarning;
        for a name that is no key, the AttributeError Python gives."""
        config = self.__dict__.get("config")
        if config is not None and not name.startswith("_") and name in config:
            warnings.warn(
                f"Accessing config attribute `{name}` directly via '{type(self).__name__}' object attribute is "
                f"deprecated. Please access '{name}' over '{type(self).__name__}'s config object instead, e.g. "
                f"'{self._config_example}.config.{name}'.",
                FutureWarning,
                stacklevel=3,
            )
            return config[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def save_config(self, save_directory: str | os.PathLike) -> Path:
        from .exports import DIFFUSERS_VERSION, __version__

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {
            "_class_name": type(self).__name__,
            "_diffusers_version": DIFFUSERS_VERSION,
            "_rapiddiff_version": __version__,
        }
        data.update(self.config.to_dict())
        path = directory / self.config_name
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
