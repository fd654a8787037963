"""Diffusers' memory switches on pipelines: model / sequential CPU offload, attention slicing, xFormers, FreeU.

`MemoryMixin` is part of every pipeline (through `DiffusionPipeline`); `StableDiffusionMixin` adds FreeU to the
pipelines Diffusers gives it to (SD text-to-image, img2img, inpainting, ControlNet, x4 upscaler; not IF).

- `enable_model_cpu_offload(gpu_id=, device=)`: every model lives on the CPU and moves to the accelerator when it is
  called, the previous model of `model_cpu_offload_seq` going back first (text encoder -> UNet -> VAE). Models outside
  the chain (ControlNet, IF's safety checker) move when called and stay until the end of the call; those in
  `_exclude_from_cpu_offload` (SD's safety checker, IF's watermarker) stay on the accelerator. The hooks wrap each
  model's call outside any torch.compile graph (see `rapiddiff.utils.offload`), so compiled models keep working.
- `enable_sequential_cpu_offload(gpu_id=, device=)`: accelerate's `cpu_offload` as in Diffusers (needs `accelerate`):
  each submodule's weights come to the accelerator for its own forward only. Not compilable.
- `maybe_free_model_hooks()` (every pipeline call ends with it) sends the models back to the CPU; `remove_all_hooks()`
  ends offloading (models stay on the CPU).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch

from ..models.attention_processor import warn_sdpa_in_use
from ..models.autoencoder_kl import AutoencoderKL
from ..utils.offload import ModelOffloadHook, has_sequential_offload, offload_hook
from ..utils.optional import import_optional

logger = logging.getLogger(__name__)

# Modules whose forward reads a child's weights directly (a 1x1 conv applied as a matmul): sequential offload loads
# their whole subtree before their forward.
SEQUENTIAL_PRELOAD = ["Transformer2DModel"]


def _accelerator_type() -> str:
    """The accelerator Diffusers' `get_device()` would pick: cuda, xpu, mps...; "cpu" when there is none."""
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return acc.type if acc is not None else "cpu"


def _empty_cache(device_type: str) -> None:
    if device_type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


