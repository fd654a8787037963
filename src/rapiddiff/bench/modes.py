"""Modes: how the denoisers (UNet, ControlNet) run. A mode changes a pipeline and returns the function that undoes it.

A new mode is one function here and one entry in MODES.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .backends import Backend

if TYPE_CHECKING:
    from .workloads import Figure

Undo = Callable[[], None]


def eager_sdpa(pipe: Any, figure: Figure, backend: Backend) -> Undo:
    """Both backends' default on PyTorch 2: scaled_dot_product_attention processors, no compile."""
    return lambda: None


def eager_vanilla(pipe: Any, figure: Figure, backend: Backend) -> Undo:
    """The vanilla (matmul + softmax) processors: `set_default_attn_processor()`, as the reference page shows."""
    modules = [getattr(pipe, name) for name in figure.denoisers]
    saved = [m.attn_processors for m in modules]
    for m in modules:
        m.set_default_attn_processor()

    def undo() -> None:
        for m, processors in zip(modules, saved):
            m.set_attn_processor(processors)

    return undo


def compiled(pipe: Any, figure: Figure, backend: Backend) -> Undo:
    """Diffusers' recipe (the reference page's): the denoisers through torch.compile(**REFERENCE_COMPILE).

    rapiddiff uses its own `compile_pipeline` with its defaults (compiled in place), on the same modules as Diffusers'
    recipe (the denoisers: its default would add the VAE decoder, which runs outside the timed loop and would only
    lengthen the first call); a backend without `compile_pipeline` gets Diffusers' recipe. A module compiled in place
    stays compiled, which is why Settings runs this mode last; the undo drops the compiled graphs, so the next cell
    compiles afresh and its first call's time is its compile time.
    """
    originals = {name: getattr(pipe, name) for name in figure.denoisers}
    if backend.has("compile_pipeline"):
        backend.get("compile_pipeline")(pipe, components=figure.denoisers)
    else:
        for name, module in originals.items():
            setattr(pipe, name, torch.compile(module, mode="reduce-overhead", fullgraph=True))

    def undo() -> None:
        for name, module in originals.items():
            setattr(pipe, name, module)
        torch._dynamo.reset()

    return undo


MODES: dict[str, Callable[[Any, Figure, Backend], Undo]] = {
    "eager-sdpa": eager_sdpa,
    "eager-vanilla": eager_vanilla,
    "compiled": compiled,
}
