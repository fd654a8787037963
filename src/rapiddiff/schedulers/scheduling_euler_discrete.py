"""Euler's method on the probability-flow ODE in sigma space (Karras et al., arXiv:2206.00364, Algorithm 2).

`EulerSchedulerMixin` holds what both Euler schedulers share: the variance-exploding view x = x0 + sigma * noise
(inputs scaled by 1 / sqrt(sigma^2 + 1), noise added as sigma * noise) and the interpolated sigma schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from ..utils.torch_utils import Device, Generator, randn_tensor
from .schedule_tables import sigma_to_t, spaced_timesteps
from .scheduler_config import SigmaSpacingConfig
from .scheduling_utils import SchedulerMixin
from .step_plan import PlanUpdate, SchedulerOutput, StepPlan, make_coeffs


def check_custom_sigmas(sigmas: Sequence[float]) -> np.ndarray:
    """Custom `set_timesteps(sigmas=...)`: the noise levels of the schedule, the last one the level after the final
    step; finite, non-negative and strictly decreasing (so only the final one may be 0), as `timesteps=` must be
    strictly descending, except that the final level may equal the one before it: a last step that keeps the noise
    level, as the tables of `final_sigmas_type="sigma_min"` end (a scheduler's own `sigmas` are taken back). Diffusers
    takes any list; an ascending or negative one runs without a word there."""
    try:
        values = np.asarray(sigmas, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"sigmas must be a list of numbers, got {sigmas!r}") from None
    shown = values.tolist() if values.size <= 20 else f"{values[:20].tolist()}... ({values.size} values)"
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"sigmas must list at least 2 noise levels, got {shown}")
    if not np.isfinite(values).all():
        raise ValueError(f"sigmas must be finite numbers, got {shown}")
    if (values < 0).any():
        raise ValueError(f"sigmas must be non-negative (the final one may be 0), got {shown}")
    values = values.astype(np.float32)
    if (np.diff(values[:-1]) >= 0).any() or values[-1] > values[-2]:
        raise ValueError(
            f"sigmas must be strictly decreasing (highest noise level first; only the final level may repeat the one "
            f"before it), got {shown}"
        )
    return values


class EulerSchedulerMixin(SchedulerMixin):
    """Sigma tables and the scaled-input convention of the Euler schedulers."""

    _pin_zero_snr: ClassVar[bool] = True
    # Diffusers' Euler schedulers refuse an integer timestep (most likely an index from enumerate()); its LMS, Heun,
    # KDPM2 and DPM-Solver SDE schedulers match it against the schedule like any number.
    _refuses_int_timesteps: ClassVar[bool] = False

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        n = self.config.num_train_timesteps
        self._set_schedule(np.linspace(0, n - 1, n, dtype=np.float32)[::-1], None, None)
        self._set_sigmas(np.concatenate([self._train_sigmas()[::-1], [0.0]]))

    def _schedule_training_timesteps(self) -> None:
        """`set_timesteps(num_train_timesteps)`, as the __init__ of Diffusers' LMS, Heun, KDPM2 and DPM-Solver SDE
        schedulers calls it: their `step` and `scale_model_input` work before any set_timesteps, over every training
        timestep. (Not with a trained_betas table too short to schedule, which Diffusers also builds.)"""
        if len(self.betas) == self.config.num_train_timesteps:
            self.set_timesteps(self.config.num_train_timesteps)

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Std of the initial noise: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing (as Diffusers)."""
        max_sigma = self.sigmas.max()
        return max_sigma if self.config.timestep_spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5

    def _spaced_sigmas(self, timesteps: np.ndarray) -> np.ndarray:
        """The training sigmas interpolated at (fractional) `timesteps`, float64."""
        train_sigmas = self._train_sigmas()
        return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        cfg = self.config
        timesteps = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset, False)
        return timesteps.astype(np.float32)

    def _respaced_schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """`n` spaced timesteps and their sigmas (descending), respaced per use_karras / exponential / beta sigmas;
        then the timesteps are the new sigmas' fractional training timesteps (float64, as Diffusers has them)."""
        timesteps = self._spaced_timesteps(n)
        sigmas = self._spaced_sigmas(timesteps)
        respaced = self._respaced_sigmas(sigmas, n)
        if respaced is None:
            return timesteps, sigmas
        return sigma_to_t(respaced, np.log(self._train_sigmas())), respaced

    def _check_timestep(self, timestep: float | torch.Tensor) -> None:
        if not self._refuses_int_timesteps:
            return
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(
                f"{type(self).__name__}: timestep must be one of scheduler.timesteps (floats), got the integer "
                f"{timestep!r}; pass `t` from `for t in scheduler.timesteps`, not an index from enumerate()"
            )

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """sample / sqrt(sigma^2 + 1): the model sees unit-variance inputs."""
        return sample / ((self.sigmas[self._index(timestep)] ** 2 + 1) ** 0.5)

    def _model_input_scale(self, i: int) -> torch.Tensor:
        return 1 / (self.sigmas[i] ** 2 + 1) ** 0.5

    def plan_step(self, timestep: float | torch.Tensor, sample: torch.Tensor, **step_kwargs: Any) -> StepPlan:
        self._check_timestep(timestep)
        return super().plan_step(timestep, sample, **step_kwargs)

    def _predict_x0_ve(
        self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_hat: torch.Tensor
    ) -> torch.Tensor:
        if self.config.prediction_type == "epsilon":
            return sample - sigma_hat * model_output
        if self.config.prediction_type == "v_prediction":  # v is defined on the scaled input
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        return model_output

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """original + sigma * noise, sigma of the current (or begin) step; see `_sigma_for_noise`."""
        return original_samples + noise * self._sigma_for_noise(timesteps, original_samples)


