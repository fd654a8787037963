"""BaseOutput: the outputs of models, schedulers and pipelines, dict-like as Diffusers' are."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import torch.utils._pytree as pytree


class BaseOutput(OrderedDict):
    """A dataclass that is also an ordered dict of its fields that are not None, as Diffusers' `BaseOutput`.

    `out.sample`, `out["sample"]`, `out[0]`, `out.keys()`, `out.values()`, `out.to_tuple()` all work; None fields are
    skipped by the dict view (`out[1]` is an IndexError when the second field is None). Iterating gives the keys, as
    for any dict: unpack `out.to_tuple()`. Subclasses are `@dataclasses.dataclass`es; they are pytree nodes, so that
    they pass through torch's tree utilities (DistributedDataParallel) as Diffusers' do.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls,
            lambda out: (list(out.values()), list(out.keys())),
            lambda values, keys: cls(**dict(zip(keys, values))),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        )

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                super().__setitem__(field.name, value)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __setattr__(self, name: str, value: Any) -> None:
        # Setting a key's field updates the dict view (a field that was None stays out of it, as in Diffusers).
        if value is not None and name in self.keys():
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"a {type(self).__name__} cannot be changed with dict methods; set its fields instead")

    __delitem__ = setdefault = pop = popitem = update = clear = _refuse  # type: ignore[assignment]

    def to_tuple(self) -> tuple[Any, ...]:
        """The values that are not None, in field order."""
        return tuple(self[k] for k in self.keys())

    def __reduce__(self) -> Any:
        # A dataclass pickles by its fields (OrderedDict's own reduce would call __init__ without them).
        return type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self))
