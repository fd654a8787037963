"""Config dataclasses parsed from Diffusers' `config.json` / `scheduler_config.json`.

Every model and scheduler declares a frozen dataclass whose fields are exactly the Diffusers keys it implements.
Parsing is strict: a key that is neither a field nor in `IGNORED_KEYS` raises `ConfigError` naming it. A config is also
a read-only mapping, so `dict(unet.config)`, `config["in_channels"]` and `Cls.from_config(other.config)` work as in
Diffusers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
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


class ConfigError(ValueError):
    """A config that rapiddiff cannot honour: the message names the file or key and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Config(Mapping):
    """Base of every config: a frozen dataclass that also reads as a mapping."""

    # Keys that used to mean something in old Diffusers configs and are renamed on load: {old: new}.
    _renamed: ClassVar[dict[str, str]] = {}

    # Mapping interface over the dataclass fields, plus `_class_name` (the owner class) as Diffusers' configs have.
    def __getitem__(self, key: str) -> Any:
        if key == "_class_name" and self.class_name is not None:
            return self.class_name
        if key not in self._field_names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        if self.class_name is not None:
            yield "_class_name"
        yield from self._field_names()

    def __len__(self) -> int:
        return len(self._field_names()) + (self.class_name is not None)

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
        try:
            return cls(**kwargs)
        except TypeError as e:  # e.g. a required field missing
            raise ConfigError(f"{source}: {e}") from e

    def replace(self: C, **changes: Any) -> C:
        new = dataclasses.replace(self, **{k: _freeze(v) for k, v in changes.items()})
        return new.with_owner(self.class_name) if self.class_name else new

    def to_dict(self) -> dict[str, Any]:
        return {k: _thaw(getattr(self, k)) for k in self._field_names()}

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


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def per_block(value: Any, n: int, name: str) -> tuple:
    """Expand an int-or-list config value to one entry per block; a list of the wrong length is an error."""
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ConfigError(f"{name} has {len(value)} entries, the model has {n} blocks: {value!r}")
        return tuple(value)
    return (value,) * n


class ConfigMixin:
    """Config loading and saving shared by models and schedulers."""

    config_class: ClassVar[type[Config]]
    config_name: ClassVar[str] = "config.json"
    config: Config

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

    def save_config(self, save_directory: str | os.PathLike) -> Path:
        from . import DIFFUSERS_VERSION, __version__

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
