"""Random tensors with Diffusers' seeding rules, and host-to-device moves that never block.

Same seed => same noise as Diffusers' `randn_tensor`: a CPU generator draws on the CPU and the result is moved to the
device, a list of generators draws one batch entry per generator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

Generator = torch.Generator | Sequence[torch.Generator]
Device = str | torch.device | None  # where tensors go: a device or its name (None: where they are, or the CPU)


def first_non_finite(tensors: Mapping[str, Any]) -> tuple[str, int, int] | None:
    """(key, non-finite count, size) of the first floating-point tensor holding nan/inf, or None: weights read from a
    file are checked once, before they touch a model (a nan there would poison the weights for good)."""
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                return key, int((~finite).sum()), value.numel()
    return None


def to_device(tensor: torch.Tensor, device: Device) -> torch.Tensor:
    """`tensor` on `device` (unchanged for None), copied without a host sync.

    A plain `.to("cuda")` of a CPU tensor waits for the copy (a sync that `torch.cuda.set_sync_debug_mode` reports);
    non_blocking staging of pageable memory is safe because CUDA copies the source out before returning.
    """
    if device is None:
        return tensor
    return tensor.to(device, non_blocking=True)


def randn_tensor(
    shape: Sequence[int],
    generator: Generator | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    layout: torch.layout | None = None,
) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`, drawn exactly as Diffusers' `randn_tensor` draws it.

    - generator on the CPU, device elsewhere: drawn on the CPU, then moved (so a CPU seed gives the same noise on
      every device);
    - generator on another accelerator than `device`: ValueError;
    - a list of generators: one per batch entry (its length must be shape[0]), each drawing a (1, *shape[1:]) slice.
    """
    shape = tuple(shape)
    device = torch.device(device) if device is not None else None
    target = device or torch.device("cpu")
    generators = list(generator) if isinstance(generator, (list, tuple)) else None
    if generators is not None and len(generators) == 1:
        generator, generators = generators[0], None
    if generators is not None and len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}: pass one per batch entry")

    draw_device = device
    first = generators[0] if generators else generator
    if first is not None and first.device.type != target.type:
        if first.device.type != "cpu":
            raise ValueError(f"cannot draw a {target} tensor from a generator on {first.device}")
        draw_device = torch.device("cpu")

    kwargs = dict(device=draw_device, dtype=dtype, layout=layout or torch.strided)
    if generators is None:
        noise = torch.randn(shape, generator=generator, **kwargs)
    else:
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, **kwargs) for g in generators])
    return to_device(noise, target)


# --- FreeU (https://huggingface.co/papers/2309.11497), as Diffusers applies it ------------------------------------------
def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scale the low frequencies (a (2*threshold)^2 square around the centre of the shifted spectrum) by `scale`.

    Computed in float32 (FFTs of float16/bfloat16 are unstable or unsupported) and returned in x's dtype. The mask is
    built without in-place writes so the function compiles into one graph."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= h // 2 - threshold) & (rows < h // 2 + threshold)
    in_cols = (cols >= w // 2 - threshold) & (cols < w // 2 + threshold)
    low = in_rows[:, None] & in_cols[None, :]
    mask = torch.where(low, torch.tensor(scale, dtype=torch.float32, device=x.device), 1.0)
    filtered = torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return filtered.to(x.dtype)


def apply_freeu(
    resolution_idx: int, hidden_states: torch.Tensor, skip: torch.Tensor, s1: float, s2: float, b1: float, b2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeU on the first two up levels: the first half of the backbone channels times b1 (b2), the skip's low
    frequencies times s1 (s2). Other levels pass through."""
    if resolution_idx not in (0, 1):
        return hidden_states, skip
    b, s = (b1, s1) if resolution_idx == 0 else (b2, s2)
    half = hidden_states.shape[1] // 2
    hidden_states = torch.cat([hidden_states[:, :half] * b, hidden_states[:, half:]], dim=1)
    return hidden_states, fourier_filter(skip, threshold=1, scale=s)
