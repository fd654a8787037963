"""TCD (Zheng et al., arXiv:2402.19159): trajectory consistency distillation's strategic stochastic sampling.

A step predicts x0 and epsilon, moves to an intermediate timestep s = floor((1 - eta) * t_prev) along the ODE, then
(eta > 0) noises forward to t_prev: eta (Diffusers' `gamma`) sets how stochastic sampling is.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from ..utils.outputs import BaseOutput
from ..utils.torch_utils import Generator
from .scheduling_lcm import ConsistencySchedulerConfig, ConsistencySchedulerMixin
from .step_plan import PlanUpdate, StepPlan, make_coeffs


@dataclasses.dataclass(frozen=True)
class TCDSchedulerConfig(ConsistencySchedulerConfig):
    pass


@dataclasses.dataclass
class TCDSchedulerOutput(BaseOutput):
    """`step`'s result: the next sample and the sample predicted at the intermediate timestep s."""

    prev_sample: torch.Tensor
    pred_noised_sample: torch.Tensor | None = None


class TCDCoeffs(NamedTuple):
    alpha_prod_t: torch.Tensor  # alphas_cumprod at t
    alpha_prod_s: torch.Tensor  # ... at the intermediate timestep s
    sample_coeff: torch.Tensor  # prev = sample_coeff pred_noised + noise_coeff noise (1 and 0 without noise)
    noise_coeff: torch.Tensor


class TCDScheduler(ConsistencySchedulerMixin):
    config_class: ClassVar[type[TCDSchedulerConfig]] = TCDSchedulerConfig
    output_class: ClassVar[type[TCDSchedulerOutput]] = TCDSchedulerOutput

    def _origin_timesteps(self, original_inference_steps: int | None, strength: float) -> np.ndarray:
        """As LCM's, except that an explicit `original_inference_steps` picks from every training timestep (as
        Diffusers' TCD does)."""
        if original_inference_steps is None:
            return super()._origin_timesteps(None, strength)
        return np.asarray(list(range(0, int(self.config.num_train_timesteps * strength))))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.3,
        generator: Generator | None = None,
        return_dict: bool = True,
    ) -> TCDSchedulerOutput | tuple[torch.Tensor, ...]:
        """eta in [0, 1]: 0 is deterministic (the ODE), 1 a full re-noising (like LCM)."""
        return self._step(model_output, timestep, sample, return_dict, eta=eta, generator=generator)

    def _plan(self, i: int, sample: torch.Tensor, eta: float, generator: Generator | None) -> StepPlan[TCDCoeffs]:
        """With eta > 0 every step gets noise: drawn, except on the last one (zeros)."""
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise ValueError(f"TCDScheduler.step: eta must be a number in [0, 1], got {eta!r}")
        values = self._timestep_values
        t = int(values[i])
        prev_t = int(values[i + 1]) if i + 1 < len(values) else 0
        # s = floor((1 - eta) * t_prev) in float32, as Diffusers computes it on the timestep tensor
        timestep_s = int(np.floor(np.float32(1 - eta) * np.float32(prev_t)))
        alpha_prod_t_prev, alpha_prod_s = self._alpha_prod(prev_t), self.alphas_cumprod[timestep_s]
        if eta > 0:  # from s forward to t_prev (see `_renoise`)
            noise, scales = self._renoise(i, sample, generator, alpha_prod_t_prev / alpha_prod_s)
        else:
            noise, scales = None, {"sample_coeff": 1.0, "noise_coeff": 0.0}
        coeffs = make_coeffs(TCDCoeffs, alpha_prod_t=self.alphas_cumprod[t], alpha_prod_s=alpha_prod_s, **scales)
        return StepPlan(i, coeffs, noise)

    def apply_plan(self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[TCDCoeffs]) -> PlanUpdate:
        c = plan.coeffs
        x0 = self._predict_x0(model_output, sample, c.alpha_prod_t)
        eps = self._predict_eps(model_output, sample, c.alpha_prod_t)
        pred_noised_sample = c.alpha_prod_s.sqrt() * x0 + (1 - c.alpha_prod_s).sqrt() * eps
        if plan.noise is None:
            return PlanUpdate(pred_noised_sample, pred_noised_sample, ())
        return PlanUpdate(c.sample_coeff * pred_noised_sample + c.noise_coeff * plan.noise, pred_noised_sample, ())
