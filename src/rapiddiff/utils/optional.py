"""Optional dependencies: their absence is a clear ImportError saying what to install; any other error (an import
failing inside the package, a missing dependency of its own) surfaces as it is."""

from __future__ import annotations

import importlib
from types import ModuleType


def import_optional(name: str, install: str) -> ModuleType:
    """Import `name` (e.g. "scipy.stats"); if its package is not installed, ImportError(`install`)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != name.split(".")[0]:
            raise
        raise ImportError(install) from None
