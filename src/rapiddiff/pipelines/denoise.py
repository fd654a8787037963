"""The one denoising loop every pipeline runs, its step object, and the timestep/guidance helpers around it.

A pipeline builds a `DenoisingStep` (its model, the call's scheduler and guidance, its hooks) and hands it to `denoise`
with the call's `Schedule` and conditioning tensors.
The loop itself never reads tensor values: no host syncs, and `t` stays a device tensor (the model gets it as float32
whatever the scheduler's dtype), so a compiled model sees the same graph at every step and across schedulers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol

import torch

# scale_model_input(x): the scheduler's scaling of this step's model input, given by the step runner (eager: the
# scheduler's `scale_model_input(x, t)`; a compiled whole step: the step plan's, whose scale is a graph input).
ScaleModelInput = Callable[[torch.Tensor], torch.Tensor]
# The tensors the model conditions on, by callback name ("prompt_embeds", inpainting's "mask"...).
Conditioning = Mapping[str, Any]
# model_inputs(x, t, i, conditioning) -> (x, extra model kwargs): runs on the guidance-batched model input before the
# model (inpainting appends the mask channels, ControlNet computes its residuals, the upscalers append the noised
# low-res image).
ModelInputs = Callable[[torch.Tensor, torch.Tensor, int, Conditioning], tuple[torch.Tensor, dict[str, Any]]]
# after_step(latents, t, i, conditioning) -> latents: after each scheduler step (4-channel inpainting pastes the known
# region back).
AfterStep = Callable[[torch.Tensor, torch.Tensor, int, Conditioning], torch.Tensor]
StepEndCallback = Callable[[Any, int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class Scheduler(Protocol):
    """What the pipelines and the loop use of a scheduler (any of rapiddiff's, or a Diffusers-style scheduler)."""

    order: int
    timesteps: torch.Tensor
    init_noise_sigma: float | torch.Tensor
    config: Any

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None: ...

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor: ...

    def step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any: ...

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> Any: ...


# progress(total=n) -> a context manager yielding a bar with `update()` (the pipeline's tqdm bar).
ProgressReporter = Callable[..., AbstractContextManager[ProgressBar]]


# --- timesteps -------------------------------------------------------------------------------------------------------
def _accepts(fn: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(fn).parameters


def check_timesteps_args(
    scheduler: Scheduler, num_inference_steps: Any, timesteps: Sequence[int] | None, sigmas: Sequence[float] | None
) -> None:
    """Validate a call's schedule arguments up front (what `retrieve_timesteps` will do)."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass at most one of timesteps and sigmas (a custom schedule), got both")
    for name, custom in (("timesteps", timesteps), ("sigmas", sigmas)):
        if custom is None:
            continue
        if len(custom) == 0:
            raise ValueError(f"{name} must be a non-empty list, got {custom!r}")
        if not _accepts(scheduler.set_timesteps, name):
            raise ValueError(f"{type(scheduler).__name__}.set_timesteps does not accept custom {name}")
        return
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")


def retrieve_timesteps(
    scheduler: Scheduler,
    num_inference_steps: int | None,
    device: torch.device | str | None,
    timesteps: Sequence[int] | None = None,
    sigmas: Sequence[float] | None = None,
) -> tuple[torch.Tensor, int]:
    """Set the scheduler's schedule (default spacing, or custom timesteps / sigmas); (timesteps, num_inference_steps)."""
    check_timesteps_args(scheduler, num_inference_steps, timesteps, sigmas)
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps), device=device)
    elif sigmas is not None:
        scheduler.set_timesteps(sigmas=list(sigmas), device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler.timesteps, num_inference_steps
    return scheduler.timesteps, len(scheduler.timesteps)


def truncate_timesteps(scheduler: Scheduler, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
    """img2img/inpainting: keep the last `strength` share of the schedule; (timesteps, steps actually run)."""
    init = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - init, 0)
    timesteps = scheduler.timesteps[start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return timesteps, num_inference_steps - start


def extra_step_kwargs(scheduler: Scheduler, generator: Any, eta: float) -> dict[str, Any]:
    """`eta` and `generator` for the schedulers whose `step` takes them (DDIM, ancestral samplers)."""
    kwargs: dict[str, Any] = {}
    if _accepts(scheduler.step, "eta"):
        kwargs["eta"] = eta
    if _accepts(scheduler.step, "generator"):
        kwargs["generator"] = generator
    return kwargs


# --- classifier-free guidance ---------------------------------------------------------------------------------------
def combine_guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    return uncond + guidance_scale * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Section 3.4 of arXiv:2305.08891: match the guided prediction's std to the conditional one's, then blend."""
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def apply_guidance(noise_pred: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Guide a model output batched as [unconditional; conditional]."""
    uncond, cond = noise_pred.chunk(2)
    guided = combine_guidance(uncond, cond, guidance_scale)
    return rescale_guidance(guided, cond, guidance_rescale) if guidance_rescale > 0 else guided


# --- the schedule of one call ---------------------------------------------------------------------------------------
class Schedule(NamedTuple):
    """The timesteps one call runs, and how Diffusers' progress bar counts them."""

    timesteps: torch.Tensor
    num_inference_steps: int  # steps actually run (img2img: its strength's share)
    order: int  # the scheduler's model evaluations per step (Heun, KDPM2: 2)

    @property
    def warmup(self) -> int:
        """Model evaluations before the progress bar's first advance (Diffusers' `num_warmup_steps`)."""
        return len(self.timesteps) - self.num_inference_steps * self.order

    def advances(self, i: int) -> bool:
        """Whether the progress bar advances after evaluation i: the last one, or every `order`-th after warm-up."""
        return i == len(self.timesteps) - 1 or (i + 1 > self.warmup and (i + 1) % self.order == 0)


# --- Diffusers' older per-step callback (DeepFloyd IF, x4 upscaler) -----------------------------------------------------
def step_callback(
    callback: StepCallback | None, callback_steps: Any, order: int = 1, schedule: Schedule | None = None
) -> StepEndCallback | None:
    """`callback(step, t, latents)` as a step-end callback (it reads the latents, changes nothing), at Diffusers'
    steps: where the progress bar advances (`schedule.advances`) and `i % callback_steps == 0`. step is `i // order`
    as the SD pipelines and the x4 upscaler count (IF: order 1)."""
    if callback_steps is None:  # every step (Diffusers' SD pipelines have no default)
        callback_steps = 1
    if not isinstance(callback_steps, int) or isinstance(callback_steps, bool) or callback_steps < 1:
        raise ValueError(f"callback_steps must be a positive int, got {callback_steps!r}")
    if callback is None:
        return None
    if not callable(callback):
        raise TypeError(f"callback must be callable(step, timestep, latents), got {callback!r}")

    def on_step_end(pipe: Any, i: int, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if (schedule is None or schedule.advances(i)) and i % callback_steps == 0:
            callback(i // order, t, tensors["latents"])
        return {}

    return on_step_end


# --- one step ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance at one step: the model runs on [unconditional; conditional] when `scale` > 1, and its
    output is combined (with the optional rescale of arXiv:2305.08891)."""

    scale: float
    rescale: float = 0.0

    @property
    def active(self) -> bool:
        return self.scale > 1

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """The model input: doubled for the two guidance halves when guiding."""
        return torch.cat([x] * 2) if self.active else x

    def __call__(self, model_output: torch.Tensor, channels: int) -> torch.Tensor:
        """The model's output -> the noise prediction (`channels`: the sample's channels)."""
        return apply_guidance(model_output, self.scale, self.rescale) if self.active else model_output


class StepInput(NamedTuple):
    """What changes from step to step: the sample, the timestep (a device tensor), the step's index in the schedule,
    and the conditioning tensors by callback name (a step-end callback may replace them; never mutated)."""

    latents: torch.Tensor
    t: torch.Tensor
    i: int
    conditioning: Conditioning


@dataclasses.dataclass(frozen=True)
class DenoisingStep:
    """One denoising step, in named parts:

        model-input hook -> model call -> guidance -> scheduler step -> after-step hook

    The eager loop runs it with `run_step`; `rapiddiff.compile`'s `WholeStep` runs `predict` and the scheduler's
    planned update as one graph. The model gets `t` as float32 whatever the scheduler's dtype (int64 or float32): a
    compiled model keeps one graph across a scheduler swap, and the timestep embedding casts to float32 anyway.
    """

    model: Callable[..., Any]  # the UNet: model(x, t, encoder_hidden_states=..., return_dict=False, **extra)[0]
    scheduler: Scheduler  # the call's own
    guidance: Guidance
    step_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # eta, generator (`extra_step_kwargs`)
    model_inputs: ModelInputs | None = None
    # Whether `model_inputs` sees the model input before the scheduler scales it (IF-II: its upscaled image is scaled
    # with the sample, as in Diffusers) or after (SD: mask channels, control residuals, the x4's image).
    hook_before_scaling: bool = False
    after_step: AfterStep | None = None

    def predict(self, x: StepInput, scale_model_input: ScaleModelInput) -> torch.Tensor:
        """The guided noise prediction; `scale_model_input` is the scheduler's (eager) or the step plan's (compiled)."""
        t = x.t.to(torch.float32)
        model_input = self.guidance.batch(x.latents)
        extra: dict[str, Any] = {}
        if self.model_inputs is not None and self.hook_before_scaling:
            model_input, extra = self.model_inputs(model_input, t, x.i, x.conditioning)
        model_input = scale_model_input(model_input)
        if self.model_inputs is not None and not self.hook_before_scaling:
            model_input, extra = self.model_inputs(model_input, t, x.i, x.conditioning)
        encoder_hidden_states = x.conditioning["prompt_embeds"]
        out = self.model(model_input, t, encoder_hidden_states=encoder_hidden_states, return_dict=False, **extra)[0]
        return self.guidance(out, x.latents.shape[1])

    def finish(self, latents: torch.Tensor, x: StepInput) -> torch.Tensor:
        """The after-step hook on the scheduler's new sample."""
        return self.after_step(latents, x.t, x.i, x.conditioning) if self.after_step is not None else latents


# runner(step, x) -> latents: how `denoise` runs a step. `run_step` unless the pipeline's public `step_runner` says
# otherwise (rapiddiff.compile: a whole step compiled as one graph, or a step checked for host syncs).
StepRunner = Callable[[DenoisingStep, StepInput], torch.Tensor]


def run_step(step: DenoisingStep, x: StepInput) -> torch.Tensor:
    """Model, guidance, scheduler, after-step hook: eagerly."""
    noise_pred = step.predict(x, lambda sample: step.scheduler.scale_model_input(sample, x.t))
    latents = step.scheduler.step(noise_pred, x.t, x.latents, **step.step_kwargs, return_dict=False)[0]
    return step.finish(latents, x)


# --- the loop ----------------------------------------------------------------------------------------------------------
class StepEndResult(NamedTuple):
    """What a step-end callback leaves for the next step: latents and conditioning (replaced or not), the guidance
    (a callback may lower the scale) and whether to stop."""

    latents: torch.Tensor
    conditioning: Conditioning
    guidance: Guidance
    interrupt: bool


# on_step_end(i, t, latents, conditioning) -> StepEndResult: the pipeline's step-end callbacks, bound to the call.
StepEnd = Callable[[int, torch.Tensor, torch.Tensor, Conditioning], StepEndResult]


def denoise(
    latents: torch.Tensor,
    schedule: Schedule,
    step: DenoisingStep,
    conditioning: Conditioning,
    *,
    runner: StepRunner | None = None,
    progress: ProgressReporter | None = None,
    on_step_end: StepEnd | None = None,
) -> torch.Tensor:
    """Run `step` over `schedule` from `latents`; returns the final latents.

    runner: how one step runs (None: `run_step`). progress: the progress bar factory (None: no bar).
    on_step_end: runs after each step; it may replace the latents and conditioning, change the guidance, or stop.
    """
    scheduler = step.scheduler
    if getattr(scheduler, "begin_index", 0) is None:  # the loop starts the schedule: no lookup of `t` (a value read)
        scheduler.set_begin_index(0)
    run = runner or run_step
    with (progress or _no_progress)(total=schedule.num_inference_steps) as bar:
        for i, t in enumerate(schedule.timesteps):
            latents = run(step, StepInput(latents, t, i, conditioning))
            if on_step_end is not None:
                latents, conditioning, guidance, interrupt = on_step_end(i, t, latents, conditioning)
                if guidance != step.guidance:
                    step = dataclasses.replace(step, guidance=guidance)
                if interrupt:  # a callback stops the loop early, as Diffusers' `pipe._interrupt = True`
                    break
            if schedule.advances(i):
                bar.update()
    return latents


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def _no_progress(total: int | None = None) -> AbstractContextManager[ProgressBar]:
    return contextlib.nullcontext(_NoBar())


def run_step_end_callback(
    pipe: Any,
    callback: StepEndCallback,
    names: Sequence[str],
    i: int,
    t: torch.Tensor,
    latents: torch.Tensor,
    conditioning: Conditioning,
) -> tuple[torch.Tensor, Conditioning]:
    """Diffusers' `callback_on_step_end(pipe, i, t, callback_kwargs)`: (latents, conditioning) after its changes."""
    inputs = {n: latents if n == "latents" else conditioning[n] for n in names}
    outputs = callback(pipe, i, t, inputs)
    if not isinstance(outputs, dict):
        raise TypeError(f"callback_on_step_end must return a dict of tensors (its callback_kwargs), got {outputs!r}")
    unknown = [k for k in outputs if k != "latents" and k not in conditioning]
    if unknown:
        raise ValueError(
            f"callback_on_step_end returned unknown tensor(s) {unknown}; it may replace {['latents', *conditioning]}"
        )
    changed = {k: v for k, v in outputs.items() if k != "latents"}
    return outputs.get("latents", latents), ({**conditioning, **changed} if changed else conditioning)
