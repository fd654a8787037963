"""DPM-Solver (arXiv:2206.00927) and DPM-Solver++ (arXiv:2211.01095), multistep, orders 1 to 3.

Steps are exponential integrators in lambda = log(alpha_t / sigma_t). `dpmsolver++` integrates the data prediction
x0, `dpmsolver` the noise prediction; order 2 uses the midpoint or Heun correction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from ..configuration import ConfigError
from ..utils.torch_utils import Generator
from .scheduling_utils import (
    SchedulerConfig,
    SchedulerMixin,
    SchedulerOutput,
    StepPlan,
    make_coeffs,
    sigma_to_t,
)


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepSchedulerConfig(SchedulerConfig):
    solver_order: int = 2
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    use_lu_lambdas: bool | None = False
    use_flow_sigmas: bool | None = False
    flow_shift: float = 1.0  # only read with use_flow_sigmas
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    choices: ClassVar = {
        **SchedulerConfig.choices,
        "solver_order": (1, 2, 3),
        "algorithm_type": ("dpmsolver++", "dpmsolver"),
        "solver_type": ("midpoint", "heun"),
        "use_flow_sigmas": (False, None),
        "final_sigmas_type": ("zero", "sigma_min"),
        "variance_type": (None, "learned", "learned_range"),
        "use_dynamic_shifting": (False,),
        "time_shift_type": ("exponential",),
    }

    def __post_init__(self) -> None:
        # Diffusers maps the names of DEIS / UniPC configs (when swapping from them) onto DPM-Solver++'s.
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        super().__post_init__()
        if self.algorithm_type == "dpmsolver" and self.final_sigmas_type == "zero":
            raise ConfigError(
                "DPMSolverMultistepSchedulerConfig: final_sigmas_type='zero' needs a dpmsolver++ algorithm_type; "
                "use final_sigmas_type='sigma_min' with algorithm_type='dpmsolver'"
            )


def vp_alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the variance-preserving process whose noise-to-signal ratio is `sigma`."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


class DPMSolverCoeffs(NamedTuple):
    """x_next = c_x x + c_0 m0 + c_1 (m0 - m1) + c_2 (m1 - m2) (see `_coefficients`)."""

    sigma: torch.Tensor  # sigma_i: converts the model output
    c_x: torch.Tensor
    c_0: torch.Tensor
    c_1: torch.Tensor
    c_2: torch.Tensor


class DPMSolverMultistepScheduler(SchedulerMixin):
    config_class: ClassVar[type[DPMSolverMultistepSchedulerConfig]] = DPMSolverMultistepSchedulerConfig
    _pin_zero_snr: ClassVar[bool] = True

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        n = self.config.num_train_timesteps
        alpha_t, sigma_t = torch.sqrt(self.alphas_cumprod), torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        self._set_schedule(np.linspace(0, n - 1, n, dtype=np.float32)[::-1], None, None)
        self._set_sigmas(self._train_sigmas())
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order  # converted, newest last
        self.lower_order_nums = 0  # steps taken so far, capped at solver_order: the usable history

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        cfg = self.config
        if mu is not None:
            raise ValueError(
                "DPMSolverMultistepScheduler: mu needs use_dynamic_shifting, which rapiddiff does not support"
            )
        if timesteps is not None:
            self._check_no_respacing("custom timesteps")
            if cfg.use_lu_lambdas:
                raise ValueError("DPMSolverMultistepScheduler: custom timesteps cannot be combined with use_lu_lambdas")
        n = self._resolve_steps(num_inference_steps, timesteps)
        if timesteps is None:
            timesteps = self._spaced_timesteps(n)
        timesteps = np.array(timesteps).astype(np.int64)
        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        if cfg.use_lu_lambdas and not cfg.use_karras_sigmas:
            # Lu et al.'s schedule: uniform in log-sigma between the training ends (Diffusers' `_convert_to_lu`)
            sigmas = np.exp(np.linspace(log_sigmas[-1].item(), log_sigmas[0].item(), n))
        else:
            sigmas = self._respaced_sigmas(train_sigmas[::-1], n)
        if sigmas is not None:
            timesteps = sigma_to_t(sigmas, log_sigmas)
            # Diffusers rounds Karras and Lu timesteps (not exponential / beta ones) except under the cosine schedule
            if (cfg.use_karras_sigmas or cfg.use_lu_lambdas) and cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        last = train_sigmas[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
        self._set_schedule(timesteps.astype(np.int64), device, len(timesteps))
        self._set_sigmas(np.concatenate([sigmas, [last]]).astype(np.float32))
        self._reset_history()

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        """Like `spaced_timesteps`, over n + 1 points with the last dropped, up to the lambda_min_clipped limit."""
        cfg = self.config
        clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped).item()
        last_timestep = cfg.num_train_timesteps - clipped
        if cfg.timestep_spacing == "linspace":
            return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy()
        if cfg.timestep_spacing == "leading":
            return (np.arange(0, n + 1) * (last_timestep // (n + 1))).round()[::-1][:-1] + cfg.steps_offset
        return np.arange(last_timestep, 0, -cfg.num_train_timesteps / n).round() - 1

    def _convert_model_output(
        self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """The model output at noise level `sigma` as the solver integrates it: x0 for dpmsolver++, epsilon for
        dpmsolver."""
        cfg = self.config
        if cfg.variance_type is not None:  # learned variance: the second half of the channels
            model_output = model_output[:, : sample.shape[1]]
        alpha_t, sigma_t = vp_alpha_sigma(sigma)
        kind = cfg.prediction_type
        if cfg.algorithm_type == "dpmsolver++":
            if kind == "epsilon":
                x0 = (sample - sigma_t * model_output) / alpha_t
            elif kind == "v_prediction":
                x0 = alpha_t * sample - sigma_t * model_output
            else:
                x0 = model_output
            return self._threshold_sample(x0) if cfg.thresholding else x0
        if kind == "epsilon":
            eps = model_output
        elif kind == "v_prediction":
            eps = alpha_t * model_output + sigma_t * sample
        else:
            eps = (sample - alpha_t * model_output) / sigma_t
        if cfg.thresholding:
            x0 = self._threshold_sample((sample - sigma_t * eps) / alpha_t)
            eps = (sample - alpha_t * x0) / sigma_t
        return eps

    def _lambdas(self, i: int, order: int) -> tuple[torch.Tensor, ...]:
        """(alpha, sigma, lambda) at the target sigma_{i+1}, then at sigma_i, sigma_{i-1}, ... (`order` of them)."""
        out = []
        for j in range(i + 1, i - order, -1):
            alpha, sigma = vp_alpha_sigma(self.sigmas[j])
            out.append((alpha, sigma, torch.log(alpha) - torch.log(sigma)))
        return tuple(out)

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
        """(c_x, c_0, c_1, c_2) of the update x_next = c_x x + c_0 m0 + c_1 (m0 - m1) + c_2 (m1 - m2), m0 the current
        converted output, m1 and m2 the earlier ones: the first-, second- (midpoint or Heun) and third-order
        multistep formulas of DPM-Solver(++) with their divided differences expanded."""
        lambdas = self._lambdas(i, order)
        (alpha_t, sigma_t, lambda_t), (alpha_s0, sigma_s0, lambda_s0) = lambdas[:2]
        h = lambda_t - lambda_s0
        if self.config.algorithm_type == "dpmsolver++":
            c_x, phi = sigma_t / sigma_s0, alpha_t * (torch.exp(-h) - 1.0)
            d1_coeff = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
            d2_coeff = -(alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5))
        else:
            c_x, phi = alpha_t / alpha_s0, sigma_t * (torch.exp(h) - 1.0)
            d1_coeff = -(sigma_t * ((torch.exp(h) - 1.0) / h - 1.0))
            d2_coeff = -(sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5))
        if order == 1:
            return c_x, -phi, 0.0, 0.0
        r0 = (lambda_s0 - lambdas[2][2]) / h
        if order == 2:  # D1 = (m0 - m1) / r0
            midpoint = self.config.solver_type == "midpoint"
            return c_x, -phi, (-0.5 * phi if midpoint else d1_coeff) / r0, 0.0
        # D1 = (1 + r0 / (r0 + r1)) (m0 - m1) / r0 - r0 / (r0 + r1) (m1 - m2) / r1, D2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
        r1 = (lambdas[2][2] - lambdas[3][2]) / h
        c_1 = d1_coeff * (1 + r0 / (r0 + r1)) / r0 + d2_coeff / (r0 * (r0 + r1))
        c_2 = -d1_coeff * r0 / ((r0 + r1) * r1) - d2_coeff / ((r0 + r1) * r1)
        return c_x, -phi, c_1, c_2

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, ...]:
        """One multistep update; the order drops near the end (lower_order_final, euler_at_final) as in Diffusers."""
        self._require_schedule()
        return self._run_plan(model_output, sample, self.plan_step(timestep, sample), return_dict)

    def _plan(self, i: int, sample: torch.Tensor, generator: Generator | None = None) -> StepPlan[DPMSolverCoeffs]:
        """history: the solver_order - 1 previous converted outputs, newest first (zeros, with zero coefficients,
        before there are any)."""
        history = tuple(m if m is not None else torch.zeros_like(sample) for m in self.model_outputs[:0:-1])
        c_x, c_0, c_1, c_2 = self._coefficients(i, self._order(i))
        coeffs = make_coeffs(DPMSolverCoeffs, sigma=self.sigmas[i], c_x=c_x, c_0=c_0, c_1=c_1, c_2=c_2)
        return StepPlan(i, coeffs, history=history)

    def apply_plan(
        self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[DPMSolverCoeffs]
    ) -> tuple[torch.Tensor, None, tuple[torch.Tensor, ...]]:
        c = plan.coeffs
        m = (self._convert_model_output(model_output, sample, c.sigma), *plan.history)
        prev_sample = c.c_x * sample.to(torch.float32) + c.c_0 * m[0]
        if len(m) > 1:
            prev_sample = prev_sample + c.c_1 * (m[0] - m[1])
        if len(m) > 2:
            prev_sample = prev_sample + c.c_2 * (m[1] - m[2])
        return prev_sample.to(m[0].dtype), None, (m[0],)

    def commit_plan(self, plan: StepPlan, stored: tuple[torch.Tensor, ...]) -> None:
        self.model_outputs = [*self.model_outputs[1:], stored[0]]
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        super().commit_plan(plan, stored)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_t * original + sigma_t * noise at the sigma `_sigma_for_noise` picks."""
        alpha_t, sigma_t = vp_alpha_sigma(self._sigma_for_noise(timesteps, original_samples))
        return alpha_t * original_samples + sigma_t * noise
