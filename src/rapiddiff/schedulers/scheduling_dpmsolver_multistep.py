"""DPM-Solver (arXiv:2206.00927) and DPM-Solver++ (arXiv:2211.01095), multistep, orders 1 to 3.

Steps are exponential integrators in lambda = log(alpha_t / sigma_t). `dpmsolver++` integrates the data prediction
x0, `dpmsolver` the noise prediction; order 2 uses the midpoint or Heun correction. The `sde-` variants (DPM-Solver++
SDE, "DPM++ 2M SDE") solve the reverse SDE instead: the same updates with fresh noise every step.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from ..configuration import ConfigError
from ..utils.torch_utils import Generator, randn_tensor
from .schedule_tables import sigma_to_t
from .scheduling_vp_solver import DPMSolverConfig, DPMSolverMixin, dpm_phi, vp_lambda
from .step_plan import PlanUpdate, SchedulerOutput, StepPlan, make_coeffs


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepSchedulerConfig(DPMSolverConfig):
    euler_at_final: bool = False
    use_lu_lambdas: bool | None = False
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm_type == "sde-dpmsolver" and self.solver_order == 3:
            raise ConfigError(
                "DPMSolverMultistepSchedulerConfig: solver_order=3 has no algorithm_type='sde-dpmsolver' update "
                "(Diffusers fails at the third step); use solver_order=2 or algorithm_type='sde-dpmsolver++'"
            )


class DPMSolverCoeffs(NamedTuple):
    """x_next = c_x x + c_0 m0 + c_1 (m0 - m1) + c_2 (m1 - m2) (see `_coefficients`)."""

    sigma: torch.Tensor  # sigma_i: converts the model output
    c_x: torch.Tensor
    c_0: torch.Tensor
    c_1: torch.Tensor
    c_2: torch.Tensor
    noise_std: torch.Tensor  # the SDE variants' fresh noise (0 for the ODE ones)


class DPMSolverMultistepScheduler(DPMSolverMixin):
    config_class: ClassVar[type[DPMSolverMultistepSchedulerConfig]] = DPMSolverMultistepSchedulerConfig

    def _respaced_schedule(
        self, timesteps: np.ndarray, n: int, round_karras: bool
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """As the base's, and Lu et al.'s schedule with use_lu_lambdas: uniform in log-sigma between the training ends
        (Diffusers' `_convert_to_lu`). Diffusers rounds Karras and Lu timesteps (not exponential / beta ones) except
        under the cosine schedule."""
        cfg = self.config
        if cfg.use_lu_lambdas and not cfg.use_karras_sigmas:
            log_sigmas = np.log(self._train_sigmas())
            sigmas = np.exp(np.linspace(log_sigmas[-1].item(), log_sigmas[0].item(), n))
            timesteps, respaced = sigma_to_t(sigmas, log_sigmas), True
        else:
            timesteps, sigmas, respaced = super()._respaced_schedule(timesteps, n, round_karras=False)
        if respaced and (cfg.use_karras_sigmas or cfg.use_lu_lambdas) and cfg.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        return timesteps, sigmas, respaced

    def _lambdas(self, i: int, order: int) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]:
        """(alpha, sigma, lambda) at the target sigma_{i+1}, then at sigma_i, sigma_{i-1}, ... (`order` of them)."""
        return tuple(vp_lambda(self.sigmas[j]) for j in range(i + 1, i - order, -1))

    def _order(self, i: int) -> int:
        """The solver order of step i: lower at the start (too little history) and, as configured, at the end."""
        cfg = self.config
        n = len(self._timestep_values)
        few_steps = cfg.lower_order_final and n < 15
        final = i == n - 1 and (cfg.euler_at_final or few_steps or cfg.final_sigmas_type == "zero")
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or final:
            return 1
        if cfg.solver_order == 2 or self.lower_order_nums < 2 or (i == n - 2 and few_steps):
            return 2
        return 3

    def _coefficients(self, i: int, order: int) -> tuple[torch.Tensor | float, ...]:
        """(c_x, c_0, c_1, c_2, noise_std) of the update x_next = c_x x + c_0 m0 + c_1 (m0 - m1) + c_2 (m1 - m2)
        + noise_std * noise, m0 the current converted output, m1 and m2 the earlier ones: the first-, second-
        (midpoint or Heun) and third-order multistep formulas of DPM-Solver(++) and its SDE variants, with their
        divided differences expanded."""
        lambdas = self._lambdas(i, order)
        (alpha_t, sigma_t, lambda_t), (alpha_s0, sigma_s0, lambda_s0) = lambdas[:2]
        h = lambda_t - lambda_s0
        c_x, c_0, d1_coeff, d2_coeff, noise_std = dpm_phi(
            self.config.algorithm_type, alpha_t, sigma_t, alpha_s0, sigma_s0, h
        )
        if order == 1:
            return c_x, c_0, 0.0, 0.0, noise_std
        r0 = (lambda_s0 - lambdas[2][2]) / h
        if order == 2:  # D1 = (m0 - m1) / r0; the midpoint rule weighs it by half of c_0
            midpoint = self.config.solver_type == "midpoint"
            return c_x, c_0, (0.5 * c_0 if midpoint else d1_coeff) / r0, 0.0, noise_std
        # D1 = (1 + r0 / (r0 + r1)) (m0 - m1) / r0 - r0 / (r0 + r1) (m1 - m2) / r1, D2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
        r1 = (lambdas[2][2] - lambdas[3][2]) / h
        c_1 = d1_coeff * (1 + r0 / (r0 + r1)) / r0 + d2_coeff / (r0 * (r0 + r1))
        c_2 = -d1_coeff * r0 / ((r0 + r1) * r1) - d2_coeff / ((r0 + r1) * r1)
        return c_x, c_0, c_1, c_2, noise_std

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, ...]:
        """One multistep update; the order drops near the end (lower_order_final, euler_at_final) as in Diffusers.
        The SDE variants draw their noise with `generator` (float32, as Diffusers), or take `variance_noise`."""
        return self._step(
            model_output, timestep, sample, return_dict, generator=generator, variance_noise=variance_noise
        )

    def _plan(
        self, i: int, sample: torch.Tensor, generator: Generator | None, variance_noise: torch.Tensor | None
    ) -> StepPlan[DPMSolverCoeffs]:
        """history: the solver_order - 1 previous converted outputs, newest first (zeros, with zero coefficients,
        before there are any)."""
        noise = None
        if self.config.algorithm_type.startswith("sde-"):
            if variance_noise is not None:
                noise = variance_noise.to(device=sample.device, dtype=torch.float32)
            else:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        c_x, c_0, c_1, c_2, noise_std = self._coefficients(i, self._order(i))
        coeffs = make_coeffs(
            DPMSolverCoeffs, sigma=self.sigmas[i], c_x=c_x, c_0=c_0, c_1=c_1, c_2=c_2, noise_std=noise_std
        )
        return StepPlan(i, coeffs, noise, history=self._history(sample, self.config.solver_order - 1))

    def apply_plan(
        self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[DPMSolverCoeffs]
    ) -> PlanUpdate:
        c = plan.coeffs
        m = (self._dpm_convert(model_output, sample, c.sigma), *plan.history)
        prev_sample = c.c_x * sample.to(torch.float32) + c.c_0 * m[0]
        if len(m) > 1:
            prev_sample = prev_sample + c.c_1 * (m[0] - m[1])
        if len(m) > 2:
            prev_sample = prev_sample + c.c_2 * (m[1] - m[2])
        if plan.noise is not None:
            prev_sample = prev_sample + c.noise_std * plan.noise
        return PlanUpdate(prev_sample.to(m[0].dtype), None, (m[0],))
