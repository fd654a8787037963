"""Modes: how the denoisers (UNet, ControlNet) run. A mode changes a pipeline and returns the function that undoes it.

A new mode is one function here and one entry in MODES.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .backends import Backend, Unavailable

if TYPE_CHECKING:
    from .workloads import Figure

Undo = Callable[[], None]

# Diffusers' recipe for the compiled column: torch.compile's arguments for each denoiser
REFERENCE_COMPILE: dict[str, Any] = {"mode": "reduce-overhead", "fullgraph": True}
# inductor's global options the report states (both backends compile under them)
INDUCTOR_OPTIONS = ("freezing", "max_autotune", "coordinate_descent_tuning", "cpp_wrapper", "layout_optimization",
                    "conv_1x1_as_mm", "epilogue_fusion", "fx_graph_cache", "triton.cudagraphs")  # fmt: skip


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
            setattr(pipe, name, torch.compile(module, **REFERENCE_COMPILE))

    def undo() -> None:
        for name, module in originals.items():
            setattr(pipe, name, module)
        torch._dynamo.reset()

    return undo


# The cached mode: DeepCache's published setting, on the figures it runs for (SD txt2img: DeepCache's own workload)
CACHE_PARAMS = {"cache_interval": 3, "cache_branch_id": 0}
CACHED_FIGURES = ("sd_txt2img",)


def cached(pipe: Any, figure: Figure, backend: Backend) -> Undo:
    """DeepCache (interval 3, branch 0). rapiddiff: `compile_pipeline` (as the compiled mode) plus
    `unet.enable_cache`: one graph for full steps and one for shallow steps. Diffusers: DeepCache 0.1.1's helper,
    eager (it swaps module forwards and reads the timestep on the host: it cannot run compiled); the compiled mode's
    Diffusers cell is the recipe to compare with."""
    if backend.has("DeepCacheConfig"):
        undo_compile = compiled(pipe, figure, backend)
        pipe.unet.enable_cache(backend.get("DeepCacheConfig")(**CACHE_PARAMS))

        def undo() -> None:
            pipe.unet.disable_cache()
            undo_compile()

        return undo
    try:
        from DeepCache import DeepCacheSDHelper
    except ModuleNotFoundError as e:
        raise Unavailable("DeepCache is not installed (pip install DeepCache==0.1.1 --no-deps)") from e
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(**CACHE_PARAMS)
    helper.enable()
    return helper.disable


def compiled_bf16(pipe: Any, figure: Figure, backend: Backend) -> Undo:
    """The compiled column in bfloat16: the pipeline's models cast to bfloat16 (as `torch_dtype=torch.bfloat16`
    loads them), then compiled as in `compiled`. The CPU preset has this column where the CPU computes bf16 natively
    (`rapiddiff.quantization.cpu.cpu_precisions`). The undo casts back to the dtype the models had."""
    dtype = next(getattr(pipe, figure.denoisers[0]).parameters()).dtype
    pipe.to(dtype=torch.bfloat16)
    undo_compiled = compiled(pipe, figure, backend)

    def undo() -> None:
        undo_compiled()
        pipe.to(dtype=dtype)

    return undo


def is_compiled_mode(mode: str) -> bool:
    """Modes that compile the denoisers (compiled batch sizes apply; `GRAPHS_PER_CELL` says how many compiles)."""
    return mode in GRAPHS_PER_CELL


# Compiles per cell, per figure: one per backend; the cached mode's rapiddiff two (full and shallow steps) and none
# for Diffusers + DeepCache (eager).
GRAPHS_PER_CELL = {"compiled": "backends", "compiled-bf16": "backends", "cached": 2}


def compile_recipes(backends: Sequence[str]) -> dict[str, Any]:
    """What the compiled column runs, read now (not restated): per backend the call and its arguments (rapiddiff:
    `compile_pipeline`'s signature defaults, freezing included), the options the torch.compile mode adds, and
    inductor's global options that both compile under."""
    recipes: dict[str, Any] = {}
    for name in backends:
        backend = Backend(name)
        if backend.has("compile_pipeline"):
            function = backend.get("compile_pipeline")
            defaults = {
                k: _plain(p.default)
                for k, p in inspect.signature(function).parameters.items()
                if p.default is not inspect.Parameter.empty and k != "components"
            }
            call = f"{name}.compile_pipeline(pipe, components=<the denoisers>)"
            recipes[name] = {"call": call, "arguments": defaults}
        else:
            call = (
                "torch.compile(<each denoiser>, " + ", ".join(f"{k}={v!r}" for k, v in REFERENCE_COMPILE.items()) + ")"
            )
            recipes[name] = {"call": call, "arguments": dict(REFERENCE_COMPILE)}
        mode = recipes[name]["arguments"].get("mode")
        recipes[name]["mode_options"] = {k: _plain(v) for k, v in torch._inductor.list_mode_options(mode).items()}
    config = torch._inductor.config
    inductor = {key: _plain(functools.reduce(getattr, key.split("."), config)) for key in INDUCTOR_OPTIONS}
    return {"backends": recipes, "inductor_config": inductor}


def _plain(value: Any) -> Any:
    """JSON's own types as they are; anything else (torch.channels_last, a callable) as its text."""
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


MODES: dict[str, Callable[[Any, Figure, Backend], Undo]] = {
    "eager-sdpa": eager_sdpa,
    "eager-vanilla": eager_vanilla,
    "compiled": compiled,
    "compiled-bf16": compiled_bf16,
    "cached": cached,  # last: it compiles rapiddiff's pipeline in place too
}
