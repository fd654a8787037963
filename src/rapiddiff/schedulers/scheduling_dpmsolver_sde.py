"""DPM-Solver++ SDE, second order ("DPM++ SDE", k-diffusion's `sample_dpmpp_sde`), with a Brownian-tree noise.

Each interval sigma_k -> sigma_{k+1} takes two model calls: an ancestral step to the midpoint (in t = -log sigma)
from the sample, then one from the same sample to sigma_{k+1} with the midpoint's x0 prediction; the schedule lists
every sigma twice and the midpoints' timesteps between them. The noise of a step is the increment of one Brownian
path between its two noise levels, drawn from torchsde's `BrownianInterval` exactly as Diffusers builds it (seed
`noise_sampler_seed`, else one drawn from torch's global generator at the first step), so that the same seed gives the
same image. torchsde is an optional dependency: `pip install torchsde` (or `rapiddiff[sde]`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from ..utils.optional import import_optional
from ..utils.torch_utils import Device, to_device
from .schedule_tables import sigma_to_t, spaced_timesteps
from .scheduling_euler_discrete import EulerSchedulerMixin
from .scheduling_heun_discrete import SecondOrderSchedulerConfig
from .step_plan import PlanUpdate, SchedulerOutput, StepPlan, make_coeffs


def _torchsde() -> Any:
    return import_optional(
        "torchsde",
        "DPMSolverSDEScheduler draws its noise from a Brownian tree with torchsde, which is not installed: "
        "pip install torchsde (or pip install 'rapiddiff[sde]')",
    )


class BrownianTreeNoiseSampler:
    """Normalised Brownian increments (W(t1) - W(t0)) / sqrt(|t1 - t0|) between noise levels, one path per seed
    (a list of seeds: one path per sample of the batch), as Diffusers' sampler of the same name."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed: int | list[int] | None = None):
        if seed is None:  # `.tolist()`, not `.item()`: a CPU tensor read that no sync guard mistakes for a device one
            seed = torch.randint(0, 2**63 - 1, []).tolist()
        self.batched = not isinstance(seed, int)
        seeds = list(seed) if self.batched else [seed]
        if self.batched and len(seeds) != x.shape[0]:
            raise ValueError(f"noise_sampler_seed lists {len(seeds)} seeds for a batch of {x.shape[0]}")
        w0 = torch.zeros_like(x[0] if self.batched else x)
        t0, t1 = sorted((float(sigma_min), float(sigma_max)))
        bi = _torchsde().BrownianInterval
        self.trees = [
            bi(
                t0=t0,
                t1=t1,
                size=w0.shape,
                dtype=w0.dtype,
                device=w0.device,
                entropy=s,
                tol=1e-6,
                pool_size=24,
                halfway_tree=True,
            )
            for s in seeds
        ]

    def __call__(self, sigma: float, sigma_next: float, norm: torch.Tensor) -> torch.Tensor:
        """The increment from noise level `sigma` to `sigma_next` (Python values of float32 levels), divided by
        `norm` = sqrt(|sigma_next - sigma|) as a 0-dim float32 tensor (as Diffusers divides)."""
        sign = 1.0 if sigma < sigma_next else -1.0
        lo, hi = min(sigma, sigma_next), max(sigma, sigma_next)
        w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return (w if self.batched else w[0]) / norm


@dataclasses.dataclass(frozen=True)
class DPMSolverSDESchedulerConfig(SecondOrderSchedulerConfig):
    noise_sampler_seed: int | tuple[int, ...] | None = None

    choices: ClassVar = {"prediction_type": ("epsilon", "v_prediction")}


class DPMSolverSDECoeffs(NamedTuple):
    """prev = sample_coeff start + x0_coeff x0 + noise_coeff noise, x0 predicted at sigma_input; start is the sample,
    or (from_saved = 1, the second call of an interval) the sample saved at the first."""

    sigma_input: torch.Tensor
    from_saved: torch.Tensor
    sample_coeff: torch.Tensor
    x0_coeff: torch.Tensor
    noise_coeff: torch.Tensor


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


