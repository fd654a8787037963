"""What DeepCache costs in image quality on your own checkpoint: cached vs uncached images of the same seeds.

For each prompt of a file (plain text, one prompt a line), the pipeline makes one image without the cache and one
with each `--deepcache INTERVAL[:BRANCH]` setting, from the same seed, and this prints per setting the mean PSNR (dB)
and SSIM (Gaussian 11x11, sigma 1.5, on luma) of cached against uncached, and with `--clip-model` (a local folder or
Hub id of a CLIP model, e.g. openai/clip-vit-base-patch16) the mean CLIP score of both (100 x the cosine of image and
prompt embeddings, floored at 0, as torchmetrics' CLIPScore), the paper's measure.

    python scripts/cache_quality.py --model ./sd15 --prompts prompts.txt --deepcache 3:0 5:0 --steps 50
    python scripts/cache_quality.py --model ./sd15 --prompts prompts.txt --deepcache 3 --clip-model ./clip-vit-b16

`--json PATH` writes every number, per prompt too.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import rapiddiff
from rapiddiff.pipelines.deep_cache import parse_deep_cache

LUMA = torch.tensor([0.299, 0.587, 0.114])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of two images in [0, 1] (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) of the luma of two (H, W, 3) images in [0, 1]."""
    x, y = (torch.from_numpy(np.ascontiguousarray(i)).double() @ LUMA.double() for i in (a, b))
    x, y = x[None, None], y[None, None]
    size = min(window, *x.shape[-2:])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


class ClipScore:
    """100 x cos(image embedding, text embedding), floored at 0 (torchmetrics' CLIPScore)."""

    def __init__(self, name: str):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(name).eval()
        self.processor = CLIPProcessor.from_pretrained(name)

    @torch.no_grad()
    def __call__(self, image: np.ndarray, prompt: str) -> float:
        inputs = self.processor(text=[prompt], images=[(image * 255).round().astype(np.uint8)], return_tensors="pt",
                                padding=True, truncation=True)  # fmt: skip
        out = self.model(**inputs)
        cos = F.cosine_similarity(out.image_embeds, out.text_embeds).item()
        return max(100 * cos, 0.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a checkpoint folder in Diffusers' layout, or a Hub id")
    p.add_argument("--prompts", required=True, type=Path, help="a text file, one prompt a line")
    p.add_argument("--deepcache", nargs="+", default=["3:0"], metavar="INTERVAL[:BRANCH]")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0, help="prompt k uses seed + k")
    p.add_argument("--scheduler", help="a rapiddiff scheduler class name (default: the checkpoint's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--clip-model", help="a CLIP model (folder or Hub id) for CLIP scores")
    p.add_argument("--json", type=Path, help="write every number here")
    args = p.parse_args(argv)
    try:
        args.settings = {text: parse_deep_cache(text) for text in args.deepcache}
    except ValueError as error:
        p.error(str(error))
    args.prompt_list = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if not args.prompt_list:
        p.error(f"--prompts {args.prompts}: no prompt in the file")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float16 if args.device == "cuda" else torch.float32
    pipe = rapiddiff.DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(args.device)
    if args.scheduler:
        pipe.scheduler = getattr(rapiddiff, args.scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    clip = ClipScore(args.clip_model) if args.clip_model else None

    def generate(prompt: str, seed: int) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(seed)
        out = pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height,
                   width=args.width, generator=generator, output_type="np")  # fmt: skip
        return out.images[0]

    rows: list[dict[str, Any]] = []
    for k, prompt in enumerate(args.prompt_list):
        pipe.unet.disable_cache()
        reference = generate(prompt, args.seed + k)
        row: dict[str, Any] = {"prompt": prompt, "seed": args.seed + k}
        if clip is not None:
            row["clip_uncached"] = clip(reference, prompt)
        for text, config in args.settings.items():
            pipe.unet.enable_cache(config)
            image = generate(prompt, args.seed + k)
            row[text] = {"psnr": psnr(image, reference), "ssim": ssim(image, reference)}
            if clip is not None:
                row[text]["clip"] = clip(image, prompt)
        rows.append(row)
    pipe.unet.disable_cache()
    summary = {
        text: {
            key: float(np.mean([row[text][key] for row in rows]))
            for key in ("psnr", "ssim", *(("clip",) if clip else ()))
        }
        for text in args.settings
    }
    if clip is not None:
        summary["uncached"] = {"clip": float(np.mean([row["clip_uncached"] for row in rows]))}
    print(f"{len(rows)} prompts, {args.steps} steps, model {args.model}")
    print(
        "| DeepCache | PSNR (dB) | SSIM |"
        + (f" CLIP score (uncached: {summary['uncached']['clip']:.2f}) |" if clip else "")
    )
    print("|---|---|---|" + ("---|" if clip else ""))
    for text in args.settings:
        s = summary[text]
        print(f"| {text} | {s['psnr']:.2f} | {s['ssim']:.4f} |" + (f" {s['clip']:.2f} |" if clip else ""))
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("settings", "prompts")}, "summary": summary,
              "prompts": rows}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
