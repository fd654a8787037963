"""The tables a scheduler is built from: betas (Diffusers' beta schedules, zero-terminal-SNR rescaling), timestep
spacing, Karras / exponential / beta sigma schedules, sigma <-> timestep conversion and timestep matching. Plain
functions of the config's numbers, computed on the CPU in float32 / float64 as Diffusers computes them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..utils.optional import import_optional

if TYPE_CHECKING:
    from .scheduler_config import SchedulerConfig


# --- tables --------------------------------------------------------------------------------------------------------
def _alpha_bar_betas(
    num_train_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> torch.Tensor:
    """Betas of a continuous alpha_bar(t), t in [0, 1] (Diffusers' `betas_for_alpha_bar`)."""
    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def _cosine_alpha_bar(t: float) -> float:
    """GLIDE's squaredcos_cap_v2 schedule."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _exp_alpha_bar(t: float) -> float:
    """Diffusers' "exp" schedule (HeunDiscreteScheduler only)."""
    return math.exp(t * -12.0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep has zero SNR (arXiv:2305.08891, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(config: SchedulerConfig) -> torch.Tensor:
    """The training betas (float32 on the CPU, as Diffusers computes them)."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":  # latent diffusion's schedule
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif config.beta_schedule == "exp":
        betas = _alpha_bar_betas(n, _exp_alpha_bar)
    else:
        betas = _alpha_bar_betas(n, _cosine_alpha_bar)
    if config.own("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def spaced_timesteps(
    spacing: str, num_train: int, n: int, steps_offset: int, round_linspace: bool = True
) -> np.ndarray:
    """`n` of the `num_train` training timesteps, descending, spaced as Table 2 of arXiv:2305.08891 (float64)."""
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / n)) - 1
    if spacing == "leading":
        timesteps = (np.arange(0, n) * (num_train // n)).round() + steps_offset
    else:
        timesteps = np.linspace(0, num_train - 1, n)
        timesteps = timesteps.round() if round_linspace else timesteps
    return timesteps[::-1].copy()


def karras_sigmas(
    sigma_min: float, sigma_max: float, n: int, rho: float = 7.0, ramp: np.ndarray | torch.Tensor | None = None
) -> np.ndarray:
    """Karras et al. (2022) noise levels: `n` sigmas from sigma_max to sigma_min, uniform in sigma^(1/rho) (at the
    points of `ramp` in [0, 1] when given)."""
    ramp = np.linspace(0, 1, n) if ramp is None else ramp
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """`n` sigmas from sigma_max to sigma_min, uniform in log-sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """`n` sigmas from sigma_max to sigma_min at the quantiles of a Beta(alpha, beta) distribution
    (arXiv:2407.12173). Needs scipy (its inverse regularized incomplete beta), as Diffusers does."""
    ppf = _scipy_stats("use_beta_sigmas=True").beta.ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return sigma_min + ppf * (sigma_max - sigma_min)


def _scipy_stats(feature: str) -> Any:
    return import_optional(
        "scipy.stats", f"{feature} needs scipy: pip install scipy (or rapiddiff[scipy]), as Diffusers requires"
    )


# use_*_sigmas config keys -> the function that respaces a schedule (at most one may be on)
SIGMA_SPACINGS = {
    "use_karras_sigmas": karras_sigmas,
    "use_exponential_sigmas": exponential_sigmas,
    "use_beta_sigmas": beta_sigmas,
}


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray, keep_float32: bool = False) -> np.ndarray:
    """Fractional training timesteps of `sigmas`: linear interpolation of log-sigma over the training table.

    keep_float32: the last interpolation in float32 too (as Diffusers' KDPM2 computes it with torch tensors)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]  # (num_train, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    if keep_float32:
        low, high = low.astype(np.float32), high.astype(np.float32)
    return ((1 - w) * low + w * high).reshape(sigmas.shape)


def match_timesteps(schedule: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Index in `schedule` of each of `timesteps`, with tensor ops only (no sync on any device).

    A timestep found twice maps to its second occurrence, as Diffusers' `index_for_timestep`; one not found maps to
    the last index.
    """
    matches = schedule.reshape(1, -1) == timesteps.reshape(-1, 1)  # (B, N)
    count = matches.sum(dim=1, keepdim=True)
    wanted = matches & (matches.cumsum(dim=1) == torch.where(count > 1, 2, 1))
    last = torch.full_like(count[:, 0], schedule.numel() - 1)
    return torch.where(count[:, 0] > 0, wanted.int().argmax(dim=1), last)


def _broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or () per-sample values as (B, 1, ..., 1) to multiply a batch shaped like `like`."""
    return values.flatten().reshape(-1, *([1] * (like.ndim - 1)))
