"""LCM (Luo et al., arXiv:2310.04378): latent consistency models sample in a few steps (LCM-LoRA, LCM distillations).

Each step maps the sample to the consistency function's estimate (`denoised`, a boundary-conditioned x0) and
noises it again down to the next timestep. `ConsistencySchedulerMixin` is the config and schedule that LCM and TCD
share: timesteps picked from the distillation's `original_inference_steps` grid.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from ..utils.outputs import BaseOutput
from ..utils.torch_utils import Device, Generator, randn_tensor
from .scheduler_config import ClipSampleConfig
from .scheduling_utils import GeneratorStepMixin, SchedulerMixin
from .step_plan import PlanUpdate, StepPlan, make_coeffs

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ConsistencySchedulerConfig(ClipSampleConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    original_inference_steps: int = 50
    clip_sample: bool = False
    set_alpha_to_one: bool = True
    timestep_scaling: float = 10.0


@dataclasses.dataclass(frozen=True)
class LCMSchedulerConfig(ConsistencySchedulerConfig):
    pass


class ConsistencySchedulerMixin(SchedulerMixin):
    """The schedule of LCM and TCD: `num_inference_steps` of the distillation's `original_inference_steps` timesteps,
    or custom `timesteps`; `strength` keeps the low-noise share of either (their img2img pipelines)."""

    _compatibles: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: dict | None = None, **kwargs: object) -> None:
        super().__init__(config, **kwargs)
        self.custom_timesteps = False

    def _origin_timesteps(self, original_inference_steps: int | None, strength: float) -> np.ndarray:
        """The distillation's timestep grid (ascending), cut to `strength`."""
        steps = (
            original_inference_steps if original_inference_steps is not None else self.config.original_inference_steps
        )
        self._check_original_steps(steps)
        k = self.config.num_train_timesteps // steps
        return np.asarray(list(range(1, int(steps * strength) + 1))) * k - 1

    def _check_original_steps(self, steps: int) -> None:
        if steps > self.config.num_train_timesteps:
            raise ValueError(
                f"original_inference_steps={steps} cannot be larger than num_train_timesteps="
                f"{self.config.num_train_timesteps}"
            )

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Device = None,
        original_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """`num_inference_steps` evenly picked from the distillation grid, or custom descending `timesteps`."""
        self._check_trained_betas()
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps to set_timesteps")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")
        name = type(self).__name__
        original_steps = (
            original_inference_steps if original_inference_steps is not None else self.config.original_inference_steps
        )
        origin = self._origin_timesteps(original_inference_steps, strength)
        num_train = self.config.num_train_timesteps
        if timesteps is not None:
            values = [int(t) for t in timesteps]
            if any(b >= a for a, b in zip(values, values[1:])) or not values:
                raise ValueError(f"{name}: custom timesteps must be in descending order, got {values}")
            if values[0] >= num_train:
                raise ValueError(f"{name}: timesteps must start below num_train_timesteps={num_train}, got {values}")
            grid = set(origin.tolist())
            off_grid = [t for t in values[1:] if t not in grid]
            if strength == 1.0 and values[0] != num_train - 1:
                logger.warning(f"{name}: the custom schedule starts at {values[0]}, not {num_train - 1}")
            if off_grid:
                logger.warning(f"{name}: custom timesteps {off_grid} are not on the distillation's timestep grid")
            if len(values) > original_steps:
                logger.warning(
                    f"{name}: {len(values)} custom timesteps exceed original_inference_steps={original_steps}"
                )
            n = len(values)
            t_start = max(n - min(int(n * strength), n), 0)
            schedule = np.array(values[t_start:], dtype=np.int64)
            self.custom_timesteps = True
        else:
            n = self._check_num_inference_steps(num_inference_steps)
            if len(origin) // n < 1:
                raise ValueError(
                    f"{name}: num_inference_steps={n} is more than original_inference_steps x strength = "
                    f"{original_steps} x {strength} allows; lower num_inference_steps or raise strength"
                )
            if n > original_steps:
                raise ValueError(
                    f"{name}: num_inference_steps={n} cannot be larger than original_inference_steps={original_steps}"
                )
            origin = origin[::-1].copy()
            indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
            schedule = origin[indices]
        self._set_schedule(schedule.astype(np.int64), device, n)

    def _prev_alpha(self, i: int, last: int) -> torch.Tensor:
        """alphas_cumprod at the timestep after step i (`last` after the final step; < 0: the final alpha)."""
        values = self._timestep_values
        prev_t = int(values[i + 1]) if i + 1 < len(values) else last
        return self._alpha_prod(prev_t)

    def _draws_noise(self, i: int) -> bool:
        """Every step but the last one re-noises its estimate (Diffusers compares with num_inference_steps)."""
        return i != self.num_inference_steps - 1

    def _renoise(
        self, i: int, sample: torch.Tensor, generator: Generator | None, alpha_ratio: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Step i's noise and the scales of prev = sample_coeff * estimate + noise_coeff * noise, which noises the
        estimate back up by `alpha_ratio`: drawn on every step but the last, which gets zeros and scales 1 and 0
        without drawing (the generator ends where Diffusers' does)."""
        if self._draws_noise(i):
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            return noise, {"sample_coeff": alpha_ratio.sqrt(), "noise_coeff": (1 - alpha_ratio).sqrt()}
        return torch.zeros_like(sample), {"sample_coeff": 1.0, "noise_coeff": 0.0}


@dataclasses.dataclass
class LCMSchedulerOutput(BaseOutput):
    """`step`'s result: the next sample and the consistency estimate `denoised`."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


class LCMCoeffs(NamedTuple):
    alpha_prod_t: torch.Tensor  # alphas_cumprod at t
    c_skip: torch.Tensor  # the boundary condition: denoised = c_out x0 + c_skip x
    c_out: torch.Tensor
    sample_coeff: torch.Tensor  # prev = sample_coeff denoised + noise_coeff noise (1 and 0 on the last step)
    noise_coeff: torch.Tensor


class LCMScheduler(GeneratorStepMixin, ConsistencySchedulerMixin):
    config_class: ClassVar[type[LCMSchedulerConfig]] = LCMSchedulerConfig
    output_class: ClassVar[type[LCMSchedulerOutput]] = LCMSchedulerOutput

    def get_scalings_for_boundary_condition_discrete(self, timestep: int | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out) of the consistency parameterisation at `timestep` (float32, as for a tensor timestep)."""
        self.sigma_data = 0.5
        scaled = torch.as_tensor(timestep, dtype=torch.int64) * self.config.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled**2 + self.sigma_data**2)
        c_out = scaled / (scaled**2 + self.sigma_data**2) ** 0.5
        return c_skip, c_out

    def _plan(self, i: int, sample: torch.Tensor, generator: Generator | None) -> StepPlan[LCMCoeffs]:
        """Noise for every step (see `_renoise`)."""
        t = int(self._timestep_values[i])
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(t)
        noise, scales = self._renoise(i, sample, generator, self._prev_alpha(i, last=t))
        coeffs = make_coeffs(LCMCoeffs, alpha_prod_t=self.alphas_cumprod[t], c_skip=c_skip, c_out=c_out, **scales)
        return StepPlan(i, coeffs, noise)

    def apply_plan(self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[LCMCoeffs]) -> PlanUpdate:
        c = plan.coeffs
        x0 = self._clip_x0(self._predict_x0(model_output, sample, c.alpha_prod_t))
        denoised = c.c_out * x0 + c.c_skip * sample
        return PlanUpdate(c.sample_coeff * denoised + c.noise_coeff * plan.noise, denoised, ())
