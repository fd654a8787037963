"""The one denoising loop every pipeline runs, and the timestep/guidance helpers around it.

A pipeline builds `predict_noise(latents, t, i, scale_model_input) -> noise_pred`, a closure holding its model call
(classifier-free guidance batching, the scheduler's input scaling, extra model inputs, ControlNet residuals, IF's
learned-variance split), and hands it to `denoise`.
The loop itself never reads tensor values: no host syncs, and `t` stays a device tensor (the model gets it as float32
whatever the scheduler's dtype), so a compiled model sees the same graph at every step and across schedulers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

# scale_model_input(x): the scheduler's scaling of this step's model input, given by the step runner (eager: the
# scheduler's `scale_model_input(x, t)`; a compiled whole step: the step plan's, whose scale is a graph input).
ScaleModelInput = Callable[[torch.Tensor], torch.Tensor]
PredictNoise = Callable[[torch.Tensor, torch.Tensor, int, ScaleModelInput], torch.Tensor]
AfterStep = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
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


# --- Diffusers' older per-step callback (DeepFloyd IF, x4 upscaler) -----------------------------------------------------
def step_callback(
    callback: StepCallback | None, callback_steps: Any, order: int = 1, num_timesteps: int = 0, warmup: int = 0
) -> StepEndCallback | None:
    """`callback(step, t, latents)` as a step-end callback for `denoise` (it reads the latents, changes nothing), at
    Diffusers' steps: where the progress bar advances (the last step, or after the `warmup` steps every `order`-th)
    and `i % callback_steps == 0`. step is `i // order` as the SD pipelines and the x4 upscaler count (IF: order 1)."""
    if callback_steps is None:  # every step (Diffusers' SD pipelines have no default)
        callback_steps = 1
    if not isinstance(callback_steps, int) or isinstance(callback_steps, bool) or callback_steps < 1:
        raise ValueError(f"callback_steps must be a positive int, got {callback_steps!r}")
    if callback is None:
        return None
    if not callable(callback):
        raise TypeError(f"callback must be callable(step, timestep, latents), got {callback!r}")

    def on_step_end(pipe: Any, i: int, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        advances = i == num_timesteps - 1 or (i + 1 > warmup and (i + 1) % order == 0)
        if advances and i % callback_steps == 0:
            callback(i // order, t, tensors["latents"])
        return {}

    return on_step_end


# --- one step ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepParts:
    """What every step of one loop runs: the pipeline's model call, its scheduler and their fixed arguments."""

    scheduler: Scheduler
    predict_noise: PredictNoise
    step_kwargs: dict[str, Any]
    after_step: AfterStep | None = None

    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, i: int, scale_model_input: ScaleModelInput
    ) -> torch.Tensor:
        """The model's prediction. The model gets `t` as float32 whatever the scheduler's dtype (int64 or float32): a
        compiled model keeps one graph across a scheduler swap, and the timestep embedding casts to float32 anyway."""
        return self.predict_noise(latents, t.to(torch.float32), i, scale_model_input)

    def finish(self, latents: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        return self.after_step(latents, i, t) if self.after_step is not None else latents


# runner(parts, latents, t, i) -> latents: how `denoise` runs a step. `run_step` unless the pipeline's public
# `step_runner` says otherwise (rapiddiff.compile: a whole step compiled as one graph, or a step checked for host syncs).
StepRunner = Callable[[StepParts, torch.Tensor, torch.Tensor, int], torch.Tensor]


def run_step(parts: StepParts, latents: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
    """Model, scheduler, after_step."""
    noise_pred = parts.predict(latents, t, i, lambda x: parts.scheduler.scale_model_input(x, t))
    latents = parts.scheduler.step(noise_pred, t, latents, **parts.step_kwargs, return_dict=False)[0]
    return parts.finish(latents, t, i)


# --- the loop ----------------------------------------------------------------------------------------------------------
def denoise(
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    num_inference_steps: int,
    predict_noise: PredictNoise,
    *,
    scheduler: Scheduler,
    step_runner: StepRunner | None = None,
    progress: ProgressReporter | None = None,
    extra_step_kwargs: dict[str, Any] | None = None,
    after_step: AfterStep | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    pipe: Any = None,
    callback_on_step_end: StepEndCallback | None = None,
    callback_on_step_end_tensor_inputs: Sequence[str] = (),
) -> torch.Tensor:
    """Run `scheduler` over `timesteps` from `latents`; returns the final latents.

    step_runner: how one step runs (None: `run_step`). progress: the progress bar factory (None: no bar).
    tensors: the conditioning tensors a step-end callback may read and replace (prompt_embeds...); `predict_noise`
        reads them from this same dict, so a replacement takes effect at the next step.
    after_step(latents, i, t): applied after each scheduler step (4-channel inpainting pastes the known region back).
    pipe: what step-end callbacks receive; a callback stops the loop early by setting `pipe._interrupt`.
    """
    if getattr(scheduler, "begin_index", 0) is None:  # the loop starts the schedule: no lookup of `t` (a value read)
        scheduler.set_begin_index(0)
    parts = StepParts(scheduler, predict_noise, extra_step_kwargs or {}, after_step)
    run = step_runner or run_step
    tensors = tensors if tensors is not None else {}
    warmup = len(timesteps) - num_inference_steps * scheduler.order
    with (progress or _no_progress)(total=num_inference_steps) as bar:
        for i, t in enumerate(timesteps):
            if pipe is not None and pipe.interrupt:  # set by a callback to stop early, as in Diffusers
                continue
            latents = run(parts, latents, t, i)
            if callback_on_step_end is not None:
                latents = _run_callback(
                    pipe, callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents, tensors
                )
            if i == len(timesteps) - 1 or (i + 1 > warmup and (i + 1) % scheduler.order == 0):
                bar.update()
    return latents


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def _no_progress(total: int | None = None) -> AbstractContextManager[ProgressBar]:
    return contextlib.nullcontext(_NoBar())


def _run_callback(
    pipe: Any,
    callback: StepEndCallback,
    names: Sequence[str],
    i: int,
    t: torch.Tensor,
    latents: torch.Tensor,
    tensors: dict[str, torch.Tensor],
) -> torch.Tensor:
    inputs = {n: latents if n == "latents" else tensors[n] for n in names}
    outputs = callback(pipe, i, t, inputs)
    if not isinstance(outputs, dict):
        raise TypeError(f"callback_on_step_end must return a dict of tensors (its callback_kwargs), got {outputs!r}")
    unknown = [k for k in outputs if k != "latents" and k not in tensors]
    if unknown:
        raise ValueError(
            f"callback_on_step_end returned unknown tensor(s) {unknown}; it may replace {['latents', *tensors]}"
        )
    tensors.update((k, v) for k, v in outputs.items() if k != "latents")
    return outputs.get("latents", latents)
