"""The call template every pipeline follows: its arguments as one checked object, one generate path.

A pipeline's `__call__` keeps Diffusers' signature and hands its arguments over in one go:

    return self.generate(Img2ImgArgs.from_locals(locals()))

`CallArgs` (a dataclass, one subclass per pipeline for its own arguments) checks what needs no pipeline when it is
built; `DenoisingPipeline.generate` then runs the same path for every pipeline:

    check_inputs -> start the call (state) -> prepare_timesteps -> encode_conditioning -> prepare_denoising
    -> denoise (`noise_predictor` + the pipeline's hooks) -> one finiteness check -> to_output

A pipeline writes its checks (`check_inputs`, calling super first), the hooks it needs (`prepare_timesteps` for a
strength, `prepare_denoising` for its initial latents and its model-input / after-step hooks, `to_output`) and its
signature. The model family (Stable Diffusion's CLIP + VAE latents, DeepFloyd IF's T5 + pixels) supplies
`encode_conditioning`, `guide` and `to_output`.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch

from .checks import (
    callback_tensor_names,
    check_call_memory,
    check_finite,
    check_generator,
    check_number,
    check_output_type,
    check_positive_int,
    python_scalars,
)
from .denoise import (
    AfterStep,
    PredictNoise,
    ScaleModelInput,
    StepCallback,
    StepEndCallback,
    StepRunner,
    apply_guidance,
    check_timesteps_args,
    denoise,
    extra_step_kwargs,
    retrieve_timesteps,
    step_callback,
)
from .image_processor import OUTPUT_TYPES
from .pipeline_utils import DiffusionPipeline
from .prompt import PromptInput, check_prompt_inputs

logger = logging.getLogger(__name__)

A = TypeVar("A", bound="CallArgs")

# (x, t, i) -> (x, extra UNet kwargs): runs on the guidance-batched model input before the UNet (inpainting appends
# the mask channels, ControlNet computes its residuals, the upscalers append the noised low-res image).
ModelInputs = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, dict[str, Any]]]


class StepHooks(NamedTuple):
    """A pipeline's additions to every denoising step."""

    model_inputs: ModelInputs | None = None
    after_step: AfterStep | None = None


