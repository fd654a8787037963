"""Text-to-image guided by control images (edges, depth, pose...): Diffusers' `StableDiffusionControlNetPipeline`.

At every step each ControlNet turns its control image into residuals that the UNet adds to its skips; this is the
text-to-image loop with a model-input hook computing them. Scales and the guidance window are a per-step table
built before the loop, read as device tensors: no host sync, and a compiled ControlNet never sees a new constant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..models.controlnet import ControlNetModel, MultiControlNetModel
from .checks import check_finite, check_number, check_unet_in_channels, required
from .denoise import Conditioning, Scheduler, StepEndCallback
from .image_processor import PipelineImageInput, VaeImageProcessor
from .loading import _unwrap, is_compiled
from .stable_diffusion import StableDiffusionBase, StableDiffusionPipelineOutput
from .template import CallArgs, LoopStart


def per_net(name: str, value: Any, n: int) -> list[float]:
    """One number for every ControlNet, or a list with one per ControlNet."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name}={value!r} has {len(values)} entries for {n} ControlNet(s); pass a number or {n}")
    for v in values:
        check_number(name, v)
    return values


def control_keep(num_steps: int, starts: Sequence[float], ends: Sequence[float]) -> list[list[float]]:
    """keep[i][k]: 1.0 when step i of `num_steps` lies inside ControlNet k's [start, end] window, else 0.0."""
    return [
        [1.0 - float(i / num_steps < s or (i + 1) / num_steps > e) for s, e in zip(starts, ends)]
        for i in range(num_steps)
    ]


@dataclasses.dataclass(kw_only=True)
class ControlNetArgs(CallArgs):
    """The ControlNet call: control image(s), scales, guess mode and guidance window. The checks turn `image` into
    one preprocessed (B, C, H, W) tensor per ControlNet and the numbers into lists of one per ControlNet."""

    image: PipelineImageInput | list[PipelineImageInput] | None
    controlnet_conditioning_scale: float | list[float]
    guess_mode: bool
    control_guidance_start: float | list[float]
    control_guidance_end: float | list[float]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.guess_mode, bool):
            raise TypeError(f"guess_mode must be a bool, got {self.guess_mode!r}")


