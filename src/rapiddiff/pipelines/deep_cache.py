"""DeepCache in the denoising loop: the call's schedule of full and shallow steps, and the cache it carries.

`pipe.unet.enable_cache(DeepCacheConfig(...))` (or `DeepCacheSDHelper(pipe).enable()`) makes every call of the
pipeline build a `DeepCacheLoop`: before the loop, on the host, which steps are full (DeepCache's rule, from the
scheduler's timesteps); during it, the feature the last full step left. The loop is the call's own value (threads
sharing a pipeline never share a cache) and wraps the call's step runner, so it works with the eager step, a compiled
UNet and `compile_pipeline(whole_step=True)` alike: each step's model is the UNet called with a `DeepCacheStep`,
whose only variation is "full" (no feature) or "shallow" (a feature tensor): two graphs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..models.deep_cache import (
    LAYERS_PER_BRANCH_LEVEL,
    SKIP_MODES,
    CachePoint,
    DeepCacheConfig,
    DeepCacheStep,
    cache_point,
    full_steps,
    shallow_residuals,
    step_positions,
)
from .denoise import DenoisingStep, StepInput, StepRunner, run_step


class CachedModelCall:
    """The step's model for one step of a cached loop: the UNet with the step's `DeepCacheStep`; the feature it
    returns is kept in `feature` (read by the loop after the step, outside any compiled code)."""

    def __init__(self, unet: Any, step: DeepCacheStep):
        self.unet = unet
        self.step = step
        self.feature: torch.Tensor | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        out, feature = self.unet(*args, deep_cache=self.step, **kwargs)
        self.feature = feature
        return (out,)


@dataclasses.dataclass
class DeepCacheLoop:
    """One call's DeepCache state: the cut, which steps are full, and the cached feature (owned: a copy, so that a
    CUDA-graph replay of the full step's graph cannot overwrite it while shallow steps read it)."""

    point: CachePoint
    full: tuple[bool, ...]
    shallow_residuals: int | None  # ControlNet skip residuals a shallow step reads (None: all, and the mid one)
    feature: torch.Tensor | None = None

    def residuals(self, i: int) -> int | None:
        """The ControlNet residuals step i reads: None (all of them) on a full step."""
        return None if self.full[i] else self.shallow_residuals

    def runner(self, inner: StepRunner | None) -> StepRunner:
        """`inner` (the pipeline's step runner, None: eager) with each step's model bound to its cache step."""
        run_inner = inner or run_step

        def run(step: DenoisingStep, x: StepInput) -> torch.Tensor:
            full = self.full[x.i]
            call = CachedModelCall(step.model, DeepCacheStep(self.point, None if full else self.feature))
            latents = run_inner(dataclasses.replace(step, model=call), x)
            if full:
                assert call.feature is not None
                self.feature = call.feature.clone()
            return latents

        return run


def host_timesteps(scheduler: Any) -> list[float]:
    """The scheduler's whole schedule as Python numbers: rapiddiff's schedulers keep it on the host; another
    scheduler's tensor is read once, before the loop."""
    values = getattr(scheduler, "_timestep_values", None)
    if values is not None and len(values) == len(scheduler.timesteps):
        return list(values)
    return [float(v) for v in scheduler.timesteps.tolist()]


def deep_cache_loop(unet: Any, scheduler: Any, steps: int) -> DeepCacheLoop | None:
    """The call's DeepCache state when `unet` has a cache enabled, else None, for a loop of the last `steps` of the
    scheduler's timesteps. The interval counts from the first step that runs (img2img's strength) by the steps'
    positions in the scheduler's timesteps (DeepCache's `timesteps.index(t)`)."""
    config = getattr(unet, "cache_config", None)
    if config is None:
        return None
    positions = step_positions(host_timesteps(scheduler), steps)
    point = cache_point(unet.down_blocks, config.cache_branch_id)
    return DeepCacheLoop(point, full_steps(config, positions), shallow_residuals(unet.down_blocks, point))


class DeepCacheSDHelper:
    """DeepCache's helper (`DeepCache.DeepCacheSDHelper`) for rapiddiff pipelines, same calls, same images:

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=3, cache_branch_id=0)
        helper.enable()      # pipe.unet.enable_cache(DeepCacheConfig(3, 0))
        helper.disable()

    Unlike DeepCache's (which swaps module `forward`s and reads the timestep on the host), the pipeline stays
    compilable. `skip_mode="non-uniform"` is the paper's schedule (`pow`, `center`), which DeepCache's helper lacks.
    """

    def __init__(self, pipe: Any = None):
        self.pipe = pipe
        self.params = DeepCacheConfig(cache_interval=1)

    def set_params(
        self,
        cache_interval: int = 1,
        cache_branch_id: int = 0,
        skip_mode: str = "uniform",
        *,
        pow: float = 1.4,
        center: int = 15,
    ) -> None:
        self.params = DeepCacheConfig(cache_interval, cache_branch_id, skip_mode, pow, center)

    def enable(self, pipe: Any = None) -> None:
        if pipe is not None:
            self.pipe = pipe
        if self.pipe is None:
            raise ValueError("DeepCacheSDHelper.enable: no pipeline; pass pipe= here or to the constructor")
        self.pipe.unet.enable_cache(self.params)

    def disable(self) -> None:
        if self.pipe is not None:
            self.pipe.unet.disable_cache()


def parse_deep_cache(text: str) -> DeepCacheConfig:
    """`INTERVAL[:BRANCH]` (the command line's `--deepcache`) -> DeepCacheConfig; ValueError naming the value."""
    interval, _, branch = text.partition(":")
    try:
        return DeepCacheConfig(cache_interval=int(interval), cache_branch_id=int(branch) if branch else 0)
    except ValueError as error:
        raise ValueError(
            f"--deepcache {text!r}: expected INTERVAL[:BRANCH], an int >= 1 and an optional branch id >= 0 "
            f"(3 * level + layer, < {LAYERS_PER_BRANCH_LEVEL} x the UNet's levels); {error}"
        ) from None


__all__ = ["DeepCacheConfig", "DeepCacheLoop", "DeepCacheSDHelper", "SKIP_MODES", "deep_cache_loop"]
