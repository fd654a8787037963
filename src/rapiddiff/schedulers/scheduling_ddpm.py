"""DDPM (Ho et al., arXiv:2006.11239) ancestral sampling, with the learned variances of improved DDPM (DeepFloyd IF)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from ..utils.torch_utils import Device, Generator, randn_tensor
from .schedule_tables import spaced_timesteps
from .scheduler_config import ClipSampleConfig
from .scheduling_utils import GeneratorStepMixin
from .step_plan import PlanUpdate, StepPlan, make_coeffs


@dataclasses.dataclass(frozen=True)
class DDPMSchedulerConfig(ClipSampleConfig):
    variance_type: str | None = "fixed_small"  # None: fixed_small, as in Diffusers

    choices: ClassVar = {
        "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"),
    }


class DDPMCoeffs(NamedTuple):
    alpha_prod_t: torch.Tensor  # alphas_cumprod at t
    alpha_prod_t_prev: torch.Tensor  # ... at the previous timestep
    adds_noise: torch.Tensor  # 1 on every step but the last (t = 0), else 0


class DDPMScheduler(GeneratorStepMixin):
    """x_{t-1} ~ q(x_{t-1} | x_t, x0): the posterior mean (formula 7) plus noise of the chosen variance."""

    config_class: ClassVar[type[DDPMSchedulerConfig]] = DDPMSchedulerConfig
    _steps_without_set_timesteps: ClassVar[bool] = True

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Device = None, timesteps: Sequence[int] | None = None
    ) -> None:
        """Evenly spaced timesteps per `timestep_spacing`, or the custom descending `timesteps`."""
        n = self._resolve_steps(num_inference_steps, timesteps)
        cfg = self.config
        if timesteps is None:
            timesteps = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset)
        timesteps = np.asarray(timesteps).astype(np.int64)
        self._set_schedule(timesteps, device, len(timesteps))

    def _variance(
        self, alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor, predicted_variance: torch.Tensor | None
    ) -> torch.Tensor:
        """The posterior variance (its log for learned_range, its std for fixed_small_log) per `variance_type`."""
        beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * beta_t, min=1e-20)
        kind = self.config.variance_type
        if kind == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))
        if kind == "fixed_large":
            return beta_t
        if kind == "learned":
            return predicted_variance
        if kind == "learned_range":  # the model interpolates log-variance between beta~_t and beta_t
            frac = (predicted_variance + 1) / 2
            return frac * torch.log(beta_t) + (1 - frac) * torch.log(variance)
        return variance

    def _plan(self, i: int, sample: torch.Tensor, generator: Generator | None) -> StepPlan[DDPMCoeffs]:
        """The last step gets zeros for noise, without drawing: the generator ends where Diffusers' does."""
        t = self._timestep_values[i]
        prev_t = self._timestep_values[i + 1] if i + 1 < len(self._timestep_values) else -1
        if t > 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        else:
            noise = torch.zeros_like(sample)
        coeffs = make_coeffs(
            DDPMCoeffs,
            alpha_prod_t=self.alphas_cumprod[t],
            alpha_prod_t_prev=self._alpha_prod(prev_t),
            adds_noise=float(t > 0),
        )
        return StepPlan(i, coeffs, noise)

    def apply_plan(self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[DDPMCoeffs]) -> PlanUpdate:
        alpha_prod_t, alpha_prod_t_prev = plan.coeffs.alpha_prod_t, plan.coeffs.alpha_prod_t_prev
        predicted_variance = None
        learned = self.config.variance_type in ("learned", "learned_range")
        if learned and model_output.shape[1] == sample.shape[1] * 2:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)

        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        x0 = self._clip_x0(self._predict_x0(model_output, sample, alpha_prod_t))
        x0_coeff = (alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t
        sample_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        prev_sample = x0_coeff * x0 + sample_coeff * sample

        variance = self._variance(alpha_prod_t, alpha_prod_t_prev, predicted_variance)
        if self.config.variance_type == "fixed_small_log":
            std = variance
        elif self.config.variance_type == "learned_range":
            std = torch.exp(0.5 * variance)
        else:
            std = variance**0.5
        # a select, not a product: a learned std may be NaN on the last step, where no noise is added
        prev_sample = torch.where(plan.coeffs.adds_noise > 0, prev_sample + std * plan.noise, prev_sample)
        return PlanUpdate(prev_sample, x0, ())
