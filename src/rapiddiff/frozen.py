"""Inductor freezing that never serves stale weights: `FrozenWeightsCall`, the compiled call `compile_pipeline` gives a
module whose weights it freezes (the CPU default), and what it needs - a cheap check that no weight changed, and
inductor's freezing flag on in each thread while its frozen calls run."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .models.lora_layers import LoRALayerMixin

logger = logging.getLogger("rapiddiff.compile")  # one logger for everything compile_pipeline sets up


def default_freezes(module: nn.Module) -> bool:
    """freezing=None: on for CPU weights, off for a module holding LoRA layers (whose scales and adapters change
    between calls: frozen, each change would compile anew; unfrozen, the graph reads them as inputs)."""
    on_cpu = next(module.parameters()).device.type == "cpu"
    return on_cpu and not any(isinstance(m, LoRALayerMixin) for m in module.modules())


def weights_fingerprint(tensors: Sequence[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """(storage address, version counter) of each tensor: changes when a tensor's storage is replaced (`.to()`,
    `param.data = ...`) or written in place under no_grad (`load_state_dict`, `copy_`, a LoRA fused with `add_`)."""
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


class _Registrations:
    """A count of parameter, buffer and submodule registrations in eager code anywhere in the process (torch's global
    registration hooks): while it stands still, no module's tensors were replaced (a state dict loaded with assign, a
    submodule swapped, a LoRA layer injected), so a cached list of a module's tensors is still its list. Walking the
    SD UNet's module tree takes milliseconds; reading the cached list's ~700 versions, a tenth of that.

    Installed when this module is imported, before anything compiles (dynamo guards on the hooks it traces through);
    registrations inside compiled code (a forward slicing a ModuleList) are not counted, so no graph guards on the
    count."""

    count = 0

    @classmethod
    def bump(cls, *_: Any) -> None:
        if torch.compiler.is_compiling():
            return
        cls.count += 1


for _register in (
    torch.nn.modules.module.register_module_parameter_registration_hook,
    torch.nn.modules.module.register_module_buffer_registration_hook,
    torch.nn.modules.module.register_module_module_registration_hook,
):
    _register(_Registrations.bump)


class FrozenWeightsCall:
    """A module's compiled call with inductor's `freezing`, which bakes the weights into the compiled code (on a CPU,
    convolution and linear weights prepacked once for oneDNN instead of at every call).

    Baked weights must never go stale: before each call the host checks that no weight changed since the compile
    and compiles anew when one did. The check reads the storage address and version counter of each parameter and
    buffer (about 0.2 ms for the SD UNet's ~700 tensors, no device sync) from a list walked again only after a
    module somewhere registered a parameter, buffer or submodule (`_Registrations`). Caught: `load_state_dict`
    (in place or with assign), `.to()`, `copy_` and other in-place writes under no_grad, `param.data = ...`, a
    submodule or parameter replaced, LoRA layers loaded, fused or unfused. Not caught: a write through `param.data`
    in place (it bypasses the version counter) or a deleted attribute; call `refresh()` after one.

    Each module gets a code object of its own to compile, so that torch's compile cache (kept per code object) never
    hands one module a graph holding another's weights.

    cpu_only (compile_pipeline's default, freezing=None): freeze only while the weights are on the CPU and the module
    holds no LoRA layers; weights moved to an accelerator (`pipe.to("cuda")` after compiling, model offload) or a
    LoRA loaded compile once more, without freezing and without the per-call check. Every compile after the first is
    logged (a warning): a weight change costs a full compile with freezing, and `freezing=False` avoids it.
    """

    def __init__(self, module: nn.Module, cpu_only: bool = False, **compile_kwargs: Any):
        """compile_kwargs: torch.compile's, with options holding freezing=True (`inductor_options`)."""
        self._compile_kwargs = compile_kwargs
        self._module = module
        self._cpu_only = cpu_only
        self.compiles = 0
        self.refresh()

    def refresh(self) -> None:
        """Compile anew from the module's current weights (at the next call)."""
        module = self._module
        self.frozen = not self._cpu_only or default_freezes(module)
        if self.compiles:
            logger.warning(
                "%s: weights changed since it was compiled with inductor freezing; compiling it again%s (compile "
                "#%d). compile_pipeline(..., freezing=False) keeps one graph across weight changes.",
                type(module).__name__,
                "" if self.frozen else " without freezing",
                self.compiles + 1,
            )
        kwargs = self._compile_kwargs
        if not self.frozen:
            kwargs = dict(kwargs, options={**kwargs["options"], "freezing": False})

        def call(*args: Any, **kwargs: Any) -> Any:
            return module._call_impl(*args, **kwargs)

        # a fresh code object: torch.compile's cache of graphs (frozen weights included) is per code object
        call.__code__ = call.__code__.replace(co_name=f"frozen_{type(module).__name__}_{id(self):x}")
        self._compiled = torch.compile(call, **kwargs)
        self._remember_weights()
        self.compiles += 1

    def _remember_weights(self) -> None:
        self._registrations = _Registrations.count
        self._tensors = module_tensors(self._module)
        self._fingerprint = weights_fingerprint(self._tensors)

    def weights_changed(self) -> bool:
        """Whether a parameter or buffer changed since the compile (see the class's docstring for what is caught)."""
        if self._registrations == _Registrations.count:
            return weights_fingerprint(self._tensors) != self._fingerprint
        tensors = module_tensors(self._module)
        if len(tensors) != len(self._tensors) or any(a is not b for a, b in zip(tensors, self._tensors)):
            return True
        self._registrations = _Registrations.count  # registrations elsewhere: this module's tensors are the same
        return weights_fingerprint(tensors) != self._fingerprint

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.frozen and self.weights_changed():
            self.refresh()
        if not self.frozen:
            return self._compiled(*args, **kwargs)
        with _global_freezing():
            return self._compiled(*args, **kwargs)


class _GlobalFreezing:
    lock = threading.Lock()
    users = 0
    saved = False


def _config_is_per_thread() -> bool:
    """Newer torch keeps a config module's assignments per thread (a ContextVar for each key); older torch shares them
    across threads."""
    entry = getattr(torch._inductor.config, "_config", {}).get("freezing")
    return isinstance(getattr(entry, "user_override", None), contextvars.ContextVar)


_PER_THREAD_CONFIG = _config_is_per_thread()


@contextlib.contextmanager
def _global_freezing() -> Iterator[None]:
    """Inductor's global `freezing` flag on while a frozen call runs. Dynamo reads it when it traces, to make the
    parameters constants of the graph rather than graph inputs; `torch.compile(options={"freezing": True})` alone
    reaches inductor after that, with the weights already inputs it cannot fold or prepack (the compiled code is then
    the recipe's). Where the config is per thread, each call patches its own thread's value. Where it is shared, it is
    counted, not patched and restored, so that threads in frozen calls at once never leave it on: the last one out
    restores the value it had. (A module compiled elsewhere that traces during such a call freezes too.)
    """
    if _PER_THREAD_CONFIG:
        with torch._inductor.config.patch(freezing=True):
            yield
        return
    with _GlobalFreezing.lock:
        if _GlobalFreezing.users == 0:
            _GlobalFreezing.saved = torch._inductor.config.freezing
            torch._inductor.config.freezing = True
        _GlobalFreezing.users += 1
    try:
        yield
    finally:
        with _GlobalFreezing.lock:
            _GlobalFreezing.users -= 1
            if _GlobalFreezing.users == 0:
                torch._inductor.config.freezing = _GlobalFreezing.saved
