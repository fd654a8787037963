"""KDPM2 (Katherine Crowson's k-diffusion `sample_dpm_2`, after Karras et al., arXiv:2206.00364): a DPM-Solver-2
style midpoint method in sigma space, two model evaluations per interval; the ancestral variant steps down to
sigma_down and adds fresh noise back up to the next sigma, as Euler ancestral does."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch

from ..utils.torch_utils import Device
from .schedule_tables import sigma_to_t
from .scheduling_heun_discrete import SecondOrderSchedulerConfig, SecondOrderSchedulerMixin, doubled


@dataclasses.dataclass(frozen=True)
class KDPM2DiscreteSchedulerConfig(SecondOrderSchedulerConfig):
    choices: ClassVar = {"prediction_type": ("epsilon", "v_prediction")}


@dataclasses.dataclass(frozen=True)
class KDPM2AncestralDiscreteSchedulerConfig(KDPM2DiscreteSchedulerConfig):
    pass


class KDPM2DiscreteScheduler(SecondOrderSchedulerMixin):
    """First evaluation: an Euler step to the midpoint sigma_interpol (geometric mean of the interval's ends);
    second: the derivative read there, applied from the saved sample over the whole interval."""

    config_class: ClassVar[type[KDPM2DiscreteSchedulerConfig]] = KDPM2DiscreteSchedulerConfig
    _ancestral: ClassVar[bool] = False

    def set_timesteps(self, num_inference_steps: int, device: Device = None) -> None:
        """`timesteps` lists t_0, then for each later t_k the midpoint's (fractional) timestep and t_k."""
        n = self._check_num_inference_steps(num_inference_steps)
        timesteps, sigmas = self._respaced_schedule(n)
        if self.config.use_karras_sigmas:
            timesteps = timesteps.round()
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        interpol = self._interpolated(sigmas)
        log_sigmas = np.log(self._train_sigmas())
        t_interpol = sigma_to_t(interpol.numpy(), log_sigmas, keep_float32=True).astype(timesteps.dtype)
        t_interpol = t_interpol[:-2] if self._ancestral else t_interpol[1:-1]
        pairs = np.stack([t_interpol, timesteps[1:]], axis=-1).reshape(-1)
        self._set_schedule(np.concatenate([timesteps[:1], pairs]), device, n, dtype=torch.from_numpy(timesteps).dtype)
        self._set_sigmas(torch.cat([doubled(sigmas), sigmas[-1:]]))
        self.sigmas_interpol = torch.cat([doubled(interpol), interpol[-1:]])
        self._reset_history()

    def _interpolated(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The midpoints: sigma_interpol_k between sigma_{k-1} and sigma_k (float32 torch math, as Diffusers)."""
        return sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()

    def _input_sigma(self, i: int) -> torch.Tensor:
        return self.sigmas[i] if self.state_in_first_order else self.sigmas_interpol[i]

    def _coeffs(self, i: int, first: bool) -> dict[str, torch.Tensor | float]:
        if first:
            return self._euler_to(self.sigmas[i], self.sigmas_interpol[i + 1])
        return self._second(self.sigmas_interpol[i], self.sigmas[i] - self.sigmas[i - 1])


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """KDPM2 towards sigma_down, then noise of std sigma_up (drawn after each interval's second evaluation)."""

    config_class: ClassVar[type[KDPM2AncestralDiscreteSchedulerConfig]] = KDPM2AncestralDiscreteSchedulerConfig
    _ancestral: ClassVar[bool] = True
    _draws_noise: ClassVar[bool] = True

    def _interpolated(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The midpoints between sigma_k and sigma_down_k; also installs the sigma_up / sigma_down tables."""
        sigmas_next = sigmas.roll(-1)
        sigmas_next[-1] = 0.0
        sigmas_up = (sigmas_next**2 * (sigmas**2 - sigmas_next**2) / sigmas**2) ** 0.5
        sigmas_down = (sigmas_next**2 - sigmas_up**2) ** 0.5
        sigmas_down[-1] = 0.0
        interpol = sigmas.log().lerp(sigmas_down.log(), 0.5).exp()
        interpol[-2:] = 0.0
        self.sigmas_up = torch.cat([doubled(sigmas_up), sigmas_up[-1:]])
        self.sigmas_down = torch.cat([doubled(sigmas_down), sigmas_down[-1:]])
        return interpol

    def _input_sigma(self, i: int) -> torch.Tensor:
        return self.sigmas[i] if self.state_in_first_order else self.sigmas_interpol[i - 1]

    def _coeffs(self, i: int, first: bool) -> dict[str, torch.Tensor | float]:
        if first:
            return self._euler_to(self.sigmas[i], self.sigmas_interpol[i])
        dt = self.sigmas_down[i - 1] - self.sigmas[i - 1]
        return self._second(self.sigmas_interpol[i - 1], dt, noise_std=self.sigmas_up[i - 1])
