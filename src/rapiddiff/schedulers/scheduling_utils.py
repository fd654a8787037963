"""SchedulerMixin: everything rapiddiff's schedulers share; each scheduler file holds only its update rule.

Shared here: config parsing (Diffusers' keys, swapping between schedulers), x0 prediction, clipping and dynamic
thresholding, add_noise, the step-index bookkeeping; the tables (betas, timestep spacing, Karras / exponential / beta
sigmas) are `schedule_tables`, the split step and the output `step_plan`.

GPU rules, kept by every scheduler (no step ever waits for the device):
- Tables (betas, alphas_cumprod, sigmas) live on the CPU in float32, as Diffusers computes them. A step reads its
  scalars from them as 0-dim CPU tensors, which multiply device tensors without a sync; Python branches only look at
  Python values (`_timestep_values`, `_sigma_values`, converted once in `set_timesteps`).
- The position in the schedule is a Python int, `step_index`, advanced by every `step`. A timestep passed as a device
  tensor is never read. The index starts at `begin_index` when one is set (pipelines that start mid-schedule call
  `set_begin_index(t_start * scheduler.order)` after `set_timesteps`, as Diffusers' img2img does); otherwise it is
  looked up from the first timestep when that is a Python number or a CPU tensor, and is 0 for a device tensor.
- `add_noise`: the alpha schedulers (DDPM, DDIM, PNDM) gather `alphas_cumprod[timesteps]` on the samples' device; the
  sigma schedulers (Euler, DPM-Solver) use the step index, else the begin index, else match the timesteps against the
  schedule with tensor ops on the timesteps' device (an unknown timestep maps to the last step).
- Stored model outputs (PNDM, DPM-Solver history) are copies: with CUDA graphs the model's output buffer is
  overwritten by its next call.

A step is three calls, so that a compiled whole step (rapiddiff.compile) can run the middle one in its graph:
`plan_step` (host: the position in the schedule, the per-step numbers as a NamedTuple of tensors (`StepPlan.coeffs`,
one class per scheduler, read by name), the model-input scale, the noise drawn with the caller's generator) ->
`apply_plan` (tensor math; branches on the config and the call's options only, so one graph serves every step) ->
`commit_plan` (host: keep history, advance the index). `step` is the three in a row.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from ..configuration import Config, ConfigError, ConfigMixin
from ..utils.outputs import BaseOutput
from ..utils.torch_utils import Device, Generator, to_device
from .schedule_tables import SIGMA_SPACINGS, _broadcast_to, make_betas, match_timesteps
from .scheduler_config import DIFFUSERS_SCHEDULER_KEYS, KARRAS_SCHEDULERS, SchedulerConfig
from .step_plan import PlanUpdate, SchedulerOutput, StepPlan, owned

SCHEDULER_CONFIG_NAME = "scheduler_config.json"

HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")

S = TypeVar("S", bound="SchedulerMixin")


# --- base ----------------------------------------------------------------------------------------------------------
class SchedulerMixin(ConfigMixin):
    """Base of every rapiddiff scheduler (see the module docstring for the rules a step follows)."""

    config_class: ClassVar[type[SchedulerConfig]]
    config_name: ClassVar[str] = SCHEDULER_CONFIG_NAME
    config: SchedulerConfig
    order: ClassVar[int] = 1
    _config_example: ClassVar[str] = "scheduler"
    init_noise_sigma: ClassVar[float] = 1.0  # std of the initial noise (the Euler schedulers compute theirs)
    # Sigma schedulers pin the last alphas_cumprod at 2**-24 under rescale_betas_zero_snr (a zero gives sigma = inf).
    _pin_zero_snr: ClassVar[bool] = False
    # Whether `step` runs before any set_timesteps, over the training timesteps (DDPM, Euler, as in Diffusers).
    _steps_without_set_timesteps: ClassVar[bool] = False
    # What `step` returns (LCM and TCD name their second field otherwise).
    output_class: ClassVar[type[BaseOutput]] = SchedulerOutput
    # Names of the schedulers this one can be swapped for, as Diffusers lists them (see `compatibles`).
    _compatibles: ClassVar[tuple[str, ...]] = KARRAS_SCHEDULERS

    # Diffusers' list of constructor arguments kept only for old configs: rapiddiff's constructors document exactly
    # their config keys (`__init_subclass__`), so none.
    _deprecated_kwargs: ClassVar[list[str]] = []

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.config = self._parse_config(config, kwargs, source=type(self).__name__)
        self.betas = make_betas(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if self._pin_zero_snr and self.config.own("rescale_betas_zero_snr", False):
            self.alphas_cumprod[-1] = 2**-24
        # alphas_cumprod "before" timestep 0: 1, or (set_alpha_to_one=False: DDIM, PNDM, LCM, TCD) the first one
        alpha_to_one = self.config.own("set_alpha_to_one", True)
        self.final_alpha_cumprod = torch.tensor(1.0) if alpha_to_one else self.alphas_cumprod[0]
        self.sigmas: torch.Tensor | None = None
        n = self.config.num_train_timesteps
        self._set_schedule(np.arange(n - 1, -1, -1), None, None)

    # --- config -------------------------------------------------------------------------------------------------
    @classmethod
    def _accepts_config_of(cls, class_name: str) -> bool:
        return class_name.endswith("Scheduler")

    @classmethod
    def _parse_config(cls, config: Mapping[str, Any] | None, overrides: Mapping[str, Any], source: str) -> Config:
        """Diffusers' rules: own keys are used, keys of other schedulers kept aside, `_use_default_values` dropped.

        Keys no Diffusers scheduler has are an error in a config written for this class (and in `overrides`); a
        config of another scheduler class (a swap) keeps them aside too, as Diffusers does.
        """
        values = dict(config or {})
        name = values.get("_class_name")
        foreign = name is not None and name != cls.__name__
        if foreign and not (isinstance(name, str) and cls._accepts_config_of(name)):
            raise ConfigError(f"{source}: is a config for {name!r}, not for a scheduler like {cls.__name__}")
        defaulted = set(values.get("_use_default_values") or ())
        fields = set(cls.config_class._field_names())
        own: dict[str, Any] = {}
        hidden: dict[str, Any] = {}
        unknown = [f"{k}={v!r}" for k, v in overrides.items() if k not in fields]
        for key, value in values.items():
            if key.startswith("_") or key in defaulted:
                continue
            if key in fields:
                own[key] = value
            elif foreign or key in DIFFUSERS_SCHEDULER_KEYS:
                hidden[key] = value
            else:
                unknown.append(f"{key}={value!r}")
        if unknown:
            raise ConfigError(
                f"{source}: key(s) not supported by rapiddiff's {cls.__name__}: {', '.join(unknown)}. "
                f"Supported keys: {', '.join(sorted(fields))}."
            )
        own.update(overrides)
        parsed = cls.config_class.from_dict(own, source=source).with_owner(cls.__name__)
        return parsed.with_extras(hidden, sorted(fields - own.keys()))

    @classmethod
    def from_config(cls: type[S], config: Mapping[str, Any] | None = None, **kwargs: Any) -> S:
        """A scheduler from any scheduler's config (ours or Diffusers'), with `kwargs` overriding its keys."""
        return cls(config, **kwargs)

    @classmethod
    def from_pretrained(
        cls: type[S], pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> S:
        """Load `scheduler_config.json` from a local folder or a Hub repo; other kwargs override config keys."""
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        values = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
        where = "/".join(str(p) for p in (pretrained_model_name_or_path, subfolder, cls.config_name) if p)
        return cls(cls._parse_config(values, kwargs, source=where))

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `scheduler_config.json` (readable by Diffusers) into `save_directory`."""
        self.save_config(save_directory)

    def __getattr__(self, name: str) -> Any:  # only called for names that are not attributes
        return self._config_attribute(name)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.to_dict()})"

    @property
    def compatibles(self) -> list[type[SchedulerMixin]]:
        """This class and the rapiddiff schedulers it can be swapped for (`from_config`), as Diffusers' property
        (names in `_compatibles` that rapiddiff does not implement are left out, as Diffusers leaves out missing ones)."""
        from ..exports import EXPORTS, export  # the package's name table; its classes import this module

        names = dict.fromkeys((type(self).__name__, *self._compatibles))
        return [export(name) for name in names if name in EXPORTS]

    # --- schedule -----------------------------------------------------------------------------------------------
    def _check_trained_betas(self) -> None:
        """A schedule needs a beta per training timestep. Diffusers accepts a shorter trained_betas table when the
        scheduler is built (and saves it); rapiddiff too, and refuses to schedule steps with it."""
        if len(self.betas) != self.config.num_train_timesteps:
            raise ValueError(
                f"{type(self).__name__}: trained_betas has {len(self.betas)} values but num_train_timesteps is "
                f"{self.config.num_train_timesteps}; a schedule needs one beta per training timestep"
            )

    def _check_num_inference_steps(self, num_inference_steps: Any) -> int:
        self._check_trained_betas()
        try:
            n = operator.index(num_inference_steps)
        except TypeError:
            raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}") from None
        limit = self.config.num_train_timesteps
        if not 1 <= n <= limit:
            raise ValueError(f"num_inference_steps={n} must be between 1 and num_train_timesteps={limit}")
        return n

    def _resolve_steps(self, num_inference_steps: int | None, timesteps: Sequence[float] | None) -> int | None:
        """Validate `set_timesteps(num_inference_steps, timesteps=...)`: exactly one of the two, within range."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps to set_timesteps")
        if timesteps is None:
            return self._check_num_inference_steps(num_inference_steps)
        self._check_trained_betas()
        values = [float(t) for t in timesteps]
        limit = self.config.num_train_timesteps
        if not values or any(b >= a for a, b in zip(values, values[1:])) or values[0] >= limit or values[-1] < 0:
            raise ValueError(
                f"timesteps must be a non-empty, strictly descending list within [0, {limit}), got {list(timesteps)}"
            )
        return None

    def _set_schedule(
        self,
        timesteps: np.ndarray,
        device: Device,
        num_inference_steps: int | None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Install a schedule: `timesteps` on `device` (int64, or float32 for the Euler schedulers, unless `dtype`
        says otherwise), its Python values for the step, and a fresh step index."""
        if dtype is None:
            dtype = torch.float32 if np.issubdtype(timesteps.dtype, np.floating) else torch.int64
        timesteps = torch.from_numpy(np.ascontiguousarray(timesteps)).to(dtype)
        self._timestep_values: list[float] = timesteps.tolist()
        self.timesteps = to_device(timesteps, device)
        self.num_inference_steps = num_inference_steps
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _set_sigmas(self, sigmas: np.ndarray | torch.Tensor) -> None:
        """Install the noise levels of the schedule (one more than timesteps, the last one after the final step)."""
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        self._sigma_values: list[float] = self.sigmas.tolist()

    def _respaced_sigmas(self, sigmas: np.ndarray, n: int) -> np.ndarray | None:
        """`n` sigmas per the config's use_karras / exponential / beta sigmas between the ends of `sigmas`
        (descending), or None when none is on. config.sigma_min / sigma_max replace the ends when set; like
        Diffusers (`hasattr(self.config, "sigma_min")`) this also reads them from another scheduler's config."""
        spacing = next((f for key, f in SIGMA_SPACINGS.items() if self.config.own(key)), None)
        if spacing is None:
            return None
        sigma_min, sigma_max = getattr(self.config, "sigma_min", None), getattr(self.config, "sigma_max", None)
        sigma_min = sigma_min if sigma_min is not None else sigmas[-1].item()
        sigma_max = sigma_max if sigma_max is not None else sigmas[0].item()
        return spacing(sigma_min, sigma_max, n)

    def _check_no_respacing(self, what: str) -> None:
        on = [key for key in (*SIGMA_SPACINGS, "use_lu_lambdas") if self.config.own(key)]
        if on:
            raise ValueError(f"{type(self).__name__}: {what} cannot be combined with {on[0]}=True")

    def _train_sigmas(self) -> np.ndarray:
        """sigma of every training timestep, sqrt((1 - alphas_cumprod) / alphas_cumprod), float32 ascending."""
        return (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """The model input at this step: the sample itself, except for the Euler schedulers."""
        return sample

    # --- step index ---------------------------------------------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        """Position in `timesteps` of the next step (None until the first step or scale_model_input)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Position of the first step, set by pipelines that start mid-schedule (None: not set)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next loop at `timesteps[begin_index]`; call after `set_timesteps` (which clears it)."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or begin_index < 0:
            raise ValueError(f"begin_index must be an int >= 0, got {begin_index!r}")
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of `timestep` in the schedule (the second one of a repeated timestep); reads its value."""
        values = self._timestep_values if schedule_timesteps is None else schedule_timesteps.tolist()
        t = float(timestep)
        found = [i for i, v in enumerate(values) if v == t]
        if not found:
            raise ValueError(f"timestep {t:g} is not one of the scheduler's timesteps {values}")
        return found[1] if len(found) > 1 else found[0]

    def _off_schedule_value(self, timestep: float | torch.Tensor) -> float | None:
        """The value of `timestep` when it is not one of the schedule's timesteps, for the schedulers whose update
        Diffusers computes from the timestep's value (DDIM, PNDM); else None.

        A Python number is always checked. A tensor is read only where `_index` reads it anyway - a CPU tensor at
        the first step of a loop without a begin index - so a loop reads no more values than before."""
        if isinstance(timestep, torch.Tensor):
            first_lookup = self._step_index is None and self._begin_index is None
            if not first_lookup or timestep.device.type != "cpu" or timestep.numel() != 1:
                return None
            timestep = float(timestep)
        return None if timestep in self._timestep_values else timestep

    def _index(self, timestep: float | torch.Tensor) -> int:
        """The schedule position of the current step (see the module docstring for the rule)."""
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            elif isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
                self._step_index = 0  # reading a device timestep would sync: pipelines set a begin index instead
            else:
                self._step_index = self.index_for_timestep(timestep)
        if self._step_index >= len(self._timestep_values):
            raise ValueError(
                f"{type(self).__name__}: all {len(self._timestep_values)} steps are done; call set_timesteps again"
            )
        return self._step_index

    def _require_schedule(self) -> None:
        if self.num_inference_steps is None and not self._steps_without_set_timesteps:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step")

    def previous_timestep(self, timestep: int | torch.Tensor) -> torch.Tensor:
        """Diffusers' method (DDPM, LCM, TCD): the timestep after `timestep` in the schedule (-1 after the last one);
        before `set_timesteps`, timestep - 1."""
        if self.num_inference_steps is None:
            return torch.as_tensor(timestep) - 1
        schedule = self.timesteps.cpu()
        hits = (schedule == torch.as_tensor(timestep).cpu()).nonzero()
        if len(hits) == 0:
            raise ValueError(f"previous_timestep: {timestep} is not one of the scheduler's timesteps")
        index = int(hits[0, 0])
        return schedule[index + 1] if index + 1 < len(schedule) else torch.tensor(-1)

    # --- shared math --------------------------------------------------------------------------------------------
    def _alpha_prod(self, t: int) -> torch.Tensor:
        """alphas_cumprod at training timestep t (a 0-dim CPU tensor); t < 0 means "before the first"."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _predict_x0(self, model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor) -> torch.Tensor:
        """x0 from the model output under `prediction_type` (alpha_prod_t = alphas_cumprod at this timestep)."""
        beta_prod_t = 1 - alpha_prod_t
        if self.config.prediction_type == "epsilon":
            return (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        if self.config.prediction_type == "sample":
            return model_output
        return (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output  # v_prediction

    def _predict_eps(
        self, model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor
    ) -> torch.Tensor:
        """The noise epsilon from the model output under `prediction_type`."""
        beta_prod_t = 1 - alpha_prod_t
        if self.config.prediction_type == "epsilon":
            return model_output
        if self.config.prediction_type == "sample":
            return (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
        return (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample  # v_prediction

    def _clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding when enabled, else clipping to +-clip_sample_range when enabled."""
        if self.config.thresholding:
            return self._threshold_sample(x0)
        if self.config.clip_sample:
            return x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Imagen's dynamic thresholding (arXiv:2205.11487): per sample, s = the dynamic_thresholding_ratio quantile
        of |x0| clamped to [1, sample_max_value]; x0 is clipped to [-s, s] and divided by s."""
        dtype = sample.dtype
        batch, *rest = sample.shape
        flat = sample.float() if dtype not in (torch.float32, torch.float64) else sample
        flat = flat.reshape(batch, math.prod(rest))
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = torch.clamp(s, min=1, max=self.config.sample_max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(sample.shape).to(dtype)

    def _alpha_scales(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alphas_cumprod[t]) and sqrt(1 - alphas_cumprod[t]) per sample, gathered on `like`'s device."""
        alphas_cumprod = to_device(self.alphas_cumprod, like.device).to(like.dtype)
        alpha_prod = alphas_cumprod[to_device(torch.as_tensor(timesteps), like.device)]
        return _broadcast_to(alpha_prod**0.5, like), _broadcast_to((1 - alpha_prod) ** 0.5, like)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion to training timesteps `timesteps` (one per sample, or one for all)."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._alpha_scales(timesteps, original_samples)
        return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target sqrt(a) * noise - sqrt(1 - a) * sample at training timesteps `timesteps`."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._alpha_scales(timesteps, sample)
        return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * sample

    def _sigma_for_noise(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The schedule sigma that `add_noise` uses for each sample, broadcastable against `like`.

        Diffusers' rule: the current step once stepping began (inpainting re-noises after each step), else the begin
        index (img2img noises before the first step), else the timesteps' own positions in the schedule.
        """
        if self._begin_index is not None:
            index = self._step_index if self._step_index is not None else self._begin_index
            return self.sigmas[index].to(like.dtype)  # 0-dim CPU tensor: no device traffic
        timesteps = torch.as_tensor(timesteps)
        indices = match_timesteps(to_device(self.timesteps, timesteps.device), timesteps)
        sigmas = to_device(self.sigmas, like.device).to(like.dtype)
        return _broadcast_to(sigmas[to_device(indices, like.device)], like)

    # --- the step protocol (see the module docstring) -------------------------------------------------------------
    def step(
        self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor, return_dict: bool = True
    ) -> BaseOutput | tuple[torch.Tensor, ...]:
        """One step from `timestep` to the next one of the schedule (schedulers whose step takes no options)."""
        return self._step(model_output, timestep, sample, return_dict)

    def _step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool,
        **step_kwargs: Any,
    ) -> BaseOutput | tuple[torch.Tensor, ...]:
        """An eager `step` with the scheduler's options `step_kwargs`: plan, apply, commit."""
        self._require_schedule()
        return self._run_plan(model_output, sample, self.plan_step(timestep, sample, **step_kwargs), return_dict)

    def plan_step(self, timestep: float | torch.Tensor, sample: torch.Tensor, **step_kwargs: Any) -> StepPlan:
        """Prepare the next step on the host; `step_kwargs` are the scheduler's `step` options (eta, generator...)."""
        i = self._index(timestep)
        plan = self._plan(i, sample, **{**self._step_defaults(), **step_kwargs})
        plan.model_input_scale = self._model_input_scale(i)
        return plan

    @classmethod
    @functools.cache
    def _step_defaults(cls) -> dict[str, Any]:
        """`step`'s options (its parameters after `sample`, but `return_dict`) and their defaults, declared there once:
        `plan_step` fills in the ones a caller leaves out before `_plan` sees them."""
        params = list(inspect.signature(cls.step).parameters.values())[4:]
        return {p.name: p.default for p in params if p.name != "return_dict"}

    def _model_input_scale(self, i: int) -> torch.Tensor | None:
        """What step i's model input is multiplied by (see `StepPlan.model_input_scale`); None: not scaled."""
        return None

    def _plan(self, i: int, sample: torch.Tensor, **step_kwargs: Any) -> StepPlan:
        """Step i's plan; `step_kwargs` are all of `step`'s options."""
        raise NotImplementedError(f"{type(self).__name__} does not split its step into plan / apply / commit")

    def apply_plan(self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan) -> PlanUpdate:
        """The update: the previous sample, the predicted x0 (or None), the tensors `commit_plan` keeps."""
        raise NotImplementedError(f"{type(self).__name__} does not split its step into plan / apply / commit")

    def commit_plan(self, plan: StepPlan, stored: tuple[torch.Tensor, ...]) -> None:
        """After the update: keep `stored` (copies where the caller needs them) and move on to the next step."""
        self._step_index = plan.index + 1

    def _run_plan(
        self, model_output: torch.Tensor, sample: torch.Tensor, plan: StepPlan, return_dict: bool
    ) -> SchedulerOutput | tuple[torch.Tensor, ...]:
        """apply + commit for an eager `step`."""
        update = self.apply_plan(model_output, sample, plan)
        self.commit_plan(plan, tuple(owned(s, model_output) for s in update.stored))
        return self._output(update.prev_sample, update.pred_original_sample, return_dict)

    def _output(
        self, prev_sample: torch.Tensor, pred_original_sample: torch.Tensor | None, return_dict: bool
    ) -> BaseOutput | tuple[torch.Tensor, ...]:
        out = self.output_class(prev_sample, pred_original_sample)
        return out if return_dict else out.to_tuple()


class GeneratorStepMixin(SchedulerMixin):
    """Schedulers whose `step` takes one option, the generator of the noise it draws (DDPM, Euler ancestral, Heun,
    KDPM2, DPM-Solver single-step, LCM)."""

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: Generator | None = None,
        return_dict: bool = True,
    ) -> BaseOutput | tuple[torch.Tensor, ...]:
        """One step from `timestep` to the next one of the schedule, its noise drawn with `generator`."""
        return self._step(model_output, timestep, sample, return_dict, generator=generator)
