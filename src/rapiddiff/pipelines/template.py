"""The call template every pipeline follows: its arguments as one checked object, one generate path.

A pipeline's `__call__` is Diffusers' signature, built by `call_signature.pipeline_call` from the parameters' order
and its `CallArgs` fields; it hands the arguments over in one go, `self.generate(Img2ImgArgs(...))`.

`CallArgs` (a dataclass, one subclass per pipeline for its own arguments) checks what needs no pipeline when it is
built; `DenoisingPipeline.generate` then runs the same path for every pipeline:

    check_inputs -> the call's state (`CallState`, with its own scheduler copy) -> prepare_timesteps
    -> encode_conditioning -> prepare_denoising -> denoise (a `DenoisingStep`: the UNet, the call's guidance and
    scheduler, the pipeline's hooks) -> one finiteness check -> to_output

A pipeline writes its checks (`check_inputs`, calling super first), the hooks it needs (`prepare_timesteps` for a
strength, `prepare_denoising` for its initial latents and its model-input / after-step hooks, `to_output`) and its
signature. The model family (Stable Diffusion's CLIP + VAE latents, DeepFloyd IF's T5 + pixels) supplies
`encode_conditioning`, `guidance` and `to_output`. Nothing of a call is stored on the pipeline: its state is a value
(call_state.py) and what it sets on shared models (a LoRA scale) is undone when it ends (`call_scope`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch

from ..loaders.ip_adapter import check_ip_adapter_args
from ..models import lora_layers
from ..utils import concurrency
from . import call_state
from .call_state import CallState
from .checks import (
    callback_tensor_names,
    check_call_memory,
    check_finite,
    check_generator,
    check_number,
    check_output_type,
    check_positive_int,
    python_scalars,
    warn_deprecated_callback_args,
)
from .deep_cache import deep_cache_loop
from .denoise import (
    AfterStep,
    Conditioning,
    DenoisingStep,
    Guidance,
    ModelInputs,
    Schedule,
    StepCallback,
    StepEnd,
    StepEndCallback,
    StepEndResult,
    StepRunner,
    check_timesteps_args,
    denoise,
    extra_step_kwargs,
    retrieve_timesteps,
    run_step_end_callback,
    step_callback,
)
from .image_processor import OUTPUT_TYPES
from .loading import is_compiled
from .pipeline_utils import DiffusionPipeline
from .prompt import PromptInput, check_prompt_inputs

logger = logging.getLogger(__name__)

A = TypeVar("A", bound="CallArgs")


class LoopStart(NamedTuple):
    """What `prepare_denoising` hands the loop: the initial latents, the pipeline's step hooks, and the tensors it
    adds to the conditioning (by callback name: inpainting's mask, ControlNet's image)."""

    latents: torch.Tensor
    model_inputs: ModelInputs | None = None
    after_step: AfterStep | None = None
    conditioning: Mapping[str, Any] = MappingProxyType({})


# from_conditioning(conditioning) -> model keyword arguments made from the step's conditioning tensors.
ConditioningKwargs = Callable[[Conditioning], dict[str, Any]]


def with_model_extras(
    hook: ModelInputs | None, extras: Mapping[str, Any], from_conditioning: ConditioningKwargs | None = None
) -> ModelInputs | None:
    """`hook` with `extras`, and what `from_conditioning` makes of each step's conditioning, added to the keyword
    arguments of every model call."""
    if not extras and from_conditioning is None:
        return hook

    def model_inputs(x: torch.Tensor, t: torch.Tensor, i: int, conditioning: Conditioning) -> tuple[Any, dict]:
        x, extra = hook(x, t, i, conditioning) if hook is not None else (x, {})
        made = from_conditioning(conditioning) if from_conditioning is not None else {}
        return x, {**extra, **extras, **made}

    return model_inputs


def _call_field(name: str) -> property:
    """A Diffusers private attribute (`_guidance_scale`...) as a view of the current call's state; writing it (from a
    step-end callback) changes the running call only."""

    def get(self: Any) -> Any:
        return getattr(call_state.latest(self), name)

    def set(self: Any, value: Any) -> None:
        call_state.update(self, f"{type(self).__name__}._{name}", **{name: value})

    return property(get, set)


def _compiled_inside(model: torch.nn.Module) -> bool:
    """Whether the model or a direct submodule runs compiled code or an offload hook (`compile_pipeline` compiles
    components such as `vae.decoder`). One level only: walking all of a UNet's modules costs ~3 ms per call."""
    return is_compiled(model) or any(is_compiled(m) for m in model.children())


