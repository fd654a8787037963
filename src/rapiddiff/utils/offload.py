"""Model CPU offload hooks that stay outside torch.compile's graphs.

A `ModelOffloadHook` moves a whole model (and the tensors it is called with) to the accelerator when it is called,
first sending the previous model of the chain back to the CPU - Diffusers' `enable_model_cpu_offload` behaviour
(accelerate's `cpu_offload_with_hook`). Accelerate wraps `forward`, which puts `module.to(device)` inside the graph a
compiled module traces (a fullgraph compile then fails). This hook wraps the module's *call* instead
(`_compiled_call_impl`, the slot `nn.Module.__call__` dispatches to), so the move runs in Python before the compiled
code: compile before or after enabling offload, both work (`ModelMixin.compile` keeps the hook outermost).

Sequential offload (every submodule onloaded around its own forward) is accelerate's `cpu_offload`, as in Diffusers;
its hooks sit inside each submodule's forward, so a model offloaded that way does not compile (`check_compilable`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .concurrency import check_idle

HOOK_ATTR = "_rapiddiff_offload_hook"


def send_to_device(obj: Any, device: torch.device) -> Any:
    """Tensors in obj (nested tuples, lists, dicts) moved to `device`; everything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(send_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: send_to_device(v, device) for k, v in obj.items()}
    return obj


class ModelOffloadHook:
    """Onloads `module` to `device` when it is called (after offloading `prev`, the model called before it in the
    pipeline's chain); `offload()` sends it back to the CPU. Diffusers' `UserCpuOffloadHook` interface: `offload()`,
    `remove()`, `model`."""

    def __init__(self, module: nn.Module, device: torch.device, prev: ModelOffloadHook | None = None):
        self.model = module
        self.device = device
        self.prev = prev
        self.onloaded = False
        self.removed = False
        self._inner: Callable[..., Any] | None = None

    def attach(self) -> ModelOffloadHook:
        module = self.model
        existing = module.__dict__.get(HOOK_ATTR)
        if existing is not None:
            existing.remove()
        self._inner = module._compiled_call_impl  # a compiled call, or None (then the plain `_call_impl`)
        module._compiled_call_impl = self._call
        module.__dict__[HOOK_ATTR] = self
        return self

    def rewrap(self) -> None:
        """After `module.compile()` replaced the call slot: wrap the new compiled call."""
        module = self.model
        if module._compiled_call_impl != self._call:
            self._inner = module._compiled_call_impl
            module._compiled_call_impl = self._call

    def remove(self) -> None:
        module = self.model
        self.removed = True  # if another wrapper now sits on top of ours (dynamic-shape compile), it passes through
        if module._compiled_call_impl == self._call:
            module._compiled_call_impl = self._inner
        if module.__dict__.get(HOOK_ATTR) is self:
            del module.__dict__[HOOK_ATTR]

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        inner = self._inner if self._inner is not None else self.model._call_impl
        if self.removed or torch.compiler.is_compiling():  # traced from outside: device moves are host work
            return inner(*args, **kwargs)
        self.pre_forward()
        return inner(*send_to_device(args, self.device), **send_to_device(kwargs, self.device))

    def pre_forward(self) -> None:
        """Bring the model to the accelerator (the previous model of the chain goes back to the CPU first)."""
        if self.onloaded:
            return
        if self.prev is not None:
            self.prev.offload()
        self.model.to(self.device)
        self.onloaded = True

    def offload(self) -> None:
        if self.onloaded:
            self.model.to("cpu")
            self.onloaded = False


def offload_hook(module: Any) -> ModelOffloadHook | None:
    return module.__dict__.get(HOOK_ATTR) if isinstance(module, nn.Module) else None


def onload(module: Any) -> None:
    """For entry points other than `__call__` (the VAE's `encode` / `decode`, as Diffusers' `apply_forward_hook`)."""
    hook = offload_hook(module)
    if hook is not None and not torch.compiler.is_compiling():
        hook.pre_forward()


def keep_offload_hook_outside(module: nn.Module) -> None:
    hook = offload_hook(module)
    if hook is not None:
        hook.rewrap()


def has_sequential_offload(module: nn.Module) -> bool:
    """Whether accelerate's hooks (sequential offload) sit on the module or a submodule."""
    return any(hasattr(m, "_hf_hook") for m in module.modules())


def check_compilable(module: nn.Module) -> None:
    check_idle(module, "compile_pipeline")
    if has_sequential_offload(module):
        raise ValueError(
            f"{type(module).__name__} is offloaded with enable_sequential_cpu_offload(), whose hooks move weights "
            "inside every submodule's forward: it cannot be compiled. Use enable_model_cpu_offload() with "
            "torch.compile / compile_pipeline, or call remove_all_hooks() first."
        )


def check_whole_step_compilable(pipe: Any, denoisers: tuple[str, ...]) -> None:
    """A whole-step graph calls the denoisers from inside compiled code, where a model offload hook cannot move them."""
    for name in denoisers:
        if getattr(pipe, name, None) is not None:
            check_idle(getattr(pipe, name), "compile_pipeline")
    offloaded = [name for name in denoisers if offload_hook(getattr(pipe, name, None)) is not None]
    if offloaded:
        raise ValueError(
            f"whole_step=True with model CPU offload ({', '.join(offloaded)} offloaded): the step's graph calls "
            "the UNet from inside compiled code, where the offload hook cannot move it to the device; use "
            "whole_step=False (the models compile and offload together) or pipe.remove_all_hooks() first"
        )
