"""`SchedulerConfig`: a scheduler's config, parsed from Diffusers' `scheduler_config.json` (every scheduler subclasses
it with its own keys; the keys other schedulers use are kept aside for later swaps, as Diffusers keeps them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from ..configuration import Config, ConfigError
from .schedule_tables import SIGMA_SPACINGS, _scipy_stats

# Every config key of Diffusers' Stable-Diffusion-compatible schedulers. A scheduler keeps the ones it does not use
# aside ("hidden", as Diffusers does), so that a later swap to another scheduler still sees them; any other key is an
# error.
DIFFUSERS_SCHEDULER_KEYS = frozenset(
    """algorithm_type beta_end beta_schedule beta_start clip_sample clip_sample_range disable_corrector
    dynamic_thresholding_ratio euler_at_final final_sigmas_type flow_shift interpolation_type lambda_min_clipped
    lower_order_final num_train_timesteps predict_x0 prediction_type rescale_betas_zero_snr rho sample_max_value
    set_alpha_to_one shift_terminal sigma_data sigma_max sigma_min sigma_schedule skip_prk_steps solver_order solver_p
    solver_type steps_offset thresholding time_shift_type timestep_spacing timestep_type trained_betas use_beta_sigmas
    use_dynamic_shifting use_exponential_sigmas use_flow_sigmas use_karras_sigmas use_lu_lambdas variance_type""".split()
)
# ... and of the consistency-model schedulers (LCM, TCD) and the DPM-Solver SDE.
DIFFUSERS_SCHEDULER_KEYS |= {"noise_sampler_seed", "original_inference_steps", "timestep_scaling"}
SC = TypeVar("SC", bound="SchedulerConfig")


# --- config --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SchedulerConfig(Config):
    """Keys every scheduler has. Subclasses add theirs and list the allowed values of their own keys in `choices`
    (merged along the class hierarchy: a subclass's entry replaces its base's for the same key).

    Besides its fields a scheduler config carries two things Diffusers' does: `hidden`, the keys of other schedulers
    it was given (kept for later swaps, and saved), and `defaulted`, the fields not given (`_use_default_values`:
    on a swap the new scheduler's own defaults win for those, e.g. Euler keeps "linspace" spacing when built from
    SD 1.5's PNDM config).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    # key -> allowed values. Keys of newer Diffusers versions that rapiddiff does not implement allow only "off".
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
    }

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int):
            raise ConfigError(f"{name}: num_train_timesteps must be an int, got {self.num_train_timesteps!r}")
        if self.num_train_timesteps < 2:
            raise ConfigError(f"{name}: num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        for key, allowed in self._choices().items():
            self.check_choice(key, allowed)
        on = [key for key in SIGMA_SPACINGS if self.own(key)]
        if len(on) > 1:
            raise ConfigError(f"{name}: only one of {', '.join(SIGMA_SPACINGS)} can be True, got {', '.join(on)}")
        if self.own("use_beta_sigmas"):
            _scipy_stats(f"{name}: use_beta_sigmas=True")

    @classmethod
    def _choices(cls) -> dict[str, tuple[Any, ...]]:
        """`choices` of the class and its bases, the nearest class's entry for each key."""
        merged: dict[str, tuple[Any, ...]] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("choices", {}))
        return merged

    @property
    def defaulted(self) -> tuple[str, ...]:
        return self.__dict__.get("_defaulted", ())

    def with_extras(self: SC, hidden: Mapping[str, Any], defaulted: Sequence[str]) -> SC:
        object.__setattr__(self, "_defaulted", tuple(defaulted))
        return self.with_hidden(hidden)

    def own(self, name: str, default: Any = None) -> Any:
        """The class's own field `name`, or `default` when the class has no such field: never a hidden key (a PNDM
        built from a zero-SNR DDIM config must not rescale its betas, as in Diffusers)."""
        return getattr(self, name) if name in self._field_names() else default

    # Mapping view as Diffusers shows it: fields, then `_use_default_values`, then the hidden keys (e.g.
    # `config.variance_type` of an Euler scheduler built from IF's DDPM config).
    def __getitem__(self, key: str) -> Any:
        if key == "_use_default_values" and self.defaulted:
            return list(self.defaulted)
        return super().__getitem__(key)

    def _own_keys(self) -> Iterator[str]:
        yield from super()._own_keys()
        if self.defaulted:
            yield "_use_default_values"

    def __len__(self) -> int:
        return super().__len__() + bool(self.defaulted)

    def replace(self: SC, **changes: Any) -> SC:
        return super().replace(**changes).with_extras(self.hidden, [k for k in self.defaulted if k not in changes])


# --- key groups: each declared once, by the configs of the schedulers that have them -------------------------------
@dataclasses.dataclass(frozen=True)
class ThresholdingConfig(SchedulerConfig):
    """Dynamic thresholding of the predicted x0 (Imagen, arXiv:2205.11487): DDPM, DDIM, the consistency schedulers and
    the exponential-integrator solvers."""

    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0


@dataclasses.dataclass(frozen=True)
class ClipSampleConfig(ThresholdingConfig):
    """... and clipping of x0 (`_clip_x0`), with zero-terminal-SNR betas: DDPM, DDIM, LCM, TCD."""

    clip_sample: bool = True
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False


@dataclasses.dataclass(frozen=True)
class SigmaSpacingConfig(SchedulerConfig):
    """Respaced sigmas (Karras, exponential or beta, see `SIGMA_SPACINGS`), and "linspace" timesteps by default: the
    sigma schedulers and the exponential-integrator solvers."""

    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    timestep_spacing: str = "linspace"


@dataclasses.dataclass(frozen=True)
class SolverConfig(SigmaSpacingConfig, ThresholdingConfig):
    """The exponential-integrator solvers' keys (DPM-Solver multistep and single-step, DEIS, UniPC). The flow-matching
    and dynamic-shifting keys of newer Diffusers versions allow only "off".

    (Of two bases the first one's defaults win, as its attributes would: "linspace" over the base's "leading".)"""

    solver_order: int = 2
    lower_order_final: bool = True
    use_flow_sigmas: bool | None = False
    flow_shift: float = 1.0  # only read with use_flow_sigmas
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    choices: ClassVar = {
        "solver_order": (1, 2, 3),
        "use_flow_sigmas": (False, None),
        "use_dynamic_shifting": (False,),
        "time_shift_type": ("exponential",),
    }


# Diffusers' KarrasDiffusionSchedulers: what a Stable Diffusion pipeline's scheduler can be swapped for (`compatibles`).
KARRAS_SCHEDULERS = tuple(
    """DDIMScheduler DDPMScheduler PNDMScheduler LMSDiscreteScheduler EulerDiscreteScheduler HeunDiscreteScheduler
    EulerAncestralDiscreteScheduler DPMSolverMultistepScheduler DPMSolverSinglestepScheduler KDPM2DiscreteScheduler
    KDPM2AncestralDiscreteScheduler DEISMultistepScheduler UniPCMultistepScheduler DPMSolverSDEScheduler
    EDMEulerScheduler""".split()
)