class MemoryMixin:
    """Offload, attention slicing and xFormers switches of Diffusers' `DiffusionPipeline`."""

    # The order the pipeline calls its models in (Diffusers' attribute); None: model offload is not available.
    model_cpu_offload_seq: ClassVar[str | None] = None
    # Components that stay on the accelerator under offloading (small ones that run once per call).
    _exclude_from_cpu_offload: ClassVar[tuple[str, ...]] = ()

    _offload_device: torch.device | None = None
    _offload_gpu_id: int = 0

    # --- offloading --------------------------------------------------------------------------------------------------
    def _offload_target(self, what: str, gpu_id: int | None, device: torch.device | str | None) -> torch.device:
        """Diffusers' device rule: `device` (default: the machine's accelerator) with index gpu_id (default: the
        device's index, the one used last time, or 0)."""
        if gpu_id is not None and (not isinstance(gpu_id, int) or isinstance(gpu_id, bool) or gpu_id < 0):
            raise ValueError(f"{what}: gpu_id must be a non-negative int, got {gpu_id!r}")
        if device is None:
            device = _accelerator_type()
            if device == "cpu":
                raise RuntimeError(
                    f"{what} needs an accelerator, and none was found; pass device= to choose one explicitly"
                )
        try:
            torch_device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"{what}: device={device!r} is not a torch device ({e})") from None
        if gpu_id is not None and torch_device.index is not None:
            raise ValueError(
                f"{what}: gpu_id={gpu_id} and device={device!r} both give a device index; pass only one of them"
            )
        self._offload_gpu_id = gpu_id or torch_device.index or self._offload_gpu_id
        return torch.device(f"{torch_device.type}:{self._offload_gpu_id}")

    def _torch_components(self) -> dict[str, torch.nn.Module]:
        return {n: c for n, c in self.components.items() if isinstance(c, torch.nn.Module)}

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep the models on the CPU and move each to `device` (default: the accelerator) while it is in use."""
        if self.model_cpu_offload_seq is None:
            raise ValueError(f"{type(self).__name__} has no model_cpu_offload_seq: model offload is not available")
        target = self._offload_target("enable_model_cpu_offload", gpu_id, device)
        self.remove_all_hooks()
        self._offload_device = target
        self.to("cpu")
        _empty_cache(target.type)
        models = self._torch_components()
        hooks: list[ModelOffloadHook] = []
        prev = None
        for name in self.model_cpu_offload_seq.split("->"):
            model = models.pop(name, None)
            if model is not None:
                prev = ModelOffloadHook(model, target, prev).attach()
                hooks.append(prev)
        # Models outside the chain (called many times, like ControlNet) move when first called and stay there until
        # `maybe_free_model_hooks`; excluded ones live on the accelerator.
        for name, model in models.items():
            if name in self._exclude_from_cpu_offload:
                model.to(target)
            else:
                hooks.append(ModelOffloadHook(model, target).attach())
        self._all_hooks = hooks

    def maybe_free_model_hooks(self) -> None:
        """End of a pipeline call: offloaded models go back to the CPU (a no-op without model offload). Components
        swapped since offloading was enabled get hooks (Diffusers re-enables offloading here)."""
        hooks = getattr(self, "_all_hooks", None)
        if not hooks:
            return
        hooked = {id(h.model) for h in hooks if not h.removed}
        current = self._torch_components()
        if any(id(m) not in hooked for n, m in current.items() if n not in self._exclude_from_cpu_offload):
            self.enable_model_cpu_offload(device=self._offload_device)
            return
        for hook in hooks:
            hook.offload()
        _empty_cache(self._offload_device.type)

    def enable_sequential_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """accelerate's `cpu_offload` on every model (Diffusers' behaviour): weights stay on the CPU and each
        submodule's come to `device` for its own forward only. Least memory, slowest; not compilable."""
        cpu_offload = import_optional(
            "accelerate",
            "enable_sequential_cpu_offload uses accelerate's hooks, as Diffusers does: pip install accelerate "
            "(or use enable_model_cpu_offload, which needs nothing more)",
        ).cpu_offload
        target = self._offload_target("enable_sequential_cpu_offload", gpu_id, device)
        for name, model in self._torch_components().items():
            if getattr(model, "_compiled_call_impl", None) is not None and offload_hook(model) is None:
                raise ValueError(
                    f"enable_sequential_cpu_offload: component {name!r} is compiled; sequential offload's hooks "
                    "cannot run inside a compiled graph. Use enable_model_cpu_offload() with compiled models."
                )
        self.remove_all_hooks()
        self._offload_device = target
        if self.device.type != "cpu":
            self.to("cpu")
        # accelerate mishandles an indexed CPU device ("cpu:0", what the rule above gives on a CPU): plain "cpu".
        execution = torch.device("cpu") if target.type == "cpu" else target
        for name, model in self._torch_components().items():
            if name in self._exclude_from_cpu_offload:
                model.to(target)
            else:
                cpu_offload(
                    model,
                    execution,
                    offload_buffers=len(model._parameters) > 0,
                    preload_module_classes=SEQUENTIAL_PRELOAD,
                )
        self._sequential_offload = True

    def remove_all_hooks(self) -> None:
        """End model or sequential offloading: the hooks go, the models stay where they are (the CPU)."""
        for hook in getattr(self, "_all_hooks", None) or ():
            hook.remove()
        self._all_hooks = []
        for model in self._torch_components().values():
            if has_sequential_offload(model):
                import accelerate.hooks

                accelerate.hooks.remove_hook_from_module(model, recurse=True)
        self._sequential_offload = False

    @property
    def _offloading(self) -> bool:
        return bool(getattr(self, "_all_hooks", None)) or getattr(self, "_sequential_offload", False)

    @property
    def _execution_device(self) -> torch.device:
        """Where the models run: the offload device while offloading, else where the models are."""
        if self._offloading and self._offload_device is not None:
            return self._offload_device
        return self.device

    def _check_move_under_offload(self, device: Any) -> None:
        """`pipe.to(accelerator)` while offloading: Diffusers refuses it under sequential offload and warns under
        model offload."""
        if device is None or torch.device(device).type == "cpu" or not self._offloading:
            return
        if getattr(self, "_sequential_offload", False):
            raise ValueError(
                f"to({device!r}): sequential CPU offload is on and moves weights itself; call remove_all_hooks() "
                "first, or leave the pipeline on the CPU"
            )
        logger.warning(
            "to(%r) while model CPU offload is on: the models will be moved back to the CPU after their use anyway; "
            "call remove_all_hooks() first to keep them on %s",
            device,
            device,
        )

    # --- attention ---------------------------------------------------------------------------------------------------
    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Sliced attention in the UNet (and ControlNet): "auto" (half of each layer's heads), "max" (1), an int
        (batch x head rows per slice). Saves memory, costs speed; SDPA rarely needs it."""
        self.set_attention_slice(slice_size)

    def disable_attention_slicing(self) -> None:
        self.set_attention_slice(None)

    def set_attention_slice(self, slice_size: str | int | None) -> None:
        for model in self._torch_components().values():
            if hasattr(model, "set_attention_slice"):
                model.set_attention_slice(slice_size)

    def enable_xformers_memory_efficient_attention(self, attention_op: Any = None) -> None:
        """Diffusers' xFormers switch: rapiddiff already runs PyTorch's memory-efficient SDPA, so this says so and
        (re)selects the default SDPA processors; not an error."""
        warn_sdpa_in_use(type(self).__name__, attention_op)
        self.set_use_memory_efficient_attention_xformers(True, attention_op)

    def disable_xformers_memory_efficient_attention(self) -> None:
        self.set_use_memory_efficient_attention_xformers(False)

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Any = None) -> None:
        for model in self._torch_components().values():
            if hasattr(model, "set_use_memory_efficient_attention_xformers"):
                model.set_use_memory_efficient_attention_xformers(valid, attention_op)


class StableDiffusionMixin:
    """FreeU switches and fused attention projections of Diffusers' StableDiffusionMixin (pipelines with a Stable
    Diffusion UNet)."""

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """Fuse the attention projections of the UNet and/or the VAE (models/fused_projections.py)."""
        self._fuse_projections(unet, vae, fuse=True)

    def unfuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """Undo `fuse_qkv_projections`; a model that was not fused is left as is, with Diffusers' warning."""
        self._fuse_projections(unet, vae, fuse=False)

    def _fuse_projections(self, unet: bool, vae: bool, fuse: bool) -> None:
        if vae and fuse and not isinstance(self.vae, AutoencoderKL):
            raise ValueError("`fuse_qkv_projections()` is only supported for the VAE of type `AutoencoderKL`.")
        for name, wanted in (("unet", unet), ("vae", vae)):
            if not wanted:
                continue
            flag = f"fusing_{name}"
            if fuse:
                getattr(self, name).fuse_qkv_projections()
            elif not getattr(self, flag, False):
                logger.warning("The %s was not initially fused for QKV projections. Doing nothing.", name.upper())
                continue
            else:
                getattr(self, name).unfuse_qkv_projections()
            setattr(self, flag, fuse)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU in the UNet: skip features' low frequencies times s1 / s2, backbone features times b1 / b2, in the
        first two up levels. Values from https://github.com/ChenyangSi/FreeU (e.g. SD 1.5: 0.9, 0.2, 1.5, 1.6)."""
        if getattr(self, "unet", None) is None:
            raise ValueError("enable_freeu: the pipeline must have a unet")
        self.unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        self.unet.disable_freeu()