@dataclasses.dataclass
class CallArgs:
    """The arguments of one pipeline call, by Diffusers' names. Building it checks what needs no pipeline (types,
    ranges, finite numbers and tensors); fields a pipeline's signature lacks keep these defaults. `height`/`width`
    are resolved to the pipeline's defaults by its checks."""

    prompt: PromptInput = None
    negative_prompt: PromptInput = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 50
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    num_images_per_prompt: int = 1
    eta: float = 0.0
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None
    output_type: str = "pil"
    return_dict: bool = True
    cross_attention_kwargs: dict[str, Any] | None = None
    clip_skip: int | None = None
    callback_on_step_end: StepEndCallback | None = None
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)
    # Diffusers' older per-step callback (DeepFloyd IF, the x4 upscaler; deprecated on the SD pipelines). None: 1
    callback: StepCallback | None = None
    callback_steps: int | None = 1
    # derived by the checks
    prompts: int = dataclasses.field(init=False, default=0)
    callback_names: list[str] = dataclasses.field(init=False, default_factory=list)

    @classmethod
    def from_locals(cls: type[A], values: Mapping[str, Any]) -> A:
        """The arguments from `locals()` taken first thing in a `__call__` (its parameters and `self`)."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - names - {"self"})
        if unknown:  # a pipeline's signature grew an argument its CallArgs class does not carry: never drop it
            raise TypeError(f"{cls.__name__} has no field(s) {unknown}; add them to carry these call arguments")
        return cls(**{k: v for k, v in values.items() if k in names})

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
    # Per image of the last call (as `nsfw_content_detected`): True where its final latents held nan/inf.
    non_finite_images: list[bool] | None = None
    # Whether the `model_inputs` hook runs before the scheduler scales the model input (IF-II: its upscaled image is
    # scaled with the sample, as in Diffusers) or after (SD: mask channels, control residuals, the x4's image).
    hook_before_scaling: ClassVar[bool] = False

    # --- call state: set once per call by `start_call`, read by step-end callbacks (Diffusers' properties) ----------
    _guidance_scale: float = 7.5
    _guidance_rescale: float = 0.0
    _clip_skip: int | None = None
    _cross_attention_kwargs: dict[str, Any] | None = None
    _num_timesteps: int | None = None
    _interrupt: bool = False

    @property
    def _step_runner(self) -> StepRunner | None:  # the former private name
        return self.step_runner

    @_step_runner.setter
    def _step_runner(self, runner: StepRunner | None) -> None:
        self.step_runner = runner

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def do_classifier_free_guidance(self) -> bool:
        """guidance_scale <= 1 runs the UNet on the conditional batch only (a callback may lower it mid-run)."""
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int | None:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def start_call(self, args: CallArgs) -> None:
        self._guidance_scale = args.guidance_scale
        self._guidance_rescale = args.guidance_rescale
        self._clip_skip = args.clip_skip
        self._cross_attention_kwargs = args.cross_attention_kwargs  # checked by the family (SD: the LoRA scale)
        self._num_timesteps = None
        self._interrupt = False

    # --- the template -----------------------------------------------------------------------------------------------
    def generate(self, args: CallArgs) -> Any:
        """Checks, then encode -> timesteps -> initial latents -> denoise -> output (see the module docstring)."""
        self.check_inputs(args)
        check_call_memory(self, args)  # the request against the memory there is, before any model runs
        self.start_call(args)
        device = self._execution_device
        timesteps, num_inference_steps = self.prepare_timesteps(args, device)
        tensors = self.encode_conditioning(args, device)
        dtype = tensors["prompt_embeds"].dtype
        latents, hooks = self.prepare_denoising(args, timesteps, tensors, device)
        self._num_timesteps = len(timesteps)
        warmup = len(timesteps) - num_inference_steps * self.scheduler.order  # Diffusers' progress-bar warm-up
        on_step_end, names = self.step_end_callback(args, len(timesteps), warmup)
        latents = denoise(
            latents,
            timesteps,
            num_inference_steps,
            self.noise_predictor(tensors, hooks.model_inputs),
            scheduler=self.scheduler,
            step_runner=self.step_runner,
            progress=self.progress_bar,
            extra_step_kwargs=extra_step_kwargs(self.scheduler, args.generator, args.eta),
            after_step=hooks.after_step,
            tensors=tensors,
            pipe=self,
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=names,
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
        self, args: CallArgs, num_timesteps: int = 0, warmup: int = 0
    ) -> tuple[StepEndCallback | None, Sequence[str]]:
        """The call's step-end callback for `denoise` and the tensors it reads; an older `callback` is wrapped, and
        runs after `callback_on_step_end` when both are given (Diffusers' order)."""
        old = step_callback(args.callback, args.callback_steps, self.callback_step_order(), num_timesteps, warmup)
        new = args.callback_on_step_end
        if old is None or new is None:
            return (old, ("latents",)) if new is None and old is not None else (new, args.callback_names)

        def both(pipe: Any, i: int, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            changed = new(pipe, i, t, tensors)
            old(pipe, i, t, {**tensors, **(changed or {})})
            return changed

        return both, list(dict.fromkeys([*args.callback_names, "latents"]))

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
        self, args: CallArgs, timesteps: torch.Tensor, tensors: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, StepHooks]:
        """(initial latents, the step hooks). Random draws happen here, in Diffusers' order."""
        raise NotImplementedError

    def guide(self, model_output: torch.Tensor, channels: int) -> torch.Tensor:
        """The UNet's output over the [unconditional; conditional] batch -> the guided noise prediction (plain
        classifier-free guidance with the optional rescale; IF guides its noise channels only)."""
        return apply_guidance(model_output, self._guidance_scale, self._guidance_rescale)

    def to_output(self, latents: torch.Tensor, args: CallArgs, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    # --- the model call ---------------------------------------------------------------------------------------------
    def noise_predictor(
        self, tensors: dict[str, torch.Tensor | None], model_inputs: ModelInputs | None = None
    ) -> PredictNoise:
        """predict_noise(latents, t, i, scale_model_input) for `denoise`: one UNet pass over [unconditional;
        conditional], guided.

        Reads the text embeddings from `tensors` at each step, so a step-end callback can replace them. The
        `model_inputs` hook sees the scaled model input (`hook_before_scaling`: the unscaled one).
        """
        before = self.hook_before_scaling

        def predict_noise(
            latents: torch.Tensor, t: torch.Tensor, i: int, scale_model_input: ScaleModelInput
        ) -> torch.Tensor:
            guided = self.do_classifier_free_guidance
            x = torch.cat([latents] * 2) if guided else latents
            extra: dict[str, Any] = {}
            if model_inputs is not None and before:
                x, extra = model_inputs(x, t, i)
            x = scale_model_input(x)
            if model_inputs is not None and not before:
                x, extra = model_inputs(x, t, i)
            out = self.unet(x, t, encoder_hidden_states=tensors["prompt_embeds"], return_dict=False, **extra)[0]
            return self.guide(out, latents.shape[1]) if guided else self.unguided(out, latents.shape[1])

        return predict_noise

    def unguided(self, model_output: torch.Tensor, channels: int) -> torch.Tensor:
        return model_output

    # --- after the loop ---------------------------------------------------------------------------------------------
    def report_non_finite(self, latents: torch.Tensor) -> None:
        """One check after the loop (never inside it: no host sync per step): nan/inf in the final latents."""
        finite = torch.isfinite(latents.flatten(1)).all(dim=1).tolist()
        self.non_finite_images = [not ok for ok in finite]
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


def warn_deprecated_callback_args(callback: Any, callback_steps: Any) -> None:
    """Diffusers' FutureWarnings for the SD pipelines' old per-step callback arguments (they still run)."""
    for name, value in (("callback", callback), ("callback_steps", callback_steps)):
        if value is not None:
            warnings.warn(
                f"`{name}` is deprecated and will be removed in version 1.0.0. Passing `{name}` as an "
                "input argument to `__call__` is deprecated, consider using `callback_on_step_end`",
                FutureWarning,
                stacklevel=4,
            )
