"""DDIM (Song et al., arXiv:2010.02502): deterministic for eta = 0, DDPM-like noise for eta = 1."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from ..utils.torch_utils import Device, Generator, randn_tensor
from .schedule_tables import spaced_timesteps
from .scheduler_config import ClipSampleConfig
from .scheduling_utils import SchedulerMixin
from .step_plan import PlanUpdate, SchedulerOutput, StepPlan, make_coeffs


@dataclasses.dataclass(frozen=True)
class DDIMSchedulerConfig(ClipSampleConfig):
    set_alpha_to_one: bool = True


class DDIMCoeffs(NamedTuple):
    alpha_prod_t: torch.Tensor  # alphas_cumprod at t
    alpha_prod_t_prev: torch.Tensor  # ... at the previous timestep
    std_dev_t: torch.Tensor  # sigma_t = eta * sqrt(variance)


class DDIMScheduler(SchedulerMixin):
    config_class: ClassVar[type[DDIMSchedulerConfig]] = DDIMSchedulerConfig

    def set_timesteps(self, num_inference_steps: int, device: Device = None) -> None:
        n = self._check_num_inference_steps(num_inference_steps)
        cfg = self.config
        timesteps = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset)
        self._set_schedule(timesteps.astype(np.int64), device, n)

    def _variance(self, t: int, prev_t: int) -> torch.Tensor:
        alpha_prod_t, alpha_prod_t_prev = self.alphas_cumprod[t], self._alpha_prod(prev_t)
        return ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, ...]:
        """x_{t-1} from x_t: formula (12) of the DDIM paper, with sigma_t = eta * sqrt(variance).

        A timestep outside the schedule is stepped from its own value, as Diffusers' DDIM computes every step; the
        position in the schedule does not move."""
        options = dict(
            eta=eta,
            use_clipped_model_output=use_clipped_model_output,
            generator=generator,
            variance_noise=variance_noise,
        )
        self._require_schedule()
        off_schedule = self._off_schedule_value(timestep)
        if off_schedule is not None:
            plan = self._plan_at(self._step_index or 0, int(off_schedule), sample, **options)
            prev_sample, x0, _ = self.apply_plan(model_output, sample, plan)
            return self._output(prev_sample, x0, return_dict)
        return self._step(model_output, timestep, sample, return_dict, **options)

    def _plan(self, i: int, sample: torch.Tensor, **step_kwargs: Any) -> StepPlan[DDIMCoeffs]:
        return self._plan_at(i, self._timestep_values[i], sample, **step_kwargs)

    def _plan_at(
        self,
        i: int,
        t: int,
        sample: torch.Tensor,
        eta: float,
        use_clipped_model_output: bool,
        generator: Generator | None,
        variance_noise: torch.Tensor | None,
    ) -> StepPlan[DDIMCoeffs]:
        """Step i of the schedule, at training timestep t."""
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise to DDIMScheduler.step, not both")
        # Diffusers' DDIM always steps back by num_train // num_inference, whatever the spacing.
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        std_dev_t = eta * self._variance(t, prev_t) ** 0.5
        noise = None
        if eta > 0:
            noise = variance_noise
            if noise is None:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        coeffs = make_coeffs(
            DDIMCoeffs,
            alpha_prod_t=self.alphas_cumprod[t],
            alpha_prod_t_prev=self._alpha_prod(prev_t),
            std_dev_t=std_dev_t,
        )
        return StepPlan(i, coeffs, noise, options={"use_clipped_model_output": use_clipped_model_output})

    def apply_plan(self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[DDIMCoeffs]) -> PlanUpdate:
        c = plan.coeffs
        x0 = self._predict_x0(model_output, sample, c.alpha_prod_t)
        eps = self._predict_eps(model_output, sample, c.alpha_prod_t)
        x0 = self._clip_x0(x0)
        if plan.options["use_clipped_model_output"]:
            eps = (sample - c.alpha_prod_t**0.5 * x0) / (1 - c.alpha_prod_t) ** 0.5
        direction = (1 - c.alpha_prod_t_prev - c.std_dev_t**2) ** 0.5 * eps
        prev_sample = c.alpha_prod_t_prev**0.5 * x0 + direction
        if plan.noise is not None:
            prev_sample = prev_sample + c.std_dev_t * plan.noise
        return PlanUpdate(prev_sample, x0, ())
