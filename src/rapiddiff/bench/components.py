"""Pipeline components: built from a shipped config with random weights, or loaded from a real checkpoint.

Throughput does not depend on the weights' values, so the default is random weights: the model is built on the meta
device (no memory, no init), materialised on the target device and filled by `random_init_`, which draws PyTorch's
default scale seeded by each tensor's name, so rapiddiff and diffusers get the very same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .backends import Backend
from .presets import CHECKPOINTS, PRESETS_DIR, preset_config

if TYPE_CHECKING:
    from .settings import Settings

# model and scheduler classes come from the backend; text encoders and tokenizers from transformers in both
KINDS = ("model", "scheduler", "text_encoder", "tokenizer")


@dataclasses.dataclass(frozen=True)
class Component:
    """One constructor argument of a pipeline and where it comes from."""

    checkpoint: str  # key of presets.CHECKPOINTS
    subfolder: str  # "unet", ...; "" for a checkpoint that is one model (the ControlNet)
    kind: str  # one of KINDS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; allowed: {', '.join(KINDS)}")


def random_init_(module: nn.Module, seed: int = 0) -> None:
    """PyTorch's default scale (uniform within 1/sqrt(fan_in)), biases 0 and norm scales 1, in place.

    Each tensor draws from its own generator seeded by its name: the result does not depend on the order the
    modules were created in, only on the state-dict keys, which are the same in rapiddiff and diffusers.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            bound = 1.0 / math.sqrt(p[0].numel())
            g = torch.Generator(p.device).manual_seed(seed + zlib.crc32(name.encode()))
            p.uniform_(-bound, bound, generator=g)


def random_model(factory: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`factory()` with random weights on `device`, built without paying for the library's weight init."""
    with torch.device("meta"):
        model = factory()
    if next(model.buffers(), None) is not None:
        # buffers hold values computed at construction (CLIP's position ids): construct for real
        with torch.device(device):
            model = factory()
    else:
        model = model.to_empty(device=device)
    model = nn.Module.to(
        model, dtype
    )  # nn.Module's own: diffusers' override only adds a warning for from_config models
    random_init_(model)
    return model.eval()


def build_component(component: Component, backend: Backend, settings: Settings) -> Any:
    """The component for `backend`: random weights from the preset's config, or the checkpoint in settings.models."""
    return _BUILDERS[component.kind](component, backend, settings, settings.models.get(component.checkpoint))


def _config(component: Component, settings: Settings, real: Path | None, filename: str) -> dict[str, Any]:
    if real is not None:
        return json.loads((real / component.subfolder / filename).read_text())
    return preset_config(component.checkpoint, component.subfolder, filename, settings.preset)


def _model(component: Component, backend: Backend, settings: Settings, real: Path | None) -> nn.Module:
    config = _config(component, settings, real, "config.json")
    cls = backend.get(config["_class_name"])
    if real is None:
        return random_model(lambda: cls.from_config(config), settings.device, settings.dtype)
    model = cls.from_pretrained(real, subfolder=component.subfolder or None, torch_dtype=settings.dtype)
    return model.to(settings.device).eval()


def _scheduler(component: Component, backend: Backend, settings: Settings, real: Path | None) -> Any:
    config = _config(component, settings, real, "scheduler_config.json")
    return backend.get(config["_class_name"]).from_config(config)


def _text_encoder(component: Component, backend: Backend, settings: Settings, real: Path | None) -> nn.Module:
    import transformers

    values = _config(component, settings, real, "config.json")
    # CLIPTextModel, or SDXL's second encoder CLIPTextModelWithProjection, as the config's architectures say
    cls = getattr(transformers, (values.get("architectures") or ["CLIPTextModel"])[0])
    if real is not None:
        model = cls.from_pretrained(real, subfolder=component.subfolder, torch_dtype=settings.dtype)
        return model.to(settings.device).eval()
    config = transformers.CLIPTextConfig.from_dict(values)
    return random_model(lambda: cls(config), settings.device, settings.dtype)


def _tokenizer(component: Component, backend: Backend, settings: Settings, real: Path | None) -> Any:
    from transformers import CLIPTokenizer

    # the x4 upscaler's configs ship without a tokenizer: it is SD 1.5's CLIP tokenizer
    folders = [
        PRESETS_DIR / CHECKPOINTS[component.checkpoint] / component.subfolder,
        PRESETS_DIR / CHECKPOINTS["sd"] / "tokenizer",
    ]
    if real is not None:
        folders.insert(0, real / component.subfolder)
    return CLIPTokenizer.from_pretrained(next(f for f in folders if f.is_dir()))


_BUILDERS = {"model": _model, "scheduler": _scheduler, "text_encoder": _text_encoder, "tokenizer": _tokenizer}