@dataclasses.dataclass(frozen=True)
class EulerDiscreteSchedulerConfig(SigmaSpacingConfig):
    interpolation_type: str = "linear"
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    choices: ClassVar = {
        "interpolation_type": ("linear", "log_linear"),
        "timestep_type": ("discrete", "continuous"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }


class EulerCoeffs(NamedTuple):
    sigma: torch.Tensor  # sigma_i
    sigma_hat: torch.Tensor  # sigma_i raised by the churn
    sigma_next: torch.Tensor  # sigma_{i+1}
    churn_std: torch.Tensor  # std of the churn noise, sqrt(sigma_hat^2 - sigma^2)
    s_noise: torch.Tensor  # the call's s_noise


class EulerDiscreteScheduler(EulerSchedulerMixin):
    _refuses_int_timesteps = True
    _steps_without_set_timesteps: ClassVar[bool] = True
    config_class: ClassVar[type[EulerDiscreteSchedulerConfig]] = EulerDiscreteSchedulerConfig

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Device = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> None:
        """Spaced timesteps, custom descending `timesteps`, or custom `sigmas` (n + 1 values, the last one final)."""
        cfg = self.config
        continuous = cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction"
        if timesteps is not None:
            self._check_no_respacing("custom timesteps")
            if continuous:
                raise ValueError(
                    "EulerDiscreteScheduler: custom timesteps cannot be combined with timestep_type='continuous' "
                    "and prediction_type='v_prediction'"
                )
        if sigmas is not None:
            if num_inference_steps is not None or timesteps is not None:
                raise ValueError("pass only one of num_inference_steps, timesteps or sigmas to set_timesteps")
            sigmas = check_custom_sigmas(sigmas)
            timesteps = sigma_to_t(sigmas[:-1], np.log(self._train_sigmas()))
            steps = len(timesteps)
        else:
            n = self._resolve_steps(num_inference_steps, timesteps)
            timesteps = self._spaced_timesteps(n) if timesteps is None else np.array(timesteps).astype(np.float32)
            steps = n if n is not None else len(timesteps)
            if cfg.interpolation_type == "log_linear":  # steps + 1 sigmas (and the final one): Diffusers' table
                train = self._train_sigmas()
                sigmas = torch.linspace(np.log(train[-1]), np.log(train[0]), steps + 1).exp().numpy()
            else:
                sigmas = self._spaced_sigmas(timesteps)
            respaced = self._respaced_sigmas(sigmas, n)
            if respaced is not None:
                sigmas = respaced
                timesteps = sigma_to_t(sigmas, np.log(self._train_sigmas()))
            last = self._train_sigmas()[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
            sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        if continuous:  # EDM-style timesteps for v-prediction models trained on them (e.g. CosXL)
            timesteps = (0.25 * torch.from_numpy(sigmas[:-1]).log()).numpy()
        self._set_schedule(timesteps.astype(np.float32), device, steps)
        self._set_sigmas(sigmas)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, ...]:
        """One Euler step from sigma_i to sigma_{i+1}, optionally "churned" up to sigma_hat with fresh noise."""
        churn = dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
        return self._step(model_output, timestep, sample, return_dict, **churn, generator=generator)

    def _plan(
        self,
        i: int,
        sample: torch.Tensor,
        s_churn: float,
        s_tmin: float,
        s_tmax: float,
        s_noise: float,
        generator: Generator | None,
    ) -> StepPlan[EulerCoeffs]:
        """With s_churn > 0 every step gets a noise tensor (zeros, not drawn, outside [s_tmin, s_tmax])."""
        sigma = self.sigmas[i]
        churn = s_tmin <= self._sigma_values[i] <= s_tmax
        gamma = min(s_churn / (len(self._sigma_values) - 1), 2**0.5 - 1) if churn else 0.0
        sigma_hat = sigma * (gamma + 1)
        noise = None
        if gamma > 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        elif s_churn > 0:
            noise = torch.zeros_like(sample)
        coeffs = make_coeffs(
            EulerCoeffs,
            sigma=sigma,
            sigma_hat=sigma_hat,
            sigma_next=self.sigmas[i + 1],
            churn_std=(sigma_hat**2 - sigma**2) ** 0.5,
            s_noise=s_noise,
        )
        return StepPlan(i, coeffs, noise)

    def apply_plan(self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[EulerCoeffs]) -> PlanUpdate:
        c = plan.coeffs
        sample = sample.to(torch.float32)
        if plan.noise is not None:
            sample = sample + plan.noise * c.s_noise * c.churn_std
        x0 = self._predict_x0_ve(model_output, sample, c.sigma, c.sigma_hat)
        derivative = (sample - x0) / c.sigma_hat
        prev_sample = (sample + derivative * (c.sigma_next - c.sigma_hat)).to(model_output.dtype)
        return PlanUpdate(prev_sample, x0, ())
