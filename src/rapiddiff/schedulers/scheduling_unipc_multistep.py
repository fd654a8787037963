"""UniPC (Zhao et al., arXiv:2302.04867): a multistep predictor (UniP) and corrector (UniC), orders 1 to 3.

Each step first corrects the previous step's result with the new model output (UniC), then predicts the next sample
(UniP); both are exponential integrators in lambda whose weights (rhos) solve a small linear system per step - on the
host here, so that the device only sees a fixed linear combination of the sample, the saved sample and the history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch

from ..configuration import ConfigError
from ..utils.torch_utils import Device
from .scheduler_config import SolverConfig
from .scheduling_vp_solver import VPSolverMixin, vp_lambda
from .step_plan import PlanUpdate, StepPlan, make_coeffs


@dataclasses.dataclass(frozen=True)
class UniPCMultistepSchedulerConfig(SolverConfig):
    predict_x0: bool = True
    solver_type: str = "bh2"
    disable_corrector: tuple[int, ...] = ()
    solver_p: None = None
    final_sigmas_type: str = "zero"
    rescale_betas_zero_snr: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    shift_terminal: float | None = None

    choices: ClassVar = {
        "solver_type": ("bh1", "bh2"),
        "solver_p": (None,),
        "final_sigmas_type": ("zero", "sigma_min"),
        "shift_terminal": (None,),
    }

    def __post_init__(self) -> None:
        # Diffusers maps the solver types of DPM-Solver / DEIS configs (when swapping from them) onto bh2.
        if self.solver_type in ("midpoint", "heun", "logrho"):
            object.__setattr__(self, "solver_type", "bh2")
        super().__post_init__()
        if any(isinstance(i, bool) or not isinstance(i, int) for i in self.disable_corrector):
            raise ConfigError(
                f"UniPCMultistepSchedulerConfig: disable_corrector must list step indices (ints), "
                f"got {list(self.disable_corrector)}"
            )


class UniPCCoeffs(NamedTuple):
    """corrected = cc_x x_saved + cc_m0 m0 + cc_1 (m1 - m0) + cc_2 (m2 - m0) + cc_t (m_t - m0) when use_corrector,
    else the sample; prev = pc_x corrected + pc_0 m_t + pc_1 (m0 - m_t) + pc_2 (m1 - m_t). m_t is this step's
    converted output, m0, m1, m2 the earlier ones (newest first), x_saved the previous step's corrected sample."""

    sigma: torch.Tensor  # sigma_i: converts the model output
    use_corrector: torch.Tensor  # 1 or 0
    cc_x: torch.Tensor
    cc_m0: torch.Tensor
    cc_1: torch.Tensor
    cc_2: torch.Tensor
    cc_t: torch.Tensor
    pc_x: torch.Tensor
    pc_0: torch.Tensor
    pc_1: torch.Tensor
    pc_2: torch.Tensor


