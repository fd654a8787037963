"""Linear multistep (LMS) in sigma space (k-diffusion's `sample_lms`): Adams-Bashforth over the last `order`
derivatives dx/dsigma, with coefficients that integrate their Lagrange polynomials over each step."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from ..utils.torch_utils import Device
from .schedule_tables import karras_sigmas
from .scheduler_config import SigmaSpacingConfig
from .scheduling_euler_discrete import EulerSchedulerMixin
from .step_plan import PlanUpdate, SchedulerOutput, StepPlan, make_coeffs

MAX_ORDER = 4  # the history a plan carries (Diffusers' default order)


@dataclasses.dataclass(frozen=True)
class LMSDiscreteSchedulerConfig(SigmaSpacingConfig):
    pass


class LMSCoeffs(NamedTuple):
    sigma: torch.Tensor  # sigma_i
    c0: torch.Tensor  # weight of this step's derivative
    c1: torch.Tensor  # weights of the three previous derivatives, newest first (0 where unused)
    c2: torch.Tensor
    c3: torch.Tensor


# QUADPACK's 21-point Gauss-Kronrod rule (qk21) on [-1, 1]: nodes (the 11 non-negative ones) and weights.
_K21_NODES = (
    0.995657163025808080735527280689003, 0.973906528517171720077964012084452, 0.930157491355708226001207180059508,
    0.865063366688984510732096688423493, 0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
    0.562757134668604683339000099272694, 0.433395394129247190799265943165784, 0.294392862701460198131126603103866,
    0.148874338981631210884826001129720, 0.0,
)  # fmt: skip
_K21_WEIGHTS = (
    0.011694638867371874278064396062192, 0.032558162307964727478818972459390, 0.054755896574351996031381300244580,
    0.075039674810919952767043140916190, 0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
    0.123491976262065851077208067447445, 0.134709217311473325928054001771707, 0.142775938577060080797094273138717,
    0.147739104901338491374841515972068, 0.149445554002916905664936468389821,
)  # fmt: skip


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """The integral from sigma_i to sigma_{i+1} of each Lagrange basis polynomial through sigma_i, sigma_{i-1}, ...
    (`order` points), computed as Diffusers computes it: its float32 integrand at the nodes of the 21-point
    Gauss-Kronrod rule that `scipy.integrate.quad` applies first and accepts for a polynomial (so that the steps
    agree to float32 rounding; a more exact rule would differ from Diffusers by ~1e-7 of sigma_max). `sigmas`: the
    schedule's float32 values as Python numbers (no tensor is read)."""
    a, b = sigmas[i], sigmas[i + 1]
    nodes = np.array(_K21_NODES)
    taus = np.concatenate([(a + b) / 2 - (b - a) / 2 * nodes, (a + b) / 2 + (b - a) / 2 * nodes[:-1]])
    taus = taus.astype(np.float32)
    weights = np.concatenate([_K21_WEIGHTS, _K21_WEIGHTS[:-1]])
    points = np.array([sigmas[i - k] for k in range(order)], dtype=np.float32)
    out = []
    for j in range(order):
        basis = np.ones_like(taus)
        for k in range(order):
            if k != j:
                basis = basis * ((taus - points[k]) / (points[j] - points[k]))
        out.append(float(np.sum(weights * basis.astype(np.float64)) * (b - a) / 2))
    return out


class LMSDiscreteScheduler(EulerSchedulerMixin):
    config_class: ClassVar[type[LMSDiscreteSchedulerConfig]] = LMSDiscreteSchedulerConfig

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.derivatives: list[torch.Tensor] = []
        self._schedule_training_timesteps()

    def set_timesteps(self, num_inference_steps: int, device: Device = None) -> None:
        n = self._check_num_inference_steps(num_inference_steps)
        timesteps, sigmas = self._respaced_schedule(n)
        self._set_schedule(timesteps, device, n, dtype=torch.float32)
        self._set_sigmas(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.derivatives = []

    def _respaced_sigmas(self, sigmas: np.ndarray, n: int) -> np.ndarray | None:
        if self.config.use_karras_sigmas:  # Diffusers' LMS spans the spaced sigmas, whatever config.sigma_min says
            return karras_sigmas(sigmas[-1].item(), sigmas[0].item(), n)
        return super()._respaced_sigmas(sigmas, n)

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """Diffusers' name: the weight of the derivative `current_order` steps back, for an `order`-step formula."""
        return lms_coefficients(self._sigma_values, t, order)[current_order]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        order: int = 4,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, ...]:
        return self._step(model_output, timestep, sample, return_dict, order=order)

    def _plan(self, i: int, sample: torch.Tensor, order: int) -> StepPlan[LMSCoeffs]:
        """history: the three previous derivatives, newest first (distinct zeros while missing).

        As in Diffusers the formula's order is min(i + 1, order), and only as many weights are used as there are
        derivatives (after an img2img start the first steps use the current one alone, with its higher-order
        weight)."""
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
            raise ValueError(f"LMSDiscreteScheduler.step: order must be an int in [1, {MAX_ORDER}], got {order!r}")
        effective = min(i + 1, order)
        previous = self.derivatives[::-1][: order - 1]
        used = min(effective, 1 + len(previous))
        weights = lms_coefficients(self._sigma_values, i, effective)[:used]
        weights += [0.0] * (MAX_ORDER - used)
        history = (*previous, *(torch.zeros_like(sample) for _ in range(MAX_ORDER - 1 - len(previous))))
        coeffs = make_coeffs(
            LMSCoeffs, sigma=self.sigmas[i], c0=weights[0], c1=weights[1], c2=weights[2], c3=weights[3]
        )
        return StepPlan(i, coeffs, history=history, options={"order": order})

    def apply_plan(self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[LMSCoeffs]) -> PlanUpdate:
        c = plan.coeffs
        x0 = self._predict_x0_ve(model_output, sample, c.sigma, c.sigma)
        derivative = (sample - x0) / c.sigma
        d1, d2, d3 = plan.history
        prev_sample = sample + (c.c0 * derivative + c.c1 * d1 + c.c2 * d2 + c.c3 * d3)
        return PlanUpdate(prev_sample, x0, (derivative,))

    def commit_plan(self, plan: StepPlan, stored: tuple[torch.Tensor, ...]) -> None:
        self.derivatives = [*self.derivatives, stored[0]][-plan.options["order"] :]
        super().commit_plan(plan, stored)