class DPMSolverSDEScheduler(EulerSchedulerMixin):
    config_class: ClassVar[type[DPMSolverSDESchedulerConfig]] = DPMSolverSDESchedulerConfig
    order: ClassVar[int] = 2

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        _torchsde()  # fail here, not at the first step
        self.noise_sampler_seed = self.config.noise_sampler_seed
        self._reset_state()
        self._schedule_training_timesteps()

    def _reset_state(self) -> None:
        self.sample: torch.Tensor | None = None  # the sample at an interval's first call (None: at a first call)
        self.mid_point_sigma: torch.Tensor | None = None
        self.noise_sampler: BrownianTreeNoiseSampler | None = None

    @property
    def state_in_first_order(self) -> bool:
        return self.sample is None

    def set_timesteps(
        self, num_inference_steps: int, device: Device = None, num_train_timesteps: int | None = None
    ) -> None:
        self._install_schedule(num_inference_steps, device, num_train_timesteps)
        # every step's numbers, by (interval, first call?): the loop reads no tensor value
        self._intervals = {
            (j, first): self._interval(j, first) for j in range(len(self.sigmas) - 1) for first in (True, False)
        }

    def _schedule_training_timesteps(self) -> None:
        # __init__'s schedule of every training timestep (for steps before any set_timesteps): its per-step numbers
        # are computed as the steps come, not all 2000 up front.
        if len(self.betas) == self.config.num_train_timesteps:
            self._install_schedule(self.config.num_train_timesteps, None, None)

    def _install_schedule(self, num_inference_steps: int, device: Device, num_train_timesteps: int | None) -> None:
        n = self._check_num_inference_steps(num_inference_steps)
        cfg = self.config
        num_train = num_train_timesteps or cfg.num_train_timesteps
        timesteps = spaced_timesteps(cfg.timestep_spacing, num_train, n, cfg.steps_offset, False).astype(np.float64)
        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        respaced = self._respaced_sigmas(sigmas, n)
        if respaced is not None:
            sigmas = respaced
            timesteps = sigma_to_t(sigmas, log_sigmas)
        # the midpoints in t = -log(sigma), and their timesteps
        t = -np.log(sigmas)
        midpoints = sigma_to_t(np.exp(-(t[:-1] + np.diff(t) * 0.5)), log_sigmas)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        doubled = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        steps = torch.from_numpy(timesteps)
        steps = torch.cat([steps[:1], steps[1:].repeat_interleave(2)])
        steps[1::2] = torch.from_numpy(midpoints)
        self._set_schedule(steps.numpy(), device, n)
        # float64 like Diffusers' (its midpoints are fractional): `_set_schedule` keeps float32
        self.timesteps = to_device(steps, device)
        self._timestep_values = steps.tolist()
        self._set_sigmas(doubled)
        self._reset_state()
        self._intervals: dict[tuple[int, bool], dict[str, Any]] = {}

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """sample / sqrt(sigma^2 + 1), sigma the step's, or the midpoint's at an interval's second call."""
        i = self._index(timestep)
        sigma = self.sigmas[i] if self.state_in_first_order else self.mid_point_sigma
        return sample / ((sigma**2 + 1) ** 0.5)

    def _model_input_scale(self, i: int) -> torch.Tensor:
        sigma = self.sigmas[i] if self.state_in_first_order else self.mid_point_sigma
        return 1 / (sigma**2 + 1) ** 0.5

    def _interval(self, j: int, first: bool) -> dict[str, Any]:
        """The numbers of a call on interval sigmas[j] -> sigmas[j + 1] (the first or the second of the interval),
        computed as Diffusers computes them (float32 CPU tensors); the noise levels also as Python values."""
        sigma, sigma_next = self.sigmas[j], self.sigmas[j + 1]
        t, t_next = _t(sigma), _t(sigma_next)
        t_proposed = t + (t_next - t) * 0.5
        out: dict[str, Any] = {"sigma_input": sigma if first else _sigma(t_proposed)}
        if self._sigma_values[j + 1] == 0:  # the last step: Euler to sigma = 0
            ratio = (sigma_next - sigma) / sigma
            return out | {"euler": True, "sample_coeff": 1 + ratio, "x0_coeff": -ratio}
        t_next = t_proposed if first else t_next
        sigma_from, sigma_to = _sigma(t), _sigma(t_next)
        sigma_up = torch.minimum(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
        ancestral_t = _t((sigma_to**2 - sigma_up**2) ** 0.5)
        return out | {
            "euler": False,
            "sample_coeff": _sigma(ancestral_t) / sigma_from,
            "x0_coeff": -(t - ancestral_t).expm1(),
            "sigma_up": sigma_up,
            "mid_point_sigma": sigma_to,
            "levels": (sigma_from.tolist(), sigma_to.tolist()),
            "norm": (sigma_to - sigma_from).abs().sqrt(),
        }

    def _numbers(self, i: int) -> dict[str, Any]:
        """Step i's numbers: the first call of interval i, or the second of interval i - 1."""
        first = self.state_in_first_order
        key = (i if first else i - 1, first)
        if key not in self._intervals:  # __init__'s schedule only: set_timesteps computes them all
            self._intervals[key] = self._interval(*key)
        return self._intervals[key] | {"first": first}

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        s_noise: float = 1.0,
    ) -> SchedulerOutput | tuple[torch.Tensor, ...]:
        return self._step(model_output, timestep, sample, return_dict, s_noise=s_noise)

    def _plan(self, i: int, sample: torch.Tensor, s_noise: float) -> StepPlan[DPMSolverSDECoeffs]:
        """Noise for every step: the Brownian increment (zeros on the final Euler step, which draws none); history:
        the sample saved at the interval's first call (zeros while there is none)."""
        if self.noise_sampler is None:
            positive = [s for s in self._sigma_values if s > 0]
            self.noise_sampler = BrownianTreeNoiseSampler(sample, min(positive), max(positive), self.noise_sampler_seed)
        step = self._numbers(i)
        if step["euler"]:
            noise, noise_coeff = torch.zeros_like(sample), 0.0
        else:
            noise, noise_coeff = self.noise_sampler(*step["levels"], step["norm"]), s_noise * step["sigma_up"]
        coeffs = make_coeffs(
            DPMSolverSDECoeffs,
            sigma_input=step["sigma_input"],
            from_saved=float(not step["first"]),
            sample_coeff=step["sample_coeff"],
            x0_coeff=step["x0_coeff"],
            noise_coeff=noise_coeff,
        )
        saved = self.sample if self.sample is not None else torch.zeros_like(sample)
        return StepPlan(i, coeffs, noise.to(sample.dtype), history=(saved,))

    def apply_plan(
        self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan[DPMSolverSDECoeffs]
    ) -> PlanUpdate:
        c = plan.coeffs
        x0 = self._predict_x0_ve(model_output, sample, c.sigma_input, c.sigma_input)
        start = torch.where(c.from_saved > 0, plan.history[0], sample)
        prev_sample = c.sample_coeff * start + c.x0_coeff * x0 + c.noise_coeff * plan.noise
        return PlanUpdate(prev_sample, x0, (start,))

    def commit_plan(self, plan: StepPlan, stored: tuple[torch.Tensor, ...]) -> None:
        step = self._numbers(plan.index)
        if not step["euler"]:
            if step["first"]:
                self.sample, self.mid_point_sigma = stored[0], step["mid_point_sigma"]
            else:
                self.sample, self.mid_point_sigma = None, None
        super().commit_plan(plan, stored)
