"""Euler sampling with EDM's preconditioning (Karras et al., arXiv:2206.00364): the model is fed
c_in(sigma) * x and its output combined as c_skip * x + c_out * F; sigmas follow EDM's own Karras (or exponential)
schedule between sigma_max and sigma_min, and the timesteps are c_noise = log(sigma) / 4. No betas."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from ..utils.torch_utils import Device
from .schedule_tables import karras_sigmas
from .scheduling_euler_discrete import EulerDiscreteScheduler
from .scheduling_utils import SchedulerConfig

# Keys every other scheduler has and EDM's does not: not fields of its config (another scheduler's config keeps them
# aside on a swap, as Diffusers does).
_NOT_EDM_KEYS = ("beta_start", "beta_end", "beta_schedule", "trained_betas", "timestep_spacing", "steps_offset")


@dataclasses.dataclass(frozen=True)
class EDMEulerSchedulerConfig(SchedulerConfig):
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    sigma_schedule: str = "karras"
    rho: float = 7.0
    final_sigmas_type: str = "zero"

    choices: ClassVar = {
        "prediction_type": ("epsilon", "v_prediction"),
        "sigma_schedule": ("karras", "exponential"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return tuple(name for name in super()._field_names() if name not in _NOT_EDM_KEYS)


class EDMEulerScheduler(EulerDiscreteScheduler):
    """EulerDiscreteScheduler's step (with its churn options) on EDM's sigmas and preconditioning."""

    config_class: ClassVar[type[EDMEulerSchedulerConfig]] = EDMEulerSchedulerConfig
    _compatibles: ClassVar[tuple[str, ...]] = ()  # as Diffusers: EDM's sigmas and preconditioning are its own

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        n = self.config.num_train_timesteps
        self._install(torch.arange(n + 1, dtype=torch.float64) / n, None, None)

    @property
    def init_noise_sigma(self) -> float:
        return (self.config.sigma_max**2 + 1) ** 0.5

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Device = None,
        sigmas: Sequence[float] | torch.Tensor | float | None = None,
    ) -> None:
        """`num_inference_steps` sigmas of the schedule, or the schedule at the custom ramp points `sigmas` in [0, 1]
        (0: sigma_max, 1: sigma_min), as Diffusers reads them."""
        if sigmas is None:
            n = self._check_num_inference_steps(num_inference_steps)
            ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        else:
            if num_inference_steps is not None:
                raise ValueError("pass either num_inference_steps or sigmas to EDMEulerScheduler.set_timesteps")
            ramp = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
            if ramp.numel() < 1 or not bool(((ramp >= 0) & (ramp <= 1)).all()):
                raise ValueError(f"sigmas must be ramp points in [0, 1], got {ramp.tolist()}")
        self._install(ramp, device, num_inference_steps if sigmas is None else ramp.numel())

    def _install(self, ramp: torch.Tensor, device: Device, n: int | None) -> None:
        cfg = self.config
        if cfg.sigma_schedule == "karras":
            sigmas = torch.from_numpy(karras_sigmas(cfg.sigma_min, cfg.sigma_max, len(ramp), cfg.rho, ramp.numpy()))
        else:  # float32 log-space linspace, as Diffusers computes it
            log_sigmas = torch.linspace(math.log(cfg.sigma_min), math.log(cfg.sigma_max), len(ramp))
            sigmas = log_sigmas.exp().flip(0)
        sigmas = sigmas.to(torch.float32)
        last = sigmas[-1:] if cfg.final_sigmas_type == "sigma_min" else torch.zeros(1)
        self._set_schedule(self.precondition_noise(sigmas).numpy(), device, n)
        self._set_sigmas(torch.cat([sigmas, last]))

    # --- EDM's preconditioning (Diffusers' public names) -------------------------------------------------------------
    def precondition_inputs(self, sample: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        return sample * self._c_in(sigma)

    def precondition_noise(self, sigma: float | torch.Tensor) -> torch.Tensor:
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.tensor([sigma])
        return 0.25 * torch.log(sigma)

    def precondition_outputs(
        self, sample: torch.Tensor, model_output: torch.Tensor, sigma: float | torch.Tensor
    ) -> torch.Tensor:
        sigma_data = self.config.sigma_data
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
        if self.config.prediction_type == "v_prediction":
            c_out = -c_out
        return c_skip * sample + c_out * model_output

    def _c_in(self, sigma: float | torch.Tensor) -> float | torch.Tensor:
        return 1 / ((sigma**2 + self.config.sigma_data**2) ** 0.5)

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        return self.precondition_inputs(sample, self.sigmas[self._index(timestep)])

    def _model_input_scale(self, i: int) -> torch.Tensor:
        return self._c_in(self.sigmas[i])

    def _predict_x0_ve(
        self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_hat: torch.Tensor
    ) -> torch.Tensor:
        return self.precondition_outputs(sample, model_output, sigma_hat)
