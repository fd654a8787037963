"""Euler ancestral sampling: an Euler step down to sigma_down, then fresh noise back up to sigma_{i+1}."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from ..utils.torch_utils import Device, Generator, randn_tensor
from .scheduling_euler_discrete import EulerSchedulerMixin
from .scheduling_utils import GeneratorStepMixin, SchedulerConfig
from .step_plan import PlanUpdate, StepPlan, make_coeffs


@dataclasses.dataclass(frozen=True)
class EulerAncestralDiscreteSchedulerConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"
    rescale_betas_zero_snr: bool = False

    choices: ClassVar = {"prediction_type": ("epsilon", "v_prediction")}


class EulerAncestralCoeffs(NamedTuple):
    sigma: torch.Tensor  # sigma_i
    sigma_to: torch.Tensor  # sigma_{i+1}


class EulerAncestralDiscreteScheduler(GeneratorStepMixin, EulerSchedulerMixin):
    _refuses_int_timesteps = True
    _steps_without_set_timesteps: ClassVar[bool] = True
    config_class: ClassVar[type[EulerAncestralDiscreteSchedulerConfig]] = EulerAncestralDiscreteSchedulerConfig

    def set_timesteps(self, num_inference_steps: int, device: Device = None) -> None:
        timesteps = self._spaced_timesteps(self._check_num_inference_steps(num_inference_steps))
        self._set_schedule(timesteps, device, len(timesteps))
        self._set_sigmas(np.concatenate([self._spaced_sigmas(timesteps), [0.0]]).astype(np.float32))

    def _plan(self, i: int, sample: torch.Tensor, generator: Generator | None) -> StepPlan[EulerAncestralCoeffs]:
        """Noise for every step."""
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return StepPlan(i, make_coeffs(EulerAncestralCoeffs, sigma=self.sigmas[i], sigma_to=self.sigmas[i + 1]), noise)

    def apply_plan(
        self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[EulerAncestralCoeffs]
    ) -> PlanUpdate:
        sigma, sigma_to = plan.coeffs.sigma, plan.coeffs.sigma_to
        sample = sample.to(torch.float32)
        x0 = self._predict_x0_ve(model_output, sample, sigma, sigma)
        # split the step to sigma_to into a deterministic part (down) and injected noise (up)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        prev_sample = (prev_sample + plan.noise * sigma_up).to(model_output.dtype)
        return PlanUpdate(prev_sample, x0, ())