@dataclasses.dataclass(kw_only=True)
class CallArgs:
    """The arguments of one pipeline call, by Diffusers' names. Building it checks what needs no pipeline (types,
    ranges, finite numbers and tensors); `height`/`width` are resolved to the pipeline's defaults by its checks.

    Each argument is declared once, with its default, in the pipeline's `__call__` signature: a field here has no
    default, except the fields some pipelines' signatures lack (img2img has no height/width, IF no sigmas...), whose
    default is what such a pipeline behaves as (and equals the default where a signature has the argument)."""

    prompt: PromptInput
    negative_prompt: PromptInput
    prompt_embeds: torch.Tensor | None
    negative_prompt_embeds: torch.Tensor | None
    num_inference_steps: int
    guidance_scale: float
    num_images_per_prompt: int
    eta: float
    generator: torch.Generator | list[torch.Generator] | None
    output_type: str
    return_dict: bool
    cross_attention_kwargs: dict[str, Any] | None
    # Diffusers' older per-step callback (DeepFloyd IF, the x4 upscaler; deprecated on the SD pipelines). None: 1
    callback: StepCallback | None
    callback_steps: int | None
    # not in every pipeline's signature
    height: int | None = None
    width: int | None = None
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    guidance_rescale: float = 0.0
    latents: torch.Tensor | None = None
    clip_skip: int | None = None
    callback_on_step_end: StepEndCallback | None = None
    callback_on_step_end_tensor_inputs: Sequence[str] = dataclasses.field(default_factory=lambda: ["latents"])
    ip_adapter_image: Any = None
    ip_adapter_image_embeds: list[torch.Tensor] | None = None
    # The SD pipelines take these through `**kwargs` (Diffusers' deprecated arguments, None when not given); no other
    # keyword is accepted.
    keyword_only_extras: ClassVar[tuple[str, ...]] = ("callback", "callback_steps")
    # derived by the checks
    prompts: int = dataclasses.field(init=False, default=0)
    callback_names: list[str] = dataclasses.field(init=False, default_factory=list)

    @classmethod
    def from_locals(cls: type[A], values: Mapping[str, Any]) -> A:
        """The arguments a `__call__` bound (its parameters, `self`, and `kwargs` where the signature ends with
        Diffusers' `**kwargs`)."""
        values = {k: v for k, v in values.items() if k != "self"}
        extra = values.pop("kwargs", None)
        if extra is not None:  # Diffusers' `kwargs.pop("callback", None)`
            extra = {name: None for name in cls.keyword_only_extras} | extra
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - names)
        if unknown:  # a pipeline's signature grew an argument its CallArgs class does not carry: never drop it
            raise TypeError(f"{cls.__name__} has no field(s) {unknown}; add them to carry these call arguments")
        extra = extra or {}
        unexpected = sorted(set(extra) - set(cls.keyword_only_extras))
        if unexpected:
            raise TypeError(
                f"__call__() got unexpected keyword argument(s) {unexpected}; "
                f"besides its parameters it takes {list(cls.keyword_only_extras)}"
            )
        return cls(**values, **extra)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # np.float32(7.5), np.int64(30): accepted as Diffusers accepts them
            if field.init:
                setattr(self, field.name, python_scalars(getattr(self, field.name)))
        self.prompts = check_prompt_inputs(
            self.prompt, self.negative_prompt, self.prompt_embeds, self.negative_prompt_embeds
        )
        check_positive_int("num_images_per_prompt", self.num_images_per_prompt)
        check_number("guidance_scale", self.guidance_scale)
        check_number("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        check_number("eta", self.eta, 0.0)
        check_generator(self.generator, self.batch_size)
        step_callback(self.callback, self.callback_steps)  # validates both
        check_ip_adapter_args(self.ip_adapter_image, self.ip_adapter_image_embeds)
        for name in ("prompt_embeds", "negative_prompt_embeds", "latents"):
            check_finite(name, getattr(self, name))

    @property
    def batch_size(self) -> int:
        """Images generated: prompts x num_images_per_prompt."""
        return self.prompts * self.num_images_per_prompt


class DenoisingPipeline(DiffusionPipeline):
    """Base of the text-conditioned denoising pipelines (SD and IF families): the call state and `generate`."""

    # Whether `callback` / `callback_steps` are Diffusers' deprecated arguments here (SD pipelines: a FutureWarning)
    deprecated_step_callback: ClassVar[bool] = False
    # allowed `output_type`s; IF has no "latent"
    output_types: ClassVar[tuple[str, ...]] = OUTPUT_TYPES
    # How `denoise` runs one step (None: `denoise.run_step`). `rapiddiff.compile_pipeline(whole_step=True)` sets a
    # compiled whole step, `compile.forbid_host_syncs_in_loop` wraps it in a check; any `StepRunner` fits.
    step_runner: StepRunner | None = None
    # A generation that ends with nan/inf latents warns once after the loop; True makes it a FloatingPointError.
    strict_non_finite: bool = False
    # Whether the `model_inputs` hook runs before the scheduler scales the model input (see `DenoisingStep`).
    hook_before_scaling: ClassVar[bool] = False
    # Model keyword arguments made at each step from the step's conditioning tensors, which a step-end callback may
    # replace (SDXL's `added_cond_kwargs`); None: the family has none. A family defines it as a method.
    model_kwargs_from_conditioning: ClassVar[ConditioningKwargs | None] = None

    # --- the scheduler: the configured one, or inside a call that call's own copy ------------------------------------
    @property
    def scheduler(self) -> Any:
        state = call_state.current(self)
        if state is not None and state.scheduler is not None:
            return state.scheduler
        try:
            return self.__dict__["scheduler"]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no scheduler") from None

    @scheduler.setter
    def scheduler(self, scheduler: Any) -> None:
        self.__dict__["scheduler"] = scheduler

    # --- call state: Diffusers' properties, views of the current call's `CallState` (see call_state.py) ---------------
    @property
    def call_state(self) -> CallState:
        """The running call's state in this thread, else the last call's, else the defaults."""
        return call_state.latest(self)

    @property
    def running_call(self) -> CallState | None:
        """The state of this pipeline's call running in this thread; None outside a call."""
        return call_state.current(self)

    @property
    def guidance_scale(self) -> float:
        return self.call_state.guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self.call_state.guidance_rescale

    @property
    def clip_skip(self) -> int | None:
        return self.call_state.clip_skip

    @property
    def cross_attention_kwargs(self) -> Mapping[str, Any] | None:
        return self.call_state.cross_attention_kwargs

    @property
    def do_classifier_free_guidance(self) -> bool:
        """guidance_scale <= 1 runs the UNet on the conditional batch only (a callback may lower it mid-run)."""
        return self.call_state.do_classifier_free_guidance

    @property
    def num_timesteps(self) -> int | None:
        return self.call_state.num_timesteps

    @property
    def interrupt(self) -> bool:
        return self.call_state.interrupt

    @property
    def non_finite_images(self) -> list[bool] | None:
        """Per image of this thread's last call (as `nsfw_content_detected`): True where its final latents held
        nan/inf."""
        return self.call_state.non_finite_images

    # Diffusers' private names, which step-end callbacks write (`pipe._guidance_scale = 0.0`, `pipe._interrupt = True`)
    _guidance_scale = _call_field("guidance_scale")
    _guidance_rescale = _call_field("guidance_rescale")
    _clip_skip = _call_field("clip_skip")
    _cross_attention_kwargs = _call_field("cross_attention_kwargs")
    _num_timesteps = _call_field("num_timesteps")
    _interrupt = _call_field("interrupt")

    def new_call_state(self, args: CallArgs) -> CallState:
        """The call's state; its scheduler is a copy of the configured one (models are shared, not copied)."""
        return CallState(
            guidance_scale=args.guidance_scale,
            guidance_rescale=args.guidance_rescale,
            clip_skip=args.clip_skip,
            cross_attention_kwargs=args.cross_attention_kwargs,  # checked by the family (SD: the LoRA scale)
            scheduler=call_state.call_scheduler(self.__dict__["scheduler"]),
        )

    # --- the template -----------------------------------------------------------------------------------------------
    def generate(self, args: CallArgs) -> Any:
        """Checks, then encode -> timesteps -> initial latents -> denoise -> output (see the module docstring), with
        the call's state current and what the call sets on shared models undone at its end, error or not."""
        self.check_inputs(args)
        check_call_memory(self, args)  # the request against the memory there is, before any model runs
        state = self.new_call_state(args)
        components = [c for c in self.components.values() if c is not None]
        with (
            concurrency.in_use(components),
            concurrency.serialized(self.serialized_on(self._modules(), state)),
            call_state.running(self, state),
            self.call_scope(state),
        ):
            return self.run_call(args)

    def serialized_on(self, models: list[torch.nn.Module], state: CallState) -> list[Any]:
        """What calls must not share at once (see docs/compile.md): models holding LoRA adapters (the call's LoRA scale
        is a value of their buffers), compiled or offloaded models, a custom step runner (a compiled whole step), and
        the configured scheduler where the call steps it itself (`call_state.call_scheduler`)."""
        keys: list[Any] = [m for m in models if lora_layers.lora_state(m) is not None or _compiled_inside(m)]
        if self.step_runner is not None:
            keys.append(self.step_runner)
        if state.scheduler is self.__dict__["scheduler"]:
            keys.append(state.scheduler)
        return keys

    def call_scope(self, state: CallState) -> AbstractContextManager[None]:
        """What the call sets on shared models for its duration (the SD family: the UNet's LoRA scale)."""
        return contextlib.nullcontext()

    def run_call(self, args: CallArgs) -> Any:
        device = self._execution_device
        timesteps, num_inference_steps = self.prepare_timesteps(args, device)
        # the call's own DeepCache state, if the UNet has a cache on (the ControlNet hook reads it too)
        cache = deep_cache_loop(self.unet, self.scheduler, len(timesteps))
        if cache is not None:
            call_state.update(self, "deep_cache", deep_cache=cache)
        conditioning = self.encode_conditioning(args, device)
        dtype = conditioning["prompt_embeds"].dtype
        start = self.prepare_denoising(args, timesteps, conditioning, device)
        schedule = Schedule(timesteps, num_inference_steps, self.scheduler.order)
        state = call_state.update(self, "num_timesteps", num_timesteps=len(timesteps))
        step = DenoisingStep(
            model=self.unet,
            scheduler=state.scheduler,
            guidance=self.guidance(state),
            step_kwargs=extra_step_kwargs(state.scheduler, args.generator, args.eta),
            model_inputs=with_model_extras(
                start.model_inputs, self.model_extras(state, conditioning), self.model_kwargs_from_conditioning
            ),
            hook_before_scaling=self.hook_before_scaling,
            after_step=start.after_step,
        )
        runner = self.step_runner
        if cache is not None:
            runner = cache.runner(runner)
        latents = denoise(
            start.latents,
            schedule,
            step,
            {**conditioning, **start.conditioning},
            runner=runner,
            progress=self.progress_bar,
            on_step_end=self.step_end(args, schedule),
        )
        self.report_non_finite(latents)
        output = self.to_output(latents, args, dtype)
        self.maybe_free_model_hooks()  # model CPU offload: every model back to the CPU
        return output

    # --- checks -----------------------------------------------------------------------------------------------------
    def check_inputs(self, args: CallArgs) -> None:
        """The checks that need the pipeline, before any heavy work. Pipelines extend it (super() first)."""
        check_timesteps_args(self.scheduler, args.num_inference_steps, args.timesteps, args.sigmas)
        check_output_type(args.output_type, self.output_types)
        args.callback_names = callback_tensor_names(
            args.callback_on_step_end, args.callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )
        if self.deprecated_step_callback:
            warn_deprecated_callback_args(args.callback, args.callback_steps)
        self.check_embeds_width(args)

    def check_embeds_width(self, args: CallArgs) -> None:
        """Given text embeddings must have the width the UNet's cross-attention reads (SD: cross_attention_dim; IF:
        the T5 width, encoder_hid_dim), or the UNet fails deep inside with a bare shape error."""
        config = self.unet.config
        width = getattr(config, "encoder_hid_dim", None) or config.cross_attention_dim
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            embeds = getattr(args, name)
            if embeds is not None and isinstance(width, int) and embeds.shape[-1] != width:
                raise ValueError(
                    f"{name} has shape {tuple(embeds.shape)}: the UNet reads text embeddings of width {width} "
                    f"(batch, tokens, {width}); were they made by another model's text encoder?"
                )

    def resolve_size(self, args: CallArgs) -> None:
        """height/width: the family's default for whichever is None (`default_size`), then its `check_size`."""
        args.height, args.width = self.default_size(args.height, args.width)
        self.check_size(args.height, args.width)

    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        raise NotImplementedError

    def check_size(self, height: Any, width: Any) -> None:
        raise NotImplementedError

    def step_end_callback(
        self, args: CallArgs, schedule: Schedule | None = None
    ) -> tuple[StepEndCallback | None, Sequence[str]]:
        """The call's Diffusers-style step-end callback and the tensors it reads; an older `callback` is wrapped, and
        runs after `callback_on_step_end` when both are given (Diffusers' order)."""
        old = step_callback(args.callback, args.callback_steps, self.callback_step_order(), schedule)
        new = args.callback_on_step_end
        if old is None or new is None:
            return (old, ("latents",)) if new is None and old is not None else (new, args.callback_names)

        def both(pipe: Any, i: int, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            changed = new(pipe, i, t, tensors)
            old(pipe, i, t, {**tensors, **(changed or {})})
            return changed

        return both, list(dict.fromkeys([*args.callback_names, "latents"]))

    def step_end(self, args: CallArgs, schedule: Schedule) -> StepEnd | None:
        """The step-end callbacks bound to this call, for `denoise`: they get the pipeline (Diffusers' signature) and
        may change the call's state (guidance scale, interrupt), which the loop reads back."""
        callback, names = self.step_end_callback(args, schedule)
        if callback is None:
            return None

        def on_step_end(i: int, t: torch.Tensor, latents: torch.Tensor, conditioning: Conditioning) -> StepEndResult:
            latents, conditioning = run_step_end_callback(self, callback, names, i, t, latents, conditioning)
            state = call_state.latest(self)
            return StepEndResult(latents, conditioning, self.guidance(state), state.interrupt)

        return on_step_end

    def callback_step_order(self) -> int:
        """An older `callback` gets step `i // order` (the x4 upscaler's count); IF counts every step."""
        return 1

    # --- hooks (defaults) -------------------------------------------------------------------------------------------
    def prepare_timesteps(self, args: CallArgs, device: torch.device) -> tuple[torch.Tensor, int]:
        """The schedule to run: (timesteps, num_inference_steps). img2img and inpainting keep its last `strength`."""
        return retrieve_timesteps(self.scheduler, args.num_inference_steps, device, args.timesteps, args.sigmas)

    def encode_conditioning(self, args: CallArgs, device: torch.device) -> dict[str, torch.Tensor | None]:
        """The tensors the loop conditions on, by callback name; "prompt_embeds" batched [negative; positive] when
        guiding, for one UNet pass."""
        raise NotImplementedError

    def prepare_denoising(
        self, args: CallArgs, timesteps: torch.Tensor, conditioning: Conditioning, device: torch.device
    ) -> LoopStart:
        """The initial latents and the step hooks. Random draws happen here, in Diffusers' order."""
        raise NotImplementedError

    def guidance(self, state: CallState) -> Guidance:
        """The step's guidance for the call's state (IF guides its noise channels only)."""
        return Guidance(state.guidance_scale, state.guidance_rescale)

    def model_extras(self, state: CallState, conditioning: Conditioning) -> dict[str, Any]:
        """Keyword arguments every model call of this call gets (an LCM-distilled UNet's `timestep_cond`)."""
        return {}

    def to_output(self, latents: torch.Tensor, args: CallArgs, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    # --- after the loop ---------------------------------------------------------------------------------------------
    def report_non_finite(self, latents: torch.Tensor) -> None:
        """One check after the loop (never inside it: no host sync per step): nan/inf in the final latents."""
        finite = torch.isfinite(latents.flatten(1)).all(dim=1).tolist()
        call_state.update(self, "non_finite_images", non_finite_images=[not ok for ok in finite])
        if all(finite):
            return
        bad = [k for k, ok in enumerate(finite) if not ok]
        message = (
            f"{type(self).__name__}: image(s) {bad} of the batch of {len(finite)} ended the denoising loop with nan/inf "
            f"values and will not be usable. Likely causes: nan/inf in the model weights, or a float16 overflow "
            f"(try torch_dtype=torch.float32 or bfloat16, or a smaller guidance_scale)."
        )
        if self.strict_non_finite:
            raise FloatingPointError(message)
        logger.warning(message)