class StableDiffusionControlNetPipeline(StableDiffusionBase):
    """Stable Diffusion with one ControlNet, or several (a list, or a MultiControlNetModel: residuals summed)."""

    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "image")

    def __init__(
        self,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        unet: Any,
        controlnet: ControlNetModel | Sequence[ControlNetModel] | MultiControlNetModel,
        scheduler: Scheduler,
        safety_checker: Any,
        feature_extractor: Any,
        image_encoder: Any = None,
        requires_safety_checker: bool = True,
    ):
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        self._register(
            requires_safety_checker,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            controlnet=controlnet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.make_control_processors()

    def make_control_processors(self) -> None:
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True)
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )

    @property
    def controlnets(self) -> list[ControlNetModel]:
        """The ControlNet(s) as a list (under any torch.compile wrapper)."""
        controlnet = _unwrap(self.controlnet)
        return list(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else [controlnet]

    @property
    def is_multi(self) -> bool:
        return isinstance(_unwrap(self.controlnet), MultiControlNetModel)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput | list[PipelineImageInput] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - Diffusers' default
        **kwargs: Any,
    ) -> StableDiffusionPipelineOutput | tuple[Any, list[bool] | None]:
        """Generate images from `prompt` guided by `image`: the control image(s) of one ControlNet, or a list with one
        entry per ControlNet (each entry a batch of 1 or one per prompt).

        height/width default to the control image's size. controlnet_conditioning_scale, control_guidance_start and
        control_guidance_end: one number, or a list with one per ControlNet; a ControlNet only acts on the steps
        inside its [start, end] fraction of the schedule. guess_mode: the ControlNets see the conditional batch only
        (for prompt-free control; guidance_scale 3-5 recommended). Other arguments as text-to-image.
        """
        return self.generate(ControlNetArgs.from_locals(locals()))

    def check_inputs(self, args: ControlNetArgs) -> None:
        super().check_inputs(args)
        # Given sizes must be multiples of 8 (not rounded silently); a missing one is the control image's.
        self.check_size(8 if args.height is None else args.height, 8 if args.width is None else args.width)
        nets = self.controlnets
        self.check_models(nets)
        args.controlnet_conditioning_scale = per_net(
            "controlnet_conditioning_scale", args.controlnet_conditioning_scale, len(nets)
        )
        args.control_guidance_start, args.control_guidance_end = self.check_guidance_window(
            args.control_guidance_start, args.control_guidance_end, len(nets)
        )
        args.guess_mode = args.guess_mode or nets[0].config.global_pool_conditions
        args.image = [
            self.control_image_processor.preprocess(x, height=args.height, width=args.width).to(torch.float32)
            for x in self.split_control_images(required("image", args.image), len(nets))
        ]
        for x in args.image:
            check_finite("image", x)
        self.check_control_images(args.image, args.prompts)
        args.height, args.width = args.image[0].shape[-2:]
        channels = self.unet.config.in_channels
        self.check_latents(args.latents, self.latent_shape(args.batch_size, channels, args.height, args.width))

    def prepare_denoising(
        self, args: ControlNetArgs, timesteps: torch.Tensor, conditioning: Conditioning, device: torch.device
    ) -> LoopStart:
        """The initial noise and the hook running the ControlNets on each step's model input."""
        guess_mode = args.guess_mode
        control = [
            self.expand_control_image(
                x, args.batch_size, args.num_images_per_prompt, device, self.controlnet.dtype, guess_mode
            )
            for x in args.image
        ]
        control_image = control if self.is_multi else control[0]
        channels = self.unet.config.in_channels
        dtype = conditioning["prompt_embeds"].dtype
        latents = self.prepare_latents(
            args.batch_size, channels, args.height, args.width, dtype, device, args.generator, args.latents
        )
        keep = control_keep(len(timesteps), args.control_guidance_start, args.control_guidance_end)
        # (steps, nets) scales on the device: step i reads row i without a host sync
        scales = args.controlnet_conditioning_scale
        step_scales = torch.tensor([[s * k for s, k in zip(scales, row)] for row in keep], device=device)

        def control_residuals(
            x: torch.Tensor, t: torch.Tensor, i: int, cond: Conditioning
        ) -> tuple[torch.Tensor, dict[str, Any]]:
            if not any(keep[i]):  # outside every window the residuals are zero: skip the ControlNets
                return x, {}
            embeds = cond["prompt_embeds"]
            split = guess_mode and self.do_classifier_free_guidance
            if split:  # the ControlNets see the conditional half only
                x_control, embeds = x.chunk(2)[1], embeds.chunk(2)[1]
            else:
                x_control = x
            if self.is_multi:
                scale = list(step_scales[i].unbind())
            else:
                scale = step_scales[i, 0]
            down, mid = self.controlnet(
                x_control,
                t,
                embeds,
                cond["image"],
                scale,
                guess_mode=guess_mode,
                return_dict=False,
                **self.controlnet_kwargs(cond, split),
            )
            if split:  # zero residuals for the unconditional half
                down = [torch.cat([torch.zeros_like(d), d]) for d in down]
                mid = torch.cat([torch.zeros_like(mid), mid])
            elif is_compiled(self.controlnet):
                # A compiled ControlNet's outputs live in its CUDA graphs' memory, which the UNet's graph may reuse
                # before reading them (pytorch issue 160281): the UNet gets copies the loop owns.
                down, mid = [d.clone() for d in down], mid.clone()
            return x, {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        return LoopStart(latents, model_inputs=control_residuals, conditioning={"image": control_image})

    def controlnet_kwargs(self, conditioning: Conditioning, conditional_half: bool) -> dict[str, Any]:
        """Further keyword arguments of the ControlNets at a step (SDXL: `added_cond_kwargs`), of the conditional
        half of the guidance batch only in guess mode."""
        return {}

    # --- checks -------------------------------------------------------------------------------------------------
    def check_models(self, nets: list[ControlNetModel]) -> None:
        check_unet_in_channels(self.unet, {self.vae.config.latent_channels: "the VAE's latent channels"})
        for k, net in enumerate(nets):
            if net.config.in_channels != self.unet.config.in_channels:
                raise ValueError(
                    f"ControlNet {k}: config.in_channels={net.config.in_channels} does not fit the UNet's "
                    f"in_channels={self.unet.config.in_channels}; allowed: the same"
                )

    @staticmethod
    def check_guidance_window(start: Any, end: Any, n: int) -> tuple[list[float], list[float]]:
        """control_guidance_start / _end as lists of one per ControlNet, each 0 <= start < end <= 1."""
        starts = per_net("control_guidance_start", start, n)
        ends = per_net("control_guidance_end", end, n)
        for s, e in zip(starts, ends):
            check_number("control_guidance_start", s, 0.0, 1.0)
            check_number("control_guidance_end", e, 0.0, 1.0)
            if s >= e:
                raise ValueError(
                    f"control_guidance_start={s} must be smaller than control_guidance_end={e}; "
                    "allowed: 0 <= start < end <= 1"
                )
        return starts, ends

    def split_control_images(self, image: Any, n: int) -> list[Any]:
        """One image input per ControlNet. Several ControlNets take a list with one entry per net, or a list with one
        list of n images per prompt (Diffusers' nested form)."""
        if not self.is_multi:
            return [image]
        if not isinstance(image, (list, tuple)):
            raise TypeError(
                f"image: with {n} ControlNets pass a list of {n} control images, got {type(image).__name__}"
            )
        if image and all(isinstance(x, (list, tuple)) for x in image):  # per prompt -> per net
            if any(len(x) != n for x in image):
                raise ValueError(f"image: each inner list must hold {n} control images (one per ControlNet)")
            image = [list(x) for x in zip(*image)]
        if len(image) != n:
            raise ValueError(f"image: got {len(image)} control images for {n} ControlNets; pass one per ControlNet")
        return list(image)

    @staticmethod
    def check_control_images(images: list[torch.Tensor], prompts: int) -> None:
        for k, x in enumerate(images):
            if x.shape[0] not in (1, prompts):
                raise ValueError(
                    f"image: control image batch {x.shape[0]} (ControlNet {k}) does not fit {prompts} prompt(s); "
                    f"allowed: 1 or {prompts}"
                )
            if x.shape[-2:] != images[0].shape[-2:]:
                raise ValueError(
                    f"image: the control images have different sizes {tuple(images[0].shape[-2:])} and "
                    f"{tuple(x.shape[-2:])}; pass height and width, or images of one size"
                )

    # --- control images -----------------------------------------------------------------------------------------
    def expand_control_image(
        self,
        image: torch.Tensor,
        batch_size: int,
        num_images_per_prompt: int,
        device: torch.device,
        dtype: torch.dtype,
        guess_mode: bool,
    ) -> torch.Tensor:
        """A preprocessed control image batch (1, or one per prompt) -> one per generated image (Diffusers'
        `prepare_image`), doubled for the [unconditional; conditional] UNet batch unless guess mode runs the
        ControlNets on the conditional half only."""
        repeats = batch_size if image.shape[0] == 1 else num_images_per_prompt
        image = image.repeat_interleave(repeats, dim=0).to(device=device, dtype=dtype)
        return torch.cat([image] * 2) if self.do_classifier_free_guidance and not guess_mode else image
