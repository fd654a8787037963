"""What the CPU computes natively, as PyTorch itself detects it (the same probes its oneDNN kernels dispatch on)."""

from __future__ import annotations

import platform
from typing import NamedTuple

import torch


class CpuPrecisions(NamedTuple):
    """Native low-precision support of this CPU: bfloat16 (AVX512-BF16 or AMX tiles) and int8 dot products (VNNI:
    AVX512-VNNI / AVX-VNNI, which AMX-INT8 CPUs also have)."""

    bf16: bool
    int8: bool
    amx: bool

    def describe(self) -> str:
        found = [n for n, on in (("bf16", self.bf16), ("int8 VNNI", self.int8), ("AMX", self.amx)) if on]
        return ", ".join(found) or "none"


def cpu_precisions() -> CpuPrecisions:
    """Probed with torch.cpu's feature checks (cpuinfo): `_is_avx512_bf16_supported`, `_is_amx_tile_supported`,
    `_is_vnni_supported`; all False off x86."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return CpuPrecisions(False, False, False)
    amx = torch.cpu._is_amx_tile_supported()
    return CpuPrecisions(
        bf16=torch.cpu._is_avx512_bf16_supported() or amx,
        int8=torch.cpu._is_vnni_supported(),
        amx=amx,
    )
