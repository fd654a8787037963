"""`rapiddiff generate "PROMPT" --model PATH_OR_ID`: images from a Diffusers-layout checkpoint, written as PNGs.

rapiddiff generate "a castle at dusk" --model runwayml/stable-diffusion-v1-5 --steps 30 --seed 0 -o castle.png
rapiddiff generate "a castle" --model ./sd15 --num-images 4 --scheduler euler_a --compile -o out/
rapiddiff generate "a castle in winter" --model ./sd15 --image castle.png --strength 0.6
rapiddiff generate "a red door" --model ./sd-inpainting --image house.png --mask door-mask.png
rapiddiff generate "a dancer" --model ./sd15 --controlnet ./sd-controlnet-openpose --control-image pose.png

The pipeline follows from the inputs: a prompt alone runs the checkpoint's own pipeline (model_index.json); image
inputs (--image, --mask, --control-image) select img2img / inpainting / ControlNet in `choose_pipeline`.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path
from typing import Any

import torch

import rapiddiff

from .batch import checks
from .batch import cli as batch_cli
from .cli import add_device_argument, add_model_argument, subcommand_parser
from .compile import compile_pipeline
from .models.attention_processor import Attention
from .pipelines.checks import check_number

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SCHEDULER_ALIASES = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# The pipeline call's arguments that options give: {argument: option's dest}.
CALL_OPTIONS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "num_inference_steps": "steps",
    "guidance_scale": "guidance",
    "height": "height",
    "width": "width",
    "num_images_per_prompt": "num_images",
}


def _scheduler_name(text: str) -> str:
    name = SCHEDULER_ALIASES.get(text.lower(), text)
    if name not in SCHEDULER_ALIASES.values():
        allowed = [*SCHEDULER_ALIASES, *SCHEDULER_ALIASES.values()]
        raise argparse.ArgumentTypeError(f"unknown scheduler {text!r}; allowed: {', '.join(allowed)}")
    return name


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subcommand_parser(subparsers, "generate", "generate images from a prompt", __doc__)
    parser.add_argument("prompt", nargs="?", help="the text prompt (or --prompts FILE)")
    add_model_argument(parser)
    parser.add_argument("--negative-prompt", help="what the image should not show")
    parser.add_argument("--steps", type=checks.positive_int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--seed", type=int, help="random seed (default: a fresh one, printed)")
    parser.add_argument("--height", type=checks.positive_int, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=checks.positive_int, help="image width in pixels (default: the model's)")
    parser.add_argument("--num-images", type=checks.positive_int, default=1, help="images to generate (default 1)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: float16 on CUDA, float32 on the CPU")
    add_device_argument(parser)
    parser.add_argument("--attention", choices=["sdpa", "vanilla"], default="sdpa",
                        help="sdpa: PyTorch's scaled_dot_product_attention (default); vanilla: matmul + softmax")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile the pipeline's models")
    parser.add_argument("--scheduler", type=_scheduler_name, metavar="NAME",
                        help=f"replace the checkpoint's scheduler: {', '.join(SCHEDULER_ALIASES)} or a class name")  # fmt: skip
    parser.add_argument("-o", "--output", type=Path, default=Path("outputs"),
                        help="a .png file, or a folder (default ./outputs)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output images (without it, an existing file is an error); with "
                             "--prompts: discard a run with other settings in the folder and start afresh")  # fmt: skip
    images = parser.add_argument_group("image inputs (they choose the pipeline)")
    images.add_argument("--image", type=Path, help="img2img: the image to transform; with --mask: the image to inpaint")
    images.add_argument("--mask", type=Path, help="inpainting: white pixels are repainted, black ones kept")
    images.add_argument("--strength", type=float,
                        help="img2img / inpainting: share of the schedule that runs, in [0, 1] (default 0.8 / 1.0)")  # fmt: skip
    images.add_argument("--controlnet", action="append", metavar="PATH_OR_ID",
                        help="a ControlNet checkpoint; repeat for several (one --control-image each)")  # fmt: skip
    images.add_argument("--control-image", action="append", type=Path, metavar="PATH",
                        help="the control image of each --controlnet, in the same order")  # fmt: skip
    batch_cli.add_generate_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def choose_pipeline(args: argparse.Namespace) -> str | None:
    """The pipeline class the inputs call for; None: the checkpoint's own class (model_index.json).

    --image -> StableDiffusionImg2ImgPipeline, --image with --mask -> StableDiffusionInpaintPipeline, --controlnet with
    --control-image -> StableDiffusionControlNetPipeline. Combinations that no pipeline takes are an error.
    """
    controlnets, control_images = args.controlnet or [], args.control_image or []
    if len(controlnets) != len(control_images):
        raise ValueError(
            f"got {len(controlnets)} --controlnet and {len(control_images)} --control-image: pass one control image "
            "per ControlNet"
        )
    if controlnets and (args.image or args.mask):
        raise ValueError("--controlnet does not combine with --image / --mask (no ControlNet img2img or inpainting)")
    if args.mask and not args.image:
        raise ValueError("--mask needs --image, the image to inpaint")
    if args.strength is not None and not args.image:
        raise ValueError(f"--strength {args.strength} applies to --image (img2img / inpainting) only")
    if args.image and (args.height or args.width) and not args.mask:
        raise ValueError("--height / --width do not apply to img2img: the output has the size of --image")
    if controlnets:
        return "StableDiffusionControlNetPipeline"
    if args.mask:
        return "StableDiffusionInpaintPipeline"
    return "StableDiffusionImg2ImgPipeline" if args.image else None


def call_kwargs(args: argparse.Namespace, generator: torch.Generator) -> dict[str, Any]:
    """Pipeline call arguments from the command line; image files are opened (and checked) here."""
    kwargs = {name: getattr(args, dest) for name, dest in CALL_OPTIONS.items()}
    kwargs |= dict(generator=generator, output_type="pil")
    if args.image:
        kwargs["image"] = checks.open_image(args.image, "RGB", "--image")
        if not args.mask:  # img2img takes the image's size
            del kwargs["height"], kwargs["width"]
    if args.mask:
        kwargs["mask_image"] = checks.open_image(args.mask, "L", "--mask")
    if args.strength is not None:
        kwargs["strength"] = args.strength
    if args.control_image:
        images = [checks.open_image(path, "RGB", "--control-image") for path in args.control_image]
        kwargs["image"] = images if len(images) > 1 else images[0]
    return kwargs


def load_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    name = choose_pipeline(args)
    cls = getattr(rapiddiff, name) if name else rapiddiff.DiffusionPipeline
    extra: dict[str, Any] = {}
    if args.controlnet:
        nets = [rapiddiff.ControlNetModel.from_pretrained(path, torch_dtype=dtype) for path in args.controlnet]
        extra["controlnet"] = nets if len(nets) > 1 else nets[0]
    pipe = cls.from_pretrained(args.model, torch_dtype=dtype, **extra).to(device)
    if args.scheduler:
        pipe.scheduler = getattr(rapiddiff, args.scheduler).from_config(pipe.scheduler.config)
    set_attention(pipe, args.attention)
    if args.compile:
        # Frozen graphs (the CPU default) hold oneDNN-packed weights, which inductor's cache cannot store: a run
        # asked to share a compile cache compiles without freezing, so that there is a cache to share.
        pipe = compile_pipeline(pipe, freezing=False if args.compile_cache is not None else None)
    return pipe


def set_attention(pipe: Any, kind: str) -> None:
    """Every attention layer of the pipeline's rapiddiff models on SDPA or on the vanilla processor."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for layer in component.modules():
                if isinstance(layer, Attention):
                    layer.set_processor(layer.default_processor() if kind == "sdpa" else layer.vanilla_processor())


