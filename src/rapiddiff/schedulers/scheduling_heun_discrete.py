"""Heun's method (Karras et al., arXiv:2206.00364, Algorithm 1): an Euler step, then its trapezoidal correction.

`SecondOrderSchedulerMixin` holds what Heun and the KDPM2 schedulers share: two model evaluations per interval, laid
out in `timesteps` as Diffusers lays them out (the first timestep once, every later one twice, or interleaved with a
midpoint), with `order = 2` so that pipelines call `set_begin_index(t_start * 2)`. Whether a step is an interval's
first or second evaluation is Python state (`state_in_first_order`), as in Diffusers; the per-step numbers are read
from the tables by step index, on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from ..utils.torch_utils import Device, Generator, randn_tensor
from .scheduler_config import SchedulerConfig, SigmaSpacingConfig
from .scheduling_euler_discrete import EulerSchedulerMixin
from .scheduling_utils import GeneratorStepMixin
from .step_plan import PlanUpdate, StepPlan, make_coeffs


class SecondOrderCoeffs(NamedTuple):
    sigma_in: torch.Tensor  # the sigma the model output is read at (x0, and the derivative's denominator)
    d_weight: torch.Tensor  # weight of this evaluation's derivative
    prev_weight: torch.Tensor  # weight of the interval's first derivative (Heun's average: 0.5 and 0.5)
    dt: torch.Tensor  # the step in sigma
    from_saved: torch.Tensor  # 1: step from the sample saved at the interval's first evaluation
    noise_std: torch.Tensor  # std of the fresh noise added (KDPM2 ancestral's second evaluations), else 0


class SecondOrderSchedulerMixin(GeneratorStepMixin, EulerSchedulerMixin):
    """Two evaluations per interval; see the module docstring. Subclasses give `_coeffs` (and the tables)."""

    order: ClassVar[int] = 2
    _draws_noise: ClassVar[bool] = False  # KDPM2 ancestral: noise after each second evaluation

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        # read on the host once: a compiled step cannot look up which fields a config class has
        self._clip_range = self.config.clip_sample_range if self.config.own("clip_sample") else None
        self._reset_history()
        self._schedule_training_timesteps()

    def _reset_history(self) -> None:
        # (derivative, sample) of the interval's first evaluation; None between intervals
        self._saved: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next step is the first evaluation of an interval."""
        return self._saved is None

    def _coeffs(self, i: int, first: bool) -> dict[str, torch.Tensor | float]:
        raise NotImplementedError

    @staticmethod
    def _euler_to(sigma: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """A first evaluation: an Euler step from `sigma` to `target`."""
        return dict(sigma_in=sigma, d_weight=1.0, prev_weight=0.0, dt=target - sigma, from_saved=0.0, noise_std=0.0)

    @staticmethod
    def _second(
        sigma_in: torch.Tensor, dt: torch.Tensor, average: bool = False, noise_std: torch.Tensor | float = 0.0
    ) -> dict[str, torch.Tensor | float]:
        """A second evaluation, read at `sigma_in`, stepping `dt` from the saved sample (with the first derivative
        averaged in for Heun)."""
        weight = 0.5 if average else 1.0
        return dict(
            sigma_in=sigma_in, d_weight=weight, prev_weight=1.0 - weight, dt=dt, from_saved=1.0, noise_std=noise_std
        )

    def _input_sigma(self, i: int) -> torch.Tensor:
        """The sigma of step i's model input (KDPM2: the midpoint's at second evaluations)."""
        return self.sigmas[i]

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        return sample / ((self._input_sigma(self._index(timestep)) ** 2 + 1) ** 0.5)

    def _model_input_scale(self, i: int) -> torch.Tensor:
        return 1 / (self._input_sigma(i) ** 2 + 1) ** 0.5

    def _plan(self, i: int, sample: torch.Tensor, generator: Generator | None) -> StepPlan[SecondOrderCoeffs]:
        """history: the first evaluation's derivative and sample (distinct zeros at a first evaluation). KDPM2
        ancestral gets noise on every step (drawn at second evaluations, as Diffusers draws it; zeros otherwise)."""
        first = self.state_in_first_order
        coeffs = make_coeffs(SecondOrderCoeffs, **self._coeffs(i, first))
        noise = None
        if self._draws_noise:
            if first:
                noise = torch.zeros_like(sample)
            else:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        history = self._saved if self._saved is not None else (torch.zeros_like(sample), torch.zeros_like(sample))
        return StepPlan(i, coeffs, noise, history=history)

    def apply_plan(
        self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[SecondOrderCoeffs]
    ) -> PlanUpdate:
        c = plan.coeffs
        prev_derivative, saved_sample = plan.history
        x0 = self._predict_x0_ve(model_output, sample, c.sigma_in, c.sigma_in)
        if self._clip_range is not None:
            x0 = x0.clamp(-self._clip_range, self._clip_range)
        derivative = (sample - x0) / c.sigma_in
        step = c.d_weight * derivative + c.prev_weight * prev_derivative
        start = torch.where(c.from_saved > 0, saved_sample, sample)
        prev_sample = start + step * c.dt
        if plan.noise is not None:
            prev_sample = prev_sample + plan.noise * c.noise_std
        return PlanUpdate(prev_sample, x0, (derivative, sample))

    def commit_plan(self, plan: StepPlan, stored: tuple[torch.Tensor, ...]) -> None:
        # (the state is still the planned step's: plan and commit run back to back on the host)
        self._saved = (stored[0], stored[1]) if self.state_in_first_order else None
        super().commit_plan(plan, stored)


@dataclasses.dataclass(frozen=True)
class SecondOrderSchedulerConfig(SigmaSpacingConfig):
    """The keys the schedulers with two model evaluations per interval share (Heun, KDPM2, KDPM2 ancestral,
    DPM-Solver SDE), with their defaults, which differ from the base's."""

    beta_start: float = 0.00085
    beta_end: float = 0.012


@dataclasses.dataclass(frozen=True)
class HeunDiscreteSchedulerConfig(SecondOrderSchedulerConfig):
    clip_sample: bool | None = False
    clip_sample_range: float = 1.0

    choices: ClassVar = {"beta_schedule": (*SchedulerConfig.choices["beta_schedule"], "exp")}


def doubled(values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """values[0], then every later value twice: Diffusers' layout of a table for two evaluations per interval."""
    if isinstance(values, torch.Tensor):
        return torch.cat([values[:1], values[1:].repeat_interleave(2)])
    return np.concatenate([values[:1], np.repeat(values[1:], 2)])


class HeunDiscreteScheduler(SecondOrderSchedulerMixin):
    config_class: ClassVar[type[HeunDiscreteSchedulerConfig]] = HeunDiscreteSchedulerConfig

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Device = None, timesteps: Sequence[float] | None = None
    ) -> None:
        """Spaced (or custom descending) timesteps t_0..t_{n-1}; `timesteps` lists t_0, t_1, t_1, ..., t_{n-1},
        t_{n-1}: the Euler evaluation of each interval, then its correction at the interval's end."""
        if timesteps is not None:
            self._check_no_respacing("custom timesteps")
        n = self._resolve_steps(num_inference_steps, timesteps)
        if timesteps is None:
            timesteps, sigmas = self._respaced_schedule(n)
        else:
            timesteps = np.array(timesteps, dtype=np.float32)
            sigmas = self._spaced_sigmas(timesteps)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self._set_schedule(doubled(timesteps), device, len(timesteps), dtype=torch.float32)
        self._set_sigmas(np.concatenate([doubled(sigmas[:-1]), sigmas[-1:]]))
        self._reset_history()

    def _coeffs(self, i: int, first: bool) -> dict[str, torch.Tensor | float]:
        """First evaluation: an Euler step from sigma_i to sigma_{i+1}. Second: the average of both derivatives
        (the second read at the interval's end), applied from the saved sample over the same step."""
        if first:
            return self._euler_to(self.sigmas[i], self.sigmas[i + 1])
        return self._second(self.sigmas[i], self.sigmas[i] - self.sigmas[i - 1], average=True)
