"""What the exponential-integrator solvers share: DPM-Solver (multistep, single-step), UniPC and DEIS.

They step through variance-preserving noise levels: a schedule sigma (noise-to-signal ratio, as in the Euler
schedulers) stands for alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t, and the updates are exponential
integrators in lambda = log(alpha_t / sigma_t). The model input is not scaled; the history is a list of converted
model outputs (x0 or epsilon predictions), newest last.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ..configuration import ConfigError
from ..utils.torch_utils import Device
from .schedule_tables import sigma_to_t
from .scheduler_config import SolverConfig
from .scheduling_utils import SchedulerMixin


@dataclasses.dataclass(frozen=True)
class DPMSolverConfig(SolverConfig):
    """The keys both DPM-Solvers (multistep and single-step) have."""

    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None

    choices: ClassVar = {
        "algorithm_type": ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"),
        "solver_type": ("midpoint", "heun"),
        "final_sigmas_type": ("zero", "sigma_min"),
        "variance_type": (None, "learned", "learned_range"),
    }

    def __post_init__(self) -> None:
        # Diffusers maps the names of DEIS / UniPC configs (when swapping from them) onto DPM-Solver++'s.
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        super().__post_init__()
        if self.algorithm_type in ("dpmsolver", "sde-dpmsolver") and self.final_sigmas_type == "zero":
            raise ConfigError(
                f"{type(self).__name__}: final_sigmas_type='zero' needs a dpmsolver++ algorithm_type; "
                f"use final_sigmas_type='sigma_min' with algorithm_type={self.algorithm_type!r}"
            )


def vp_alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the variance-preserving process whose noise-to-signal ratio is `sigma`."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def vp_lambda(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t, lambda_t = log(alpha_t) - log(sigma_t)) at noise-to-signal ratio `sigma`."""
    alpha, sigma_t = vp_alpha_sigma(sigma)
    return alpha, sigma_t, torch.log(alpha) - torch.log(sigma_t)


def solver_timesteps(spacing: str, num_train: int, n: int, steps_offset: int, last_timestep: int) -> np.ndarray:
    """`n` training timesteps, descending, for the solvers: like `spaced_timesteps`, but linspace and leading space
    n + 1 points up to `last_timestep` (num_train, or less where lambda_min_clipped cuts the schedule) and drop the
    last one (float64)."""
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy()
    if spacing == "leading":
        return (np.arange(0, n + 1) * (last_timestep // (n + 1))).round()[::-1][:-1] + steps_offset
    return np.arange(last_timestep, 0, -num_train / n).round() - 1


def dpm_phi(
    kind: str,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    alpha_s: torch.Tensor,
    sigma_s: torch.Tensor,
    h: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | float, torch.Tensor | float]:
    """DPM-Solver's weights for a step from (alpha_s, sigma_s) to (alpha_t, sigma_t), h = lambda_t - lambda_s, by
    algorithm type: (c_x, c_0, d1, d2, noise_std) in x_t = c_x x_s + c_0 D0 + d1 D1 + d2 D2 + noise_std * noise,
    D0 the (earliest) model output, D1 and D2 its first and second divided differences in lambda (midpoint rules
    weigh D1 by c_0 / 2 instead of d1)."""
    noise_std: torch.Tensor | float = 0.0
    if kind == "dpmsolver++":
        c_x, c_0 = sigma_t / sigma_s, -(alpha_t * (torch.exp(-h) - 1.0))
        d1 = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
        d2 = -(alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5))
    elif kind == "dpmsolver":
        c_x, c_0 = alpha_t / alpha_s, -(sigma_t * (torch.exp(h) - 1.0))
        d1 = -(sigma_t * ((torch.exp(h) - 1.0) / h - 1.0))
        d2 = -(sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5))
    elif kind == "sde-dpmsolver++":
        c_x, c_0 = sigma_t / sigma_s * torch.exp(-h), alpha_t * (1 - torch.exp(-2.0 * h))
        d1 = alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        d2 = alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        noise_std = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
    else:  # sde-dpmsolver (orders 1 and 2)
        c_x, c_0 = alpha_t / alpha_s, -2.0 * (sigma_t * (torch.exp(h) - 1.0))
        d1, d2 = -2.0 * (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)), 0.0
        noise_std = sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0)
    return c_x, c_0, d1, d2, noise_std