def output_paths(output: Path, count: int, seed: int) -> list[Path]:
    """`output` itself for one image to a file; `<stem>-<i>.png` for several; `<folder>/<seed>-<i>.png` otherwise."""
    if output.suffix.lower() in IMAGE_SUFFIXES:
        if count == 1:
            return [output]
        return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]
    return [output / f"{seed}-{i}.png" for i in range(count)]


def run(args: argparse.Namespace) -> int:
    try:
        batch_cli.check_batch_args(args)
        # the pipelines' own checks, before the model loads: inf guidance gives NaN images, nan turns guidance off
        check_number("--guidance", args.guidance)
        if args.strength is not None:
            check_number("--strength", args.strength, 0.0, 1.0)
        if args.prompts is not None:
            return batch_cli.run_command(args, load_pipeline, DTYPES)
        # Everything that can be wrong with the command is checked before the model loads.
        first = output_paths(args.output, args.num_images, 0)[0]
        if first == args.output:
            checks.check_output_file(first)
        else:
            checks.check_output_folder(first.parent)
        device = checks.resolve_device(args.device)
        dtype = DTYPES[args.dtype] if args.dtype else torch.float16 if device.type == "cuda" else torch.float32
        checks.check_seed(args.seed)
        seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
        paths = output_paths(args.output, args.num_images, seed)
        if not args.overwrite:
            checks.check_not_there(paths)
        checks.check_generate_memory(args, device, dtype)
        kwargs = call_kwargs(args, torch.Generator("cpu").manual_seed(seed))  # opens the image files before loading
        pipe = load_pipeline(args, device, dtype)
        images = pipe(**kwargs).images
        for image, path in zip(images, paths):
            checks.write_image(image, path, args.overwrite)
            print(f"wrote {path}", flush=True)
    except (ValueError, OSError) as e:
        print(f"rapiddiff generate: error: {e}", file=sys.stderr)
        return 2
    print(f"seed: {seed}")
    return 0
