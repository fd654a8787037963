"""The two backends benchmarked side by side: the same Diffusers API, resolved from `rapiddiff` or from `diffusers`.

diffusers is optional and imported only here, only when the diffusers backend is chosen.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType
from typing import Any

BACKENDS = ("rapiddiff", "diffusers")
OPTIONAL = "diffusers"  # the test extra's; rapiddiff never needs it


class Unavailable(Exception):
    """A backend, or one of its classes, that this install does not have; recorded in the cell, never fatal."""

    def __init__(self, summary: str, detail: str = "") -> None:
        super().__init__(f"{summary} ({detail})" if detail else summary)
        self.summary = summary  # short, for the report's table


class Backend:
    """One library that provides the pipelines, models and schedulers by their Diffusers names."""

    def __init__(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend={name!r} is not known; allowed: {', '.join(BACKENDS)}")
        self.name = name
        self._module: ModuleType | None = None

    @property
    def module(self) -> ModuleType:
        if self._module is None:
            try:
                self._module = importlib.import_module(self.name)
            except ModuleNotFoundError as e:
                # only the optional package itself may be missing; anything else is a broken install
                if self.name != OPTIONAL or e.name != OPTIONAL:
                    raise
                raise Unavailable(f"{OPTIONAL} is not installed (pip install diffusers==0.42.1)") from e
        return self._module

    @property
    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.name)
        except importlib.metadata.PackageNotFoundError:
            return None

    def get(self, name: str) -> Any:
        """The class (or function) `name`; Unavailable when this backend does not have it."""
        try:
            return getattr(self.module, name)
        except AttributeError as e:
            raise Unavailable(f"not available in {self.name}: {name}") from e

    def has(self, name: str) -> bool:
        try:
            self.get(name)
        except Unavailable:
            return False
        return True

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"
