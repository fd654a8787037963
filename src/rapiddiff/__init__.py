"""rapiddiff: Diffusers-compatible diffusion pipelines, fast on PyTorch 2.

Switch from Diffusers by changing one import: `from rapiddiff import StableDiffusionPipeline`.
Names are imported lazily, so `import rapiddiff` stays cheap.
"""

from __future__ import annotations

from typing import Any

from .exports import DIFFUSERS_VERSION as DIFFUSERS_VERSION
from .exports import EXPORTS, export
from .exports import __version__ as __version__

_EXPORTS = EXPORTS  # public name -> submodule that defines it

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module 'rapiddiff' has no attribute {name!r}")
    value = export(name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
