"""PNDM (Liu et al., arXiv:2202.09778): Runge-Kutta warm-up steps, then a 4th-order linear multistep (PLMS).

Stable Diffusion 1.x uses `skip_prk_steps=True`: PLMS from the start, warmed up with lower-order formulas
(crowsonkb's PLMS sampler).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from ..utils.torch_utils import Device
from .schedule_tables import spaced_timesteps
from .scheduling_utils import SchedulerConfig, SchedulerMixin
from .step_plan import PlanUpdate, SchedulerOutput, StepPlan, make_coeffs


@dataclasses.dataclass(frozen=True)
class PNDMSchedulerConfig(SchedulerConfig):
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False

    choices: ClassVar = {"prediction_type": ("epsilon", "v_prediction")}


class PLMSCoeffs(NamedTuple):
    alpha_prod_t: torch.Tensor  # alphas_cumprod at t
    alpha_prod_t_prev: torch.Tensor  # ... at the previous timestep
    w0: torch.Tensor  # Adams-Bashforth weight of the current output
    w1: torch.Tensor  # ... of the last three stored ones, newest first
    w2: torch.Tensor
    w3: torch.Tensor
    from_saved: torch.Tensor  # 1: start from the sample saved at the first step (the second step), else 0


class PNDMScheduler(SchedulerMixin):
    config_class: ClassVar[type[PNDMSchedulerConfig]] = PNDMSchedulerConfig
    pndm_order: ClassVar[int] = 4

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.timesteps = None
        self._reset_history()

    def _reset_history(self) -> None:
        self.counter = 0  # steps taken since set_timesteps: selects the PRK / PLMS formula
        self.ets: list[torch.Tensor] = []  # past model outputs (copies), newest last
        self.cur_model_output: float | torch.Tensor = 0  # PRK: weighted sum of the 4 evaluations
        self.cur_sample: torch.Tensor | None = None  # sample at the start of the current multi-evaluation step

    def set_timesteps(self, num_inference_steps: int, device: Device = None) -> None:
        n = self._check_num_inference_steps(num_inference_steps)
        cfg = self.config
        ascending = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset)[::-1]
        if cfg.skip_prk_steps:
            # the second-to-last timestep is repeated: PLMS's second step re-evaluates it (see _step_plms)
            self.prk_timesteps = np.array([])
            self.plms_timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
        else:
            half_step = np.tile(np.array([0, cfg.num_train_timesteps // n // 2]), self.pndm_order)
            prk = np.array(ascending[-self.pndm_order :]).repeat(2) + half_step
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = ascending[:-3][::-1].copy()
        self._set_schedule(np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64), device, n)
        self._reset_history()

    def step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple[torch.Tensor, ...]:
        """A Runge-Kutta or PLMS step. As in Diffusers, a timestep outside the schedule is stepped from its own value
        (the history and the step counter move on as for any step)."""
        self._require_schedule()
        off_schedule = self._off_schedule_value(timestep)
        if off_schedule is not None:
            i, t = self._step_index or 0, int(off_schedule)
        else:
            i = self._index(timestep)
            t = self._timestep_values[i]
        if not self._in_prk_steps():
            return self._run_plan(model_output, sample, self._plan_at(i, t, sample), return_dict)
        prev_sample = self._step_prk(model_output, t, sample)
        self.counter += 1
        self._step_index = i + 1
        return self._output(prev_sample, None, return_dict)

    def _in_prk_steps(self) -> bool:
        return self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps

    def _step_prk(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """One of the 4 Runge-Kutta evaluations: weights 1/6, 1/3, 1/3, 1/6 over full and half steps."""
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_t = t - (0 if self.counter % 2 else half)
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * model_output
            self.ets.append(model_output.clone())
            self.cur_sample = sample.clone()
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        return self._prev_sample(cur_sample, self.alphas_cumprod[t], self._alpha_prod(prev_t), model_output)

    def _plan(self, i: int, sample: torch.Tensor) -> StepPlan[PLMSCoeffs]:
        return self._plan_at(i, self._timestep_values[i], sample)

    def _plan_at(self, i: int, t: int, sample: torch.Tensor) -> StepPlan[PLMSCoeffs]:
        """A PLMS step (step i of the schedule, at training timestep t): Adams-Bashforth over the stored outputs, of
        order 1 to 4 as the history fills.

        history: the last three stored outputs, newest first, and the sample saved at the first step (zeros, weighted
        0, while missing)."""
        if self._in_prk_steps():
            raise ValueError(
                "PNDMScheduler(skip_prk_steps=False): its Runge-Kutta warm-up steps keep Python state a compiled "
                "step cannot take; use skip_prk_steps=True (Stable Diffusion's setting)"
            )
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("PNDMScheduler: PLMS steps need the 12 Runge-Kutta steps first (skip_prk_steps=False)")
        step = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - step
        if self.counter == 1:
            # second step: redo the first interval with the average of both outputs (a Heun step)
            prev_t, t = t, t + step
            weights = (0.5, 0.5, 0.0, 0.0)
        else:
            weights = PLMS_WEIGHTS[min(len(self.ets), 3)]
        # distinct zero tensors: a compiled step guards on which of its inputs alias
        stored = [*self.ets[::-1], *(torch.zeros_like(sample) for _ in range(3 - len(self.ets)))][:3]
        cur_sample = self.cur_sample if self.cur_sample is not None else torch.zeros_like(sample)
        w0, w1, w2, w3 = weights
        coeffs = make_coeffs(
            PLMSCoeffs,
            alpha_prod_t=self.alphas_cumprod[t],
            alpha_prod_t_prev=self._alpha_prod(prev_t),
            w0=w0,
            w1=w1,
            w2=w2,
            w3=w3,
            from_saved=float(self.counter == 1),
        )
        return StepPlan(i, coeffs, history=(*stored, cur_sample))

    def apply_plan(self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[PLMSCoeffs]) -> PlanUpdate:
        c = plan.coeffs
        e1, e2, e3, saved_sample = plan.history
        eps = c.w0 * model_output + c.w1 * e1 + c.w2 * e2 + c.w3 * e3
        start = torch.where(c.from_saved > 0, saved_sample, sample)
        return PlanUpdate(
            self._prev_sample(start, c.alpha_prod_t, c.alpha_prod_t_prev, eps), None, (model_output, sample)
        )

    def commit_plan(self, plan: StepPlan, stored: tuple[torch.Tensor, ...]) -> None:
        model_output, sample = stored
        if self.counter == 0:
            self.cur_sample = sample
        elif self.counter == 1:
            self.cur_sample = None
        if self.counter != 1:
            self.ets = [*self.ets[-3:], model_output]
        self.counter += 1
        super().commit_plan(plan, stored)

    def _prev_sample(
        self,
        sample: torch.Tensor,
        alpha_prod_t: torch.Tensor,
        alpha_prod_t_prev: torch.Tensor,
        model_output: torch.Tensor,
    ) -> torch.Tensor:
        """x_{t-delta} from x_t and an epsilon estimate: formula (9) of the PNDM paper."""
        eps = self._predict_eps(model_output, sample, alpha_prod_t)
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        eps_denom = alpha_prod_t * beta_prod_t_prev**0.5 + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** 0.5
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * eps / eps_denom


# Adams-Bashforth weights of the current output and the last three stored ones (newest first), by how many are stored.
PLMS_WEIGHTS = {
    0: (1.0, 0.0, 0.0, 0.0),
    1: (3 / 2, -1 / 2, 0.0, 0.0),
    2: (23 / 12, -16 / 12, 5 / 12, 0.0),
    3: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