class UniPCMultistepScheduler(VPSolverMixin):
    config_class: ClassVar[type[UniPCMultistepSchedulerConfig]] = UniPCMultistepSchedulerConfig

    def _reset_history(self) -> None:
        super()._reset_history()
        self.last_sample: torch.Tensor | None = None  # the previous step's (corrected) sample: UniC starts there
        self.this_order = 1  # the previous predictor's order: the next corrector's

    @property
    def predict_x0(self) -> bool:
        return self.config.predict_x0

    @property
    def disable_corrector(self) -> list[int]:
        return list(self.config.disable_corrector)

    @property
    def solver_p(self) -> None:
        return None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Device = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        if sigmas is not None:
            raise ValueError(
                "UniPCMultistepScheduler: custom sigmas need use_flow_sigmas, which rapiddiff does not support"
            )
        self._check_mu(mu)
        self._install_multistep_schedule(num_inference_steps, device)

    # --- the step ---------------------------------------------------------------------------------------------
    def _order(self, i: int) -> int:
        """The predictor's order at step i: warming up with the history, lower at the end (lower_order_final)."""
        cfg = self.config
        order = min(cfg.solver_order, len(self._timestep_values) - i) if cfg.lower_order_final else cfg.solver_order
        return min(order, self.lower_order_nums + 1)

    def _bh_update(
        self, t: int, s0: int, earlier: Sequence[int], order: int, corrector: bool
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The UniP / UniC update from sigma index s0 to t, with the outputs at indices `earlier` (newest first):
        (coefficient of x, of m0, [coefficients of (m_k - m0) for each earlier output, then - for UniC - of the
        new output's (m_t - m0)])."""
        alpha_t, sigma_t, lambda_t = vp_lambda(self.sigmas[t])
        alpha_s0, sigma_s0, lambda_s0 = vp_lambda(self.sigmas[s0])
        h = lambda_t - lambda_s0
        rks = [(vp_lambda(self.sigmas[si])[2] - lambda_s0) / h for si in earlier[: order - 1]]
        rks_all = torch.stack([*rks, torch.ones(())])
        hh = -h if self.config.predict_x0 else h
        h_phi_1 = torch.expm1(hh)  # h * phi_1(h) = e^h - 1
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        factorial = 1
        rows, b = [], []
        for k in range(1, order + 1):
            rows.append(torch.pow(rks_all, k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        big_r, b = torch.stack(rows), torch.stack(b)
        if self.config.predict_x0:
            c_x, c_m0, scale = sigma_t / sigma_s0, -alpha_t * h_phi_1, alpha_t * b_h
        else:
            c_x, c_m0, scale = alpha_t / alpha_s0, -sigma_t * h_phi_1, sigma_t * b_h
        if corrector:
            rhos = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(big_r, b)
            weights = [-scale * rho / rk for rho, rk in zip(rhos[:-1], rks)] + [-scale * rhos[-1]]
        elif order == 1:
            weights = []
        else:
            rhos = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b[:-1])
            weights = [-scale * rho / rk for rho, rk in zip(rhos, rks)]
        return c_x, c_m0, weights

    def _plan(self, i: int, sample: torch.Tensor) -> StepPlan[UniPCCoeffs]:
        """Correct the previous step with this model output (UniC, unless disabled), then predict (UniP).

        history: the solver_order earlier converted outputs, newest first, then the previous corrected sample
        (zeros, weighted 0, while missing)."""
        use_corrector = i > 0 and (i - 1) not in self.config.disable_corrector and self.last_sample is not None
        cc = [0.0] * 5
        if use_corrector:  # from sigma_{i-1} to sigma_i, earlier outputs at i-2, i-3
            c_x, c_m0, w = self._bh_update(i, i - 1, [i - 2, i - 3], self.this_order, corrector=True)
            cc = [c_x, c_m0, *(w[:-1] + [0.0, 0.0])[:2], w[-1]]
        # from sigma_i to sigma_{i+1}, earlier outputs (after this one) at i-1, i-2
        p_x, p_0, pw = self._bh_update(i + 1, i, [i - 1, i - 2], self._order(i), corrector=False)
        pc = [p_x, p_0, *(pw + [0.0, 0.0])[:2]]
        coeffs = make_coeffs(
            UniPCCoeffs,
            sigma=self.sigmas[i],
            use_corrector=float(use_corrector),
            **dict(zip(("cc_x", "cc_m0", "cc_1", "cc_2", "cc_t"), cc)),
            **dict(zip(("pc_x", "pc_0", "pc_1", "pc_2"), pc)),
        )
        saved = self.last_sample if self.last_sample is not None else torch.zeros_like(sample)
        return StepPlan(i, coeffs, history=(*self._history(sample, self.config.solver_order), saved))

    def _convert(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0 (thresholded when configured) with predict_x0, else epsilon."""
        if not self.config.predict_x0:
            return self._vp_eps(model_output, sample, sigma)
        x0 = self._vp_x0(model_output, sample, sigma)
        return self._threshold_sample(x0) if self.config.thresholding else x0

    def apply_plan(self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[UniPCCoeffs]) -> PlanUpdate:
        c = plan.coeffs
        *m, saved = plan.history
        m_t = self._convert(model_output, sample, c.sigma)
        corrected = c.cc_x * saved + c.cc_m0 * m[0] + c.cc_t * (m_t - m[0])
        for weight, m_k in zip((c.cc_1, c.cc_2), m[1:]):
            corrected = corrected + weight * (m_k - m[0])
        x = torch.where(c.use_corrector > 0, corrected.to(sample.dtype), sample)
        prev_sample = c.pc_x * x + c.pc_0 * m_t
        for weight, m_k in zip((c.pc_1, c.pc_2), m[: len(m) - 1]):
            prev_sample = prev_sample + weight * (m_k - m_t)
        return PlanUpdate(prev_sample.to(x.dtype), None, (m_t, x))

    def commit_plan(self, plan: StepPlan, stored: tuple[torch.Tensor, ...]) -> None:
        self.this_order = self._order(plan.index)
        self.last_sample = stored[1]
        super().commit_plan(plan, stored)
