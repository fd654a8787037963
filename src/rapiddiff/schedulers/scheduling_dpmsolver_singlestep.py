"""DPM-Solver (arXiv:2206.00927) and DPM-Solver++ (arXiv:2211.01095), single-step, orders 1 to 3.

A single-step solver of order k spends k model evaluations on one step of the solver: steps run in groups that start
from the sample saved at the group's first step (the order list 1, 2, 3, 1, 2, 3, ...), each step ending at the next
noise level with all the group's outputs so far.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from ..utils.torch_utils import Device, Generator, randn_tensor
from .scheduling_utils import GeneratorStepMixin
from .scheduling_vp_solver import DPMSolverConfig, DPMSolverMixin, dpm_phi, vp_lambda
from .step_plan import PlanUpdate, StepPlan, make_coeffs

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DPMSolverSinglestepSchedulerConfig(DPMSolverConfig):
    lower_order_final: bool = False

    choices: ClassVar = {"algorithm_type": ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")}
    # Diffusers' single-step solver has no timestep_spacing / steps_offset keys (it spaces like "linspace"): other
    # schedulers' values are kept aside, as for any key the class does not have.
    _not_keys: ClassVar[tuple[str, ...]] = ("timestep_spacing", "steps_offset")

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return tuple(name for name in super()._field_names() if name not in cls._not_keys)


class DPMSolverSinglestepCoeffs(NamedTuple):
    """x_next = c_x start + c_0 m0 + c_1 (m1 - m0) + c_2 (m2 - m0) + noise_std noise, m0 this step's converted output,
    m1 and m2 the earlier ones of the group; start is this step's sample on the group's first step (from_sample = 1),
    else the sample saved there."""

    sigma: torch.Tensor  # sigma_i: converts the model output
    from_sample: torch.Tensor
    c_x: torch.Tensor
    c_0: torch.Tensor
    c_1: torch.Tensor
    c_2: torch.Tensor
    noise_std: torch.Tensor


class DPMSolverSinglestepScheduler(GeneratorStepMixin, DPMSolverMixin):
    config_class: ClassVar[type[DPMSolverSinglestepSchedulerConfig]] = DPMSolverSinglestepSchedulerConfig

    def _reset_history(self) -> None:
        super()._reset_history()
        self.sample: torch.Tensor | None = None  # the sample at the current group's first step

    def _install(self, timesteps: np.ndarray, sigmas: np.ndarray, last: float, device: Device) -> None:
        super()._install(timesteps, sigmas, last, device)
        self.order_list = self.get_order_list(len(timesteps))

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """The solver order of each step: groups 1, 2, ..., solver_order; shorter groups at the end with
        lower_order_final (forced, with a warning as in Diffusers, for an uneven step count or a zero final sigma)."""
        cfg, steps, order = self.config, num_inference_steps, self.config.solver_order
        lower_order_final = cfg.lower_order_final
        if not lower_order_final and (steps % order != 0 or cfg.final_sigmas_type == "zero"):
            logger.warning(
                "DPMSolverSinglestepScheduler: using lower_order_final=True for %d steps of order %d with "
                "final_sigmas_type=%r, as Diffusers does",
                steps,
                order,
                cfg.final_sigmas_type,
            )
            lower_order_final = True
        group = list(range(1, order + 1))
        if lower_order_final:
            full, rest = divmod(steps, order)
            if order == 3 and rest == 0:
                orders = group * (full - 1) + [1, 2] + [1]
            elif order == 2 and rest == 0:
                orders = group * (full - 1) + [1, 1]
            else:
                orders = group * full + group[:rest]
        else:
            orders = group * (steps // order)
        if cfg.final_sigmas_type == "zero":
            orders[-1] = 1
        return orders

    def _order(self, i: int) -> int:
        order = self.order_list[i]
        while order > 1 and self.model_outputs[1 - order] is None:  # too few earlier outputs (a mid-schedule start)
            order -= 1
        return order

    def _coefficients(self, i: int, order: int) -> tuple[torch.Tensor | float, ...]:
        """(c_x, c_0, c_1, c_2, noise_std) of `DPMSolverSinglestepCoeffs` for a step of `order` ending at
        sigma_{i+1}: the group started at sigma_{i+1-order}."""
        alpha_t, sigma_t, lambda_t = vp_lambda(self.sigmas[i + 1])
        alpha_s, sigma_s, lambda_s = vp_lambda(self.sigmas[i + 1 - order])
        h = lambda_t - lambda_s
        c_x, c_0, d1, d2, noise_std = dpm_phi(self.config.algorithm_type, alpha_t, sigma_t, alpha_s, sigma_s, h)
        if order == 1:
            return c_x, c_0, 0.0, 0.0, noise_std
        midpoint = self.config.solver_type == "midpoint"
        r0 = (vp_lambda(self.sigmas[i])[2] - lambda_s) / h
        if order == 2:  # c_0 m1 + w (m0 - m1), w the weight of D1 = (m0 - m1) / r0
            w = (0.5 * c_0 if midpoint else d1) / r0
            return c_x, c_0, c_0 - w, 0.0, noise_std
        # D0 = m2, D1_0 = (m1 - m2) / r1, D1_1 = (m0 - m2) / r0, D1 = (r0 D1_0 - r1 D1_1) / (r0 - r1),
        # D2 = 2 (D1_1 - D1_0) / (r0 - r1): the weights w_a of (m0 - m2) and w_b of (m1 - m2)
        r1 = (vp_lambda(self.sigmas[i - 1])[2] - lambda_s) / h
        if midpoint:  # D1_1 only
            w_a, w_b = d1 / r0, 0.0
        else:
            w_a = -d1 * r1 / (r0 * (r0 - r1)) + d2 * 2.0 / (r0 * (r0 - r1))
            w_b = d1 * r0 / (r1 * (r0 - r1)) - d2 * 2.0 / (r1 * (r0 - r1))
        return c_x, c_0, w_b, c_0 - w_a - w_b, noise_std

    def _plan(self, i: int, sample: torch.Tensor, generator: Generator | None) -> StepPlan[DPMSolverSinglestepCoeffs]:
        """One step of the current group; sde-dpmsolver++ draws its noise with `generator`.

        history: the solver_order - 1 earlier converted outputs, newest first, then the group's saved sample
        (zeros, weighted 0, while missing)."""
        order = self._order(i)
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        c_x, c_0, c_1, c_2, noise_std = self._coefficients(i, order)
        coeffs = make_coeffs(
            DPMSolverSinglestepCoeffs,
            sigma=self.sigmas[i],
            from_sample=float(order == 1),
            c_x=c_x,
            c_0=c_0,
            c_1=c_1,
            c_2=c_2,
            noise_std=noise_std,
        )
        saved = self.sample if self.sample is not None else torch.zeros_like(sample)
        return StepPlan(i, coeffs, noise, history=(*self._history(sample, self.config.solver_order - 1), saved))

    def apply_plan(
        self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[DPMSolverSinglestepCoeffs]
    ) -> PlanUpdate:
        c = plan.coeffs
        *earlier, saved = plan.history
        m0 = self._dpm_convert(model_output, sample, c.sigma)
        start = torch.where(c.from_sample > 0, sample, saved)
        prev_sample = c.c_x * start + c.c_0 * m0
        for weight, m_k in zip((c.c_1, c.c_2), earlier):
            prev_sample = prev_sample + weight * (m_k - m0)
        if plan.noise is not None:
            prev_sample = prev_sample + c.noise_std * plan.noise
        return PlanUpdate(prev_sample, None, (m0, start))

    def commit_plan(self, plan: StepPlan, stored: tuple[torch.Tensor, ...]) -> None:
        self.sample = stored[1]
        super().commit_plan(plan, stored)