class VPSolverMixin(SchedulerMixin):
    """Tables, model-output conversions, history and add_noise of the exponential-integrator solvers."""

    _pin_zero_snr: ClassVar[bool] = True

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        n = self.config.num_train_timesteps
        alpha_t, sigma_t = torch.sqrt(self.alphas_cumprod), torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        self._set_schedule(np.linspace(0, n - 1, n, dtype=np.float32)[::-1], None, None)
        self._set_sigmas(self._train_sigmas())
        self._reset_history()

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """As the base class, except that a timestep outside the schedule maps to the last step, as Diffusers' solvers
        map it."""
        try:
            return super().index_for_timestep(timestep, schedule_timesteps)
        except ValueError:
            values = self._timestep_values if schedule_timesteps is None else schedule_timesteps.tolist()
            return len(values) - 1

    def _reset_history(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order  # converted, newest last
        self.lower_order_nums = 0  # steps taken so far, capped at solver_order: the usable history

    def _history(self, sample: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
        """The last `count` converted outputs, newest first (zeros, with zero coefficients, before there are any)."""
        return tuple(m if m is not None else torch.zeros_like(sample) for m in self.model_outputs[::-1][:count])

    def _check_mu(self, mu: float | None) -> None:
        if mu is not None:
            raise ValueError(f"{type(self).__name__}: mu needs use_dynamic_shifting, which rapiddiff does not support")

    def _install(self, timesteps: np.ndarray, sigmas: np.ndarray, last: float, device: Device) -> None:
        """Install a schedule: `timesteps` (int64), their `sigmas` and the final one, `last`; a fresh history."""
        self._set_schedule(timesteps.astype(np.int64), device, len(timesteps))
        self._set_sigmas(np.concatenate([sigmas, [last]]).astype(np.float32))
        self._reset_history()

    def _install_multistep_schedule(self, num_inference_steps: int, device: Device) -> None:
        """UniPC's and DEIS's schedule: `solver_timesteps` over the whole training range, then `_respaced_schedule`
        (Karras timesteps rounded); the final sigma is 0 with final_sigmas_type="zero", else the last respaced sigma
        or the training schedule's smallest."""
        cfg = self.config
        n = self._check_num_inference_steps(num_inference_steps)
        timesteps = solver_timesteps(
            cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset, cfg.num_train_timesteps
        )
        timesteps, sigmas, respaced = self._respaced_schedule(timesteps, n, round_karras=True)
        if cfg.own("final_sigmas_type") == "zero":
            last = 0.0
        else:
            last = sigmas[-1] if respaced else self._train_sigmas()[0]
        self._install(timesteps, sigmas, last, device)

    def _respaced_schedule(
        self, timesteps: np.ndarray, n: int, round_karras: bool
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """(timesteps, sigmas, respaced) of the schedule: the training sigmas interpolated at `timesteps`, or - with
        Karras, exponential or beta sigmas (respaced=True) - `n` respaced sigmas and their fractional timesteps
        (rounded for Karras when `round_karras`). `sigmas` has no final value yet."""
        train_sigmas = self._train_sigmas()
        sigmas = self._respaced_sigmas(train_sigmas[::-1], n)
        if sigmas is None:
            return timesteps, np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas), False
        timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
        return (timesteps.round() if round_karras and self.config.use_karras_sigmas else timesteps), sigmas, True

    def _vp_x0(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0 predicted from the model output at noise level `sigma`."""
        alpha_t, sigma_t = vp_alpha_sigma(sigma)
        if self.config.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        if self.config.prediction_type == "v_prediction":
            return alpha_t * sample - sigma_t * model_output
        return model_output

    def _vp_eps(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The noise epsilon predicted from the model output at noise level `sigma`."""
        alpha_t, sigma_t = vp_alpha_sigma(sigma)
        if self.config.prediction_type == "epsilon":
            return model_output
        if self.config.prediction_type == "v_prediction":
            return alpha_t * model_output + sigma_t * sample
        return (sample - alpha_t * model_output) / sigma_t

    def _dpm_convert(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """DPM-Solver's view of the model output at noise level `sigma`: x0 for the dpmsolver++ algorithm types,
        epsilon for the dpmsolver ones (thresholded through x0 when configured). A learned variance (the second half
        of the channels) is dropped."""
        cfg = self.config
        if cfg.variance_type is not None:
            model_output = model_output[:, : sample.shape[1]]
        if cfg.algorithm_type.endswith("dpmsolver++"):
            x0 = self._vp_x0(model_output, sample, sigma)
            return self._threshold_sample(x0) if cfg.thresholding else x0
        eps = self._vp_eps(model_output, sample, sigma)
        if cfg.thresholding:
            alpha_t, sigma_t = vp_alpha_sigma(sigma)
            x0 = self._threshold_sample((sample - sigma_t * eps) / alpha_t)
            eps = (sample - alpha_t * x0) / sigma_t
        return eps

    def commit_plan(self, plan: Any, stored: tuple[torch.Tensor, ...]) -> None:
        """stored[0]: this step's converted output, the newest of the history."""
        self.model_outputs = [*self.model_outputs[1:], stored[0]]
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        super().commit_plan(plan, stored)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_t * original + sigma_t * noise at the sigma `_sigma_for_noise` picks."""
        alpha_t, sigma_t = vp_alpha_sigma(self._sigma_for_noise(timesteps, original_samples))
        return alpha_t * original_samples + sigma_t * noise


class DPMSolverMixin(VPSolverMixin):
    """The schedule both DPM-Solvers (multistep, single-step) share."""

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Device = None,
        mu: float | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Spaced timesteps up to the lambda_min_clipped limit (respaced sigmas as configured), or custom descending
        `timesteps`."""
        self._check_mu(mu)
        if timesteps is not None:
            self._check_no_respacing("custom timesteps")
        n = self._resolve_steps(num_inference_steps, timesteps)
        if timesteps is None:
            timesteps = self._spaced_timesteps(n)
        timesteps = np.array(timesteps).astype(np.int64)
        timesteps, sigmas, _ = self._respaced_schedule(timesteps, len(timesteps), round_karras=True)
        last = self._train_sigmas()[0] if self.config.final_sigmas_type == "sigma_min" else 0.0
        self._install(timesteps, sigmas, last, device)

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        """`solver_timesteps` up to the lambda_min_clipped limit (the single-step solver spaces like "linspace")."""
        cfg = self.config
        clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped).item()
        spacing, offset = cfg.own("timestep_spacing", "linspace"), cfg.own("steps_offset", 0)
        return solver_timesteps(spacing, cfg.num_train_timesteps, n, offset, cfg.num_train_timesteps - clipped)
