"""DEIS (Zhang & Chen, arXiv:2204.13902): multistep exponential integrator in log-rho, orders 1 to 3.

The noise prediction is integrated over rho = sigma_t / alpha_t with a polynomial through the last outputs; the
polynomial's integrals (the `ind_fn` of Diffusers) are computed on the host for each step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch

from ..utils.torch_utils import Device
from .scheduler_config import SolverConfig
from .scheduling_vp_solver import VPSolverMixin, vp_alpha_sigma, vp_lambda
from .step_plan import PlanUpdate, StepPlan, make_coeffs


@dataclasses.dataclass(frozen=True)
class DEISMultistepSchedulerConfig(SolverConfig):
    algorithm_type: str = "deis"
    solver_type: str = "logrho"

    choices: ClassVar = {"algorithm_type": ("deis",), "solver_type": ("logrho",)}

    def __post_init__(self) -> None:
        # Diffusers maps DPM-Solver's and UniPC's names (when swapping from their configs) onto DEIS's.
        if self.algorithm_type in ("dpmsolver", "dpmsolver++"):
            object.__setattr__(self, "algorithm_type", "deis")
        if self.solver_type in ("midpoint", "heun", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "logrho")
        super().__post_init__()


class DEISCoeffs(NamedTuple):
    """x_next = alpha_t * (x / alpha_s0 + w0 m0 + w1 m1 + w2 m2), m0 this step's noise prediction, m1 and m2 the
    earlier ones."""

    sigma: torch.Tensor  # sigma_i: converts the model output
    alpha_t: torch.Tensor
    alpha_s0: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor


def _ind_2(t: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Diffusers' second-order `ind_fn` (on tensors: it takes np.log of CPU tensors, a host read of their values)."""
    log = torch.log
    return t * (-log(c) + log(t) - 1) / (log(b) - log(c))


def _ind_3(t: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Diffusers' third-order `ind_fn`."""
    log = torch.log
    numerator = t * (log(c) * (log(d) - log(t) + 1) - log(d) * log(t) + log(d) + log(t) ** 2 - 2 * log(t) + 2)
    return numerator / ((log(b) - log(c)) * (log(b) - log(d)))


def _weights(ind: Callable[..., torch.Tensor], rho_t: torch.Tensor, rhos: list[torch.Tensor]) -> list[torch.Tensor]:
    """The integral from rho_s0 to rho_t of each Lagrange basis polynomial through `rhos` (rho_s0 first)."""
    out = []
    for k in range(len(rhos)):
        others = rhos[k + 1 :] + rhos[:k]  # Diffusers' argument order: the node, then the others in turn
        out.append(ind(rho_t, rhos[k], *others) - ind(rhos[0], rhos[k], *others))
    return out


class DEISMultistepScheduler(VPSolverMixin):
    config_class: ClassVar[type[DEISMultistepSchedulerConfig]] = DEISMultistepSchedulerConfig

    def set_timesteps(self, num_inference_steps: int, device: Device = None, mu: float | None = None) -> None:
        self._check_mu(mu)
        self._install_multistep_schedule(num_inference_steps, device)

    def _order(self, i: int) -> int:
        cfg = self.config
        n = len(self._timestep_values)
        few_steps = cfg.lower_order_final and n < 15
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or (i == n - 1 and few_steps):
            return 1
        if cfg.solver_order == 2 or self.lower_order_nums < 2 or (i == n - 2 and few_steps):
            return 2
        return 3

    def _plan(self, i: int, sample: torch.Tensor) -> StepPlan[DEISCoeffs]:
        """history: the solver_order - 1 earlier noise predictions, newest first (zeros, weighted 0, while missing)."""
        order = self._order(i)
        alpha_t, sigma_t, lambda_t = vp_lambda(self.sigmas[i + 1])
        alpha_s0, sigma_s0, lambda_s0 = vp_lambda(self.sigmas[i])
        if order == 1:  # (alpha_t / alpha_s0) x - sigma_t (e^h - 1) m0
            weights = [-(sigma_t * (torch.exp(lambda_t - lambda_s0) - 1.0)) / alpha_t]
        else:
            rhos = [sigma / alpha for alpha, sigma in (vp_alpha_sigma(self.sigmas[i - k]) for k in range(order))]
            weights = _weights(_ind_2 if order == 2 else _ind_3, sigma_t / alpha_t, rhos)
        w0, w1, w2 = (*weights, 0.0, 0.0)[:3]
        coeffs = make_coeffs(DEISCoeffs, sigma=self.sigmas[i], alpha_t=alpha_t, alpha_s0=alpha_s0, w0=w0, w1=w1, w2=w2)
        return StepPlan(i, coeffs, history=self._history(sample, self.config.solver_order - 1))

    def apply_plan(self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[DEISCoeffs]) -> PlanUpdate:
        c = plan.coeffs
        x0 = self._vp_x0(model_output, sample, c.sigma)
        x0 = self._threshold_sample(x0) if self.config.thresholding else x0
        alpha_t, sigma_t = vp_alpha_sigma(c.sigma)
        eps = (sample - alpha_t * x0) / sigma_t
        update = sample / c.alpha_s0 + c.w0 * eps
        for weight, m_k in zip((c.w1, c.w2), plan.history):
            update = update + weight * m_k
        return PlanUpdate(c.alpha_t * update, None, (eps,))
