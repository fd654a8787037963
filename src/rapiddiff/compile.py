"""torch.compile that just works: the seed's recipe applied to any pipeline, and the checks that keep it fast.

    pipe = rapiddiff.compile_pipeline(pipe)   # channels_last + torch.compile(mode="reduce-overhead", fullgraph=True)
    images = pipe(prompt, num_inference_steps=steps).images

- Every model compiles as one graph (fullgraph=True) and is compiled in place (`nn.Module.compile`): `pipe.unet` stays
  a UNet2DConditionModel with its config, `.to()` and `save_pretrained`.
- One graph per shape: the loop hands models device tensors of fixed dtypes (timesteps as float32, ControlNet scales
  as tensors), so a new prompt, seed, guidance scale, strength, step count or scheduler never recompiles.
  `dynamic=True` makes height, width and batch symbolic: a new image size reuses the graph (CUDA graphs are still
  recorded per shape, which is cheap).
- CUDA-graph safe: the loop keeps no reference to a model output past the next call and never syncs with the device;
  `forbid_host_syncs` / `forbid_host_syncs_in_loop` check the latter.
- `whole_step=True` compiles model call, guidance and scheduler update of a step as one graph (`WholeStep`).
- CPU weights are frozen into the compiled code by default (inductor `freezing`, `FrozenWeightsCall`): 1.5x-2.3x
  the recipe's speed on an AMX Xeon, stale weights never served.
- Warm start: inductor's FX-graph and AOTAutograd caches are on by default, so a second process compiling the same
  pipeline loads its kernels from disk; `save_compile_cache` / `load_compile_cache` carry them to another machine.
  Frozen CPU graphs are not cached (their weights are oneDNN-packed): `freezing=False` trades speed for a warm start.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx.experimental._config
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .frozen import FrozenWeightsCall, default_freezes
from .pipelines.denoise import DenoisingStep, StepInput, run_step
from .quantization.torchao_quant import TORCHAO_INDUCTOR_OPTIONS, is_torchao_quantized
from .schedulers.scheduling_utils import SchedulerMixin
from .schedulers.step_plan import StepPlan
from .utils.offload import check_compilable, check_whole_step_compilable

logger = logging.getLogger(__name__)

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MEMORY_FORMATS = (None, torch.channels_last, torch.contiguous_format)
# Compiled by default when the pipeline has them. Dotted names reach into a component.
DEFAULT_COMPONENTS = ("unet", "controlnet", "vae.decoder")
# Called once or more per denoising step: the modules CUDA graphs are for. Others (the VAE decoder, called once per
# image on large activations) compile without them: nothing to amortise, and no static output buffer to pin.
DENOISERS = ("unet", "controlnet")
WHOLE_STEP_GRAPHS = 64  # how many graphs (see `WholeStep`) the whole step may compile before it is an error
_WITHOUT_CUDAGRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


# --- the recipe ------------------------------------------------------------------------------------------------------
def compile_pipeline(
    pipe: Any,
    *,
    mode: str | None = "reduce-overhead",
    fullgraph: bool = True,
    memory_format: torch.memory_format | None = torch.channels_last,
    components: Sequence[str] | None = None,
    dynamic: bool | None = False,
    whole_step: bool = False,
    backend: str | Callable[..., Any] = "inductor",
    freezing: bool | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """Apply channels_last and torch.compile in place to the pipeline's models; returns `pipe`.

    components: attribute paths of the modules to compile (default: "unet", "controlnet", "vae.decoder", each where the
        pipeline has it); a name given explicitly must exist.
    mode: torch.compile's mode for the denoisers (unet, controlnet); other modules get its variant without CUDA graphs.
    dynamic: False: one graph per shape. True: height, width and batch symbolic from the first call, so a new image
        size does not recompile (see docs/compile.md for its speed cost). None: torch's default (static, then dynamic
        after the first recompile).
    whole_step: compile each denoising step (model call, guidance, scheduler update) as one graph instead of the
        denoisers alone; see `WholeStep` for the schedulers it supports.
    backend: torch.compile's backend (a name or a callable); "eager" / "aot_eager" check graph capture without
        generating code.
    freezing: inductor's freezing (weights folded into the compiled code as constants, convolution and linear
        weights prepacked for the CPU's kernels; see `FrozenWeightsCall` for how later weight changes are caught).
        None (default): on for modules whose weights are on the CPU and that hold no LoRA layers - 1.5x-2.3x the
        reference recipe's speed on an AMX Xeon (docs/compile.md); off on accelerators until measured there. True:
        on for every module. False: off (the reference recipe). Inductor only; the whole-step graph never freezes.
    options: more inductor options (torch.compile's `options=`, on top of the mode's), e.g. {"conv_1x1_as_mm": True};
        `scripts/compile_levers.py` measures them. Inductor only. A module quantized with torchao (TorchAoConfig)
        also gets the options torchao recommends for its kernels (`TORCHAO_INDUCTOR_OPTIONS`); `options` wins.
    """
    _check_args(mode, memory_format, dynamic, backend)
    if freezing not in (None, True, False):
        raise ValueError(f"freezing={freezing!r}; allowed: None (on for CPU modules), True or False")
    if (freezing or options) and backend != "inductor":
        raise ValueError(f"freezing=True and options= are inductor's; backend={backend!r} takes neither")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict of inductor options, got {options!r}")
    if whole_step and getattr(pipe, "controlnet", None) is not None:
        raise ValueError(
            "whole_step=True does not support ControlNet pipelines: which ControlNets run at a step "
            "(control_guidance_start/end) is host state the step's graph would bake in; use whole_step=False"
        )
    if whole_step:
        check_whole_step_compilable(pipe, DENOISERS)
    for name, module in _targets(pipe, components):
        if getattr(getattr(module, "_compiled_call_impl", None), "quantized_static", False):
            raise ValueError(
                f"compile_pipeline: {name} runs the compiled int8 graph quantize_pipeline installed; compile the "
                "other components by name (components=['vae.decoder'])"
            )
        if memory_format is not None:
            module.to(memory_format=memory_format)
        # With whole_step the denoisers run inside the step's graph: compiling them alone too would only add guards.
        if whole_step and name in DENOISERS:
            continue
        module_mode = mode if name in DENOISERS else _WITHOUT_CUDAGRAPHS.get(mode, mode)
        check_compilable(module)  # sequential CPU offload's hooks cannot run inside a graph
        kwargs = compile_kwargs(backend, module_mode)
        module_options = {**quantized_module_options(module), **(options or {})}
        if backend == "inductor" and (module_options or _freezes(freezing, module)):
            kwargs = inductor_options(module_mode, dynamic, {**module_options, "freezing": _freezes(freezing, module)})
        if kwargs.get("options", {}).get("freezing"):
            module._compiled_call_impl = FrozenWeightsCall(
                module, cpu_only=freezing is None, fullgraph=fullgraph, dynamic=dynamic, **kwargs
            )
        else:
            module.compile(fullgraph=fullgraph, dynamic=dynamic, **kwargs)
        if dynamic:
            module._compiled_call_impl = without_duck_shapes(module._compiled_call_impl)
    if whole_step:
        pipe.step_runner = WholeStep(fullgraph=fullgraph, dynamic=dynamic, **compile_kwargs(backend, mode))
    return pipe


def compile_kwargs(backend: str | Callable[..., Any], mode: str | None) -> dict[str, Any]:
    """torch.compile's backend and mode arguments (a mode is inductor's alone)."""
    return {"backend": backend, "mode": mode} if backend == "inductor" else {"backend": backend}


def without_duck_shapes(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """`compiled`, tracing without duck shaping: by default torch gives equal dynamic sizes one symbol, so a square
    first image would tie height to width and a non-square one would recompile."""

    def call(*args: Any, **kwargs: Any) -> Any:
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return compiled(*args, **kwargs)

    if isinstance(compiled, FrozenWeightsCall):  # keep `module._compiled_call_impl.refresh()` reachable
        call.refresh = compiled.refresh  # type: ignore[attr-defined]
    return call


def _check_args(mode: Any, memory_format: Any, dynamic: Any, backend: Any) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a torch.compile mode; allowed: {', '.join(map(repr, MODES))}")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(
            f"memory_format={memory_format!r}; allowed: torch.channels_last, torch.contiguous_format or None (as is)"
        )
    if dynamic not in (True, False, None):
        raise ValueError(f"dynamic={dynamic!r}; allowed: True, False or None")
    if not (isinstance(backend, str) or callable(backend)):
        raise TypeError(f"backend must be a torch.compile backend (a name or a callable), got {backend!r}")


def _targets(pipe: Any, components: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """(name, module) for each component to compile; the defaults are skipped where the pipeline lacks them."""
    if isinstance(components, str) or (components is not None and not all(isinstance(c, str) for c in components)):
        raise TypeError(
            f"components must be a list of attribute names such as ['unet', 'vae.decoder'], got {components!r}"
        )
    names = DEFAULT_COMPONENTS if components is None else tuple(components)
    targets = []
    for name in names:
        module = _resolve(pipe, name)
        if module is None and components is None:
            continue
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"components: {type(pipe).__name__} has no torch module {name!r} (found {type(module).__name__}); "
                f"its components are {list(getattr(pipe, 'components', {}))}"
            )
        targets.append((name, module))
    return targets


def _resolve(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


# --- frozen weights --------------------------------------------------------------------------------------------------
def quantized_module_options(module: nn.Module) -> dict[str, Any]:
    """The inductor options torchao recommends for its kernels, for a module holding torchao weights (torchao sets
    them process-wide when it quantizes; here they travel with the module's compile)."""
    return dict(TORCHAO_INDUCTOR_OPTIONS) if is_torchao_quantized(module) else {}


def _freezes(freezing: bool | None, module: nn.Module) -> bool:
    if freezing is None:
        return default_freezes(module)
    return freezing


def inductor_options(mode: str | None, dynamic: bool | None, options: dict[str, Any]) -> dict[str, Any]:
    """torch.compile arguments for inductor with `options` on top of `mode`'s (torch takes one or the other)."""
    base = torch._inductor.list_mode_options(mode, dynamic) if mode not in (None, "default") else {}
    return {"backend": "inductor", "options": {**base, **options}}


# --- whole step ------------------------------------------------------------------------------------------------------
class WholeStep:
    """A `denoise` step runner that compiles model call, guidance and scheduler update as one graph.

    Per step, on the host: the scheduler's `plan_step` (position in the schedule, per-step coefficients, noise drawn
    with the call's generator, as the eager step draws it), one compiled call, `commit_plan`. The graph takes the
    plan's tensors as inputs, so every step of a loop and every later call with the same shapes, scheduler class and
    guidance scale run one graph. The guidance scale is a constant of the graph: a new value compiles anew (kept:
    going back to an earlier value is free). Schedulers: every rapiddiff scheduler (plan / apply / commit), PNDM
    with skip_prk_steps=True.
    """

    def __init__(self, *, fullgraph: bool = True, dynamic: bool | None = False, **compile_kwargs: Any):
        compiled = torch.compile(_whole_step, fullgraph=fullgraph, dynamic=dynamic, **compile_kwargs)
        self._compiled = without_duck_shapes(compiled) if dynamic else compiled

    def __call__(self, step: DenoisingStep, x: StepInput) -> torch.Tensor:
        scheduler = step.scheduler
        if not isinstance(scheduler, SchedulerMixin):
            raise TypeError(
                f"whole_step=True needs one of rapiddiff's schedulers (PNDM with skip_prk_steps=True), "
                f"got {type(scheduler).__name__}"
            )
        plan = scheduler.plan_step(x.t, x.latents, **step.step_kwargs).to(x.latents.device)
        # one graph per scheduler class, step options, guidance scale and shape: more than torch's default 8
        with torch._dynamo.config.patch(recompile_limit=WHOLE_STEP_GRAPHS):
            latents, stored = self._compiled(step, plan, x)
        # With CUDA graphs the outputs live in buffers the graph's next run overwrites: keep copies, contiguous
        # (a channels_last model returns channels_last) so that the next step's inputs have the strides of this one's.
        scheduler.commit_plan(plan, tuple(_copy(s) for s in stored))
        return step.finish(_copy(latents), x)


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone(memory_format=torch.contiguous_format)


def _whole_step(step: DenoisingStep, plan: StepPlan, x: StepInput) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """What the graph holds: the model's prediction (guidance included) and the scheduler's update. The model input is
    scaled by the plan's `model_input_scale`, a graph input (the eager step's `scale_model_input` reads the step index,
    a Python int that would be a constant of the graph)."""
    noise_pred = step.predict(x, plan.scale_model_input)
    update = step.scheduler.apply_plan(noise_pred, x.latents, plan)
    return update.prev_sample, update.stored


# --- host syncs ------------------------------------------------------------------------------------------------------
class HostSyncError(RuntimeError):
    """A tensor's value was read on the host inside `forbid_host_syncs`: a device sync on an accelerator."""


aten = torch.ops.aten
# Ops whose result the host must see before it can go on: each waits for the device.
_VALUE_READS = {
    aten._local_scalar_dense: ".item(), float(), int() or bool() of a tensor (a Python branch on a tensor value)",
    aten.nonzero: "nonzero (output size depends on the values)",
    aten.masked_select: "masked_select (output size depends on the values)",
    aten.unique_dim: "unique",
    aten._unique2: "unique",
    aten.unique_consecutive: "unique_consecutive",
    aten.repeat_interleave: "repeat_interleave with tensor repeats",
    aten.equal: "torch.equal (a Python bool from tensor values)",
}
_INDEXING = (aten.index, aten.index_put, aten.index_put_)


def host_read(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why running aten `func` on these arguments reads tensor values on the host; None if it does not."""
    packet = func.overloadpacket
    if packet in _VALUE_READS:
        return _VALUE_READS[packet]
    if packet in _INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "boolean-mask indexing (output size depends on the mask)"
    if packet in (aten._to_copy, aten.copy_):
        src = args[1] if packet is aten.copy_ else args[0]
        dst = args[0].device if packet is aten.copy_ else kwargs.get("device") or src.device
        if isinstance(src, torch.Tensor) and src.device.type != "cpu" and torch.device(dst).type == "cpu":
            return "a copy from the device to the host (.cpu(), .numpy(), .tolist())"
    return None


class _RejectHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        reason = host_read(func, args, kwargs)
        if reason is not None:
            raise HostSyncError(f"host sync inside forbid_host_syncs(): {reason} [{func}]")
        return func(*args, **kwargs)


@contextlib.contextmanager
def forbid_host_syncs(device: str | torch.device | None = None) -> Iterator[None]:
    """Inside this block any read of a tensor's value by the host is an error.

    CUDA `device`: `torch.cuda.set_sync_debug_mode("error")`: every real synchronisation raises, compiled code included.
    Any other device (the CPU in tests): a dispatch mode raises HostSyncError on the ops that read values - `.item()`,
    `float()`/`bool()` of a tensor, nonzero, boolean masks, unique, device-to-host copies. It sees eager ops: a
    torch.compile'd function with fullgraph=True refuses to run under it, and `.tolist()` / `.numpy()` of a CPU tensor
    dispatch no op at all (on an accelerator they are copies to the host, and caught).
    """
    if device is not None and torch.device(device).type == "cuda":
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(before)
    else:
        with _RejectHostReads():
            yield


@contextlib.contextmanager
def forbid_host_syncs_in_loop(pipe: Any) -> Iterator[Any]:
    """Run every denoising step of `pipe` (model, guidance, scheduler) under `forbid_host_syncs(pipe.device)`.

    Prompt encoding, VAE decoding and step-end callbacks stay free to read values. Yields the pipeline.
    """
    inner, device = pipe.step_runner or run_step, pipe.device

    def guarded(step: DenoisingStep, x: StepInput) -> torch.Tensor:
        with forbid_host_syncs(device):
            return inner(step, x)

    before = pipe.step_runner
    pipe.step_runner = guarded
    try:
        yield pipe
    finally:
        pipe.step_runner = before


# --- warm start ------------------------------------------------------------------------------------------------------
def save_compile_cache(path: str | os.PathLike) -> Path:
    """Write the compiled artifacts of this process (inductor kernels, AOTAutograd graphs) to one file.

    Another process - or machine with the same GPU and software - calls `load_compile_cache(path)` before its first
    compiled call and skips code generation. Raises RuntimeError if nothing was compiled yet.
    """
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        raise RuntimeError(
            "save_compile_cache: no cacheable compiled code in this process: nothing was compiled yet (run the "
            "pipeline once first), or only frozen graphs, which inductor does not cache on a CPU (their weights are "
            "packed for oneDNN): compile_pipeline(pipe, freezing=False) for a cache to carry"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(artifacts[0])
    return path


def load_compile_cache(path: str | os.PathLike) -> None:
    """Load what `save_compile_cache` wrote into this process's compile caches (call before the first compile)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_compile_cache: no cache file at {path}")
    if torch.compiler.load_cache_artifacts(path.read_bytes()) is None:
        raise ValueError(f"load_compile_cache: {path} holds no compile artifacts this torch version can read")
