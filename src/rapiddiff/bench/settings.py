"""What one benchmark run measures: the preset, the device and the matrix (pipelines x batch sizes x modes x backends)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .backends import BACKENDS
from .modes import MODES
from .presets import CHECKPOINTS, Preset

PIPELINES = ("sd_txt2img", "sd_img2img", "sd_inpaint", "sd_controlnet", "if")  # the reference page's: the default
EXTRA_PIPELINES = ("sdxl_txt2img",)  # run when named (`--pipelines sdxl_txt2img`)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Settings:
    preset: Preset
    device: torch.device
    dtype: torch.dtype
    pipelines: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    modes: tuple[str, ...]
    backends: tuple[str, ...]
    steps: Mapping[str, int]  # figure -> steps of the long call
    repeats: int  # rounds per cell, at least
    warmup: int
    threads: int | None  # torch's CPU threads during the run; None: as they are
    models: Mapping[str, Path] = dataclasses.field(default_factory=dict)  # checkpoint key -> real checkpoint folder
    progress: bool = True
    max_repeats: int | None = None  # rounds per cell at most (None: `repeats`)
    cell_seconds: float = 0.0  # no new round after this many seconds of timed calls, once `repeats` are done
    target: float = 0.05  # stop a cell early once its speed-up's 95 % interval is within +-target
    compiled_batch_sizes: tuple[int, ...] | None = None  # the batch sizes the compiled mode runs at (None: all)
    time_budget: float = 0.0  # seconds for the whole run, building and compiling included (0: none; see budget.py)

    def __post_init__(self) -> None:
        _check_names("pipelines", self.pipelines, PIPELINES + EXTRA_PIPELINES)
        _check_names("modes", self.modes, tuple(MODES))
        _check_names("backends", self.backends, BACKENDS)
        _check_names("models", tuple(self.models), tuple(CHECKPOINTS))
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes={self.batch_sizes!r}: give one or more positive integers")
        if self.repeats < 1 or self.warmup < 1 or (self.threads is not None and self.threads < 1):
            raise ValueError(
                f"repeats={self.repeats}, warmup={self.warmup}, threads={self.threads}: each must be at least 1"
            )
        if self.max_repeats is None:
            object.__setattr__(self, "max_repeats", self.repeats)
        if self.max_repeats < self.repeats:
            raise ValueError(f"max_repeats={self.max_repeats} is below repeats={self.repeats}")
        if not self.cell_seconds >= 0 or not 0 < self.target < 1:
            raise ValueError(
                f"cell_seconds={self.cell_seconds}, target={self.target}: seconds >= 0 and 0 < target < 1 are allowed"
            )
        if not (math.isfinite(self.time_budget) and self.time_budget >= 0):
            raise ValueError(f"time_budget={self.time_budget}: give seconds > 0, or 0 for no budget")
        short = {f: n for f, n in self.steps.items() if n < 3}
        if short:
            raise ValueError(
                f"steps {short}: the long call needs at least 3 steps (the short one runs max(2, steps // 10))"
            )
        for key, path in self.models.items():
            if not Path(path).is_dir():
                raise ValueError(f"models: {key}={str(path)!r} is not a folder")

    @classmethod
    def create(
        cls,
        preset: Preset,
        *,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        pipelines: tuple[str, ...] = PIPELINES,
        batch_sizes: tuple[int, ...] | None = None,
        modes: tuple[str, ...] | None = None,
        backends: tuple[str, ...] = BACKENDS,
        steps: int | None = None,
        repeats: int | None = None,
        max_repeats: int | None = None,
        cell_seconds: float | None = None,
        warmup: int | None = None,
        threads: int | None = None,
        models: Mapping[str, str | Path] | None = None,
        progress: bool = True,
        time_budget: float | None = None,
    ) -> Settings:
        """Settings from a preset; every argument left as None takes the preset's (or the machine's) default."""
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
        return cls(
            preset=preset,
            device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")),
            dtype=DTYPES[dtype or preset.dtype],
            pipelines=tuple(pipelines),
            batch_sizes=tuple(sorted(set(_given(batch_sizes, preset.batch_sizes)))),
            # compiled last: a pipeline compiled in place (rapiddiff's compile_pipeline) is not run eager again
            modes=tuple(sorted(set(_given(modes, preset.modes)), key=_mode_rank)),
            backends=tuple(backends),
            steps=dict(preset.steps) if steps is None else dict.fromkeys(preset.steps, steps),
            repeats=_given(repeats, preset.repeats),
            # --repeats alone fixes the count; the preset's adaptive range applies otherwise
            max_repeats=_given(max_repeats, preset.max_repeats if repeats is None else repeats),
            cell_seconds=_given(cell_seconds, preset.cell_seconds),
            # the preset's choice applies to its own batch sizes; sizes given explicitly all run compiled
            compiled_batch_sizes=preset.compiled_batch_sizes if batch_sizes is None else None,
            warmup=_given(warmup, preset.warmup),
            threads=_given(threads, preset.threads),
            models={k: Path(v) for k, v in (models or {}).items()},
            progress=progress,
            time_budget=_given(time_budget, preset.time_budget),
        )


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def _mode_rank(mode: str) -> int:
    return list(MODES).index(mode) if mode in MODES else len(MODES)  # unknown names are refused by __post_init__


def _check_names(argument: str, given: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    unknown = [name for name in given if name not in allowed]
    if unknown or (argument != "models" and not given):
        raise ValueError(f"{argument}={list(given)!r}: unknown {unknown}; allowed: {', '.join(allowed)}")
