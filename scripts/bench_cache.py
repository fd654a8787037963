"""DeepCache, compiled: rapiddiff's cached pipeline against Diffusers + DeepCache and Diffusers' compile recipe.

Whole pipeline calls (prompt embeddings given, latents out: the text encoder and the VAE are not timed) of Stable
Diffusion 1.5's full UNet with random weights shared by both libraries (the very same tensors), classifier-free
guidance, DDIM. Rounds interleave the variants, so a machine's drift hits all of them:

    diffusers+deepcache   Diffusers, DeepCache 0.1.1's helper (eager: the only way DeepCache runs)
    diffusers+recipe      Diffusers, channels_last + torch.compile(mode="reduce-overhead", fullgraph=True), uncached
    rapiddiff+cache       rapiddiff.compile_pipeline (its defaults) + unet.enable_cache(DeepCacheConfig(...))
    (--all adds diffusers eager, rapiddiff compiled uncached)

    flock /work/notes/bench.lock python scripts/bench_cache.py          # CPU: fp32, 16x16 latents, 9 steps, 5 rounds
    python scripts/bench_cache.py --device cuda --dtype float16 --latent 64 --steps 50 --batch 4

Prints a Markdown table: median seconds per call with the lowest-highest, and each variant's speed-up over the
others with the lowest-highest of the per-round ratios; then how far rapiddiff's latents are from DeepCache's.
`--json PATH` writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import rapiddiff
from rapiddiff.bench.components import random_model
from rapiddiff.bench.measure import synchronize
from rapiddiff.bench.presets import PRESETS, preset_config


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16" if cuda else "float32")
    p.add_argument("--batch", type=int, default=1, help="images; the UNet sees twice as many (guidance)")
    p.add_argument("--latent", type=int, default=64 if cuda else 16, help="latent height = width (512 px: 64)")
    p.add_argument("--steps", type=int, default=50 if cuda else 9)
    p.add_argument("--interval", type=int, default=3, help="DeepCache's cache_interval")
    p.add_argument("--branch", type=int, default=0, help="DeepCache's cache_branch_id")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--all", action="store_true", help="also Diffusers eager and rapiddiff compiled without cache")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--tiny", action="store_true", help="a tiny UNet instead of SD 1.5's (checks the script quickly)")
    return p.parse_args()


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Per variant, a pipeline; every UNet holds the same weight tensors."""
    import diffusers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = preset_config("sd", "unet", "config.json", PRESETS["gpu"])
    if args.tiny:
        config = dict(config, block_out_channels=(32, 32, 64, 64), attention_head_dim=2, norm_num_groups=16)
    base = random_model(lambda: diffusers.UNet2DConditionModel.from_config(config), device, dtype)
    weights = dict(base.state_dict())

    def diffusers_unet() -> torch.nn.Module:  # another module tree (DeepCache swaps forwards) on the same tensors
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel.from_config(config)
        unet.load_state_dict(weights, assign=True)
        return unet.eval()

    def rapiddiff_unet() -> torch.nn.Module:
        with torch.device("meta"):
            unet = rapiddiff.UNet2DConditionModel.from_config(config)
        unet.load_checkpoint_state(weights, source="diffusers' UNet")
        return unet.eval()

    scheduler = preset_config("sd", "scheduler", "scheduler_config.json", PRESETS["gpu"])
    # a VAE only for the pipelines' scale factor (8): latents come out, it never runs
    vae_config = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=8, layers_per_block=1,
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
    parts = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)  # fmt: skip

    def pipeline(library: Any, unet: torch.nn.Module) -> Any:
        pipe = library.StableDiffusionPipeline(
            vae=library.AutoencoderKL(**vae_config).to(device, dtype).eval(),
            unet=unet,
            scheduler=library.DDIMScheduler.from_config(scheduler),
            **parts,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipes = {
        "diffusers+deepcache": pipeline(diffusers, diffusers_unet()),
        "diffusers+recipe": pipeline(diffusers, diffusers_unet()),
        "rapiddiff+cache": pipeline(rapiddiff, rapiddiff_unet()),
    }
    if args.all:
        pipes["diffusers eager"] = pipeline(diffusers, base)
        pipes["rapiddiff compiled"] = pipeline(rapiddiff, rapiddiff_unet())
    return pipes


def prepare(pipes: dict[str, Any], args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """Cache and compile each variant; returns the undo of DeepCache's helper (it swaps module forwards)."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipes["diffusers+deepcache"])
    helper.set_params(cache_interval=args.interval, cache_branch_id=args.branch)
    helper.enable()
    recipe = pipes["diffusers+recipe"]
    recipe.unet.to(memory_format=torch.channels_last)
    recipe.unet = torch.compile(recipe.unet, mode="reduce-overhead", fullgraph=True)
    ours = pipes["rapiddiff+cache"]
    ours.unet.enable_cache(rapiddiff.DeepCacheConfig(cache_interval=args.interval, cache_branch_id=args.branch))
    rapiddiff.compile_pipeline(ours, components=["unet"])
    if "rapiddiff compiled" in pipes:
        rapiddiff.compile_pipeline(pipes["rapiddiff compiled"], components=["unet"])
    return {"diffusers+deepcache": helper.disable}


def inputs(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(args.batch, 77, 768, generator=g).to(device, dtype) for _ in range(2)]
    size = args.latent * 8
    return dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=size, width=size,
                num_inference_steps=args.steps, guidance_scale=7.5, output_type="latent")  # fmt: skip


def run(pipe: Any, kwargs: dict[str, Any], device: str) -> tuple[float, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    synchronize(torch.device(device))
    start = time.perf_counter()
    with torch.no_grad():
        latents = pipe(generator=generator, **kwargs).images
    synchronize(torch.device(device))
    return time.perf_counter() - start, latents.float().cpu()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipes = build(args)
    undo = prepare(pipes, args)
    kwargs = inputs(args)
    first, latents = {}, {}
    for name, pipe in pipes.items():  # compiles (rapiddiff+cache: the full step's graph and the shallow step's)
        first[name], latents[name] = run(pipe, kwargs, args.device)
        print(f"# first call (compile) {name}: {first[name]:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for r in range(args.rounds):
        order = list(pipes) if r % 2 == 0 else list(reversed(pipes))
        for name in order:
            times[name].append(run(pipes[name], kwargs, args.device)[0])
        print(f"# round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in pipes), flush=True)
    for fn in undo.values():
        fn()
    report(args, times, first, latents)


def report(args: argparse.Namespace, times: dict, first: dict, latents: dict) -> None:
    ours = "rapiddiff+cache"
    names = list(times)
    median = {n: statistics.median(t) for n, t in times.items()}
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(
        f"\nSD 1.5 UNet (random weights), {args.dtype}, {args.latent}x{args.latent} latents, batch {args.batch} "
        f"with guidance, {args.steps} DDIM steps, DeepCache interval {args.interval} branch {args.branch}; "
        f"{args.rounds} interleaved rounds; torch {torch.__version__}, {device}, {torch.get_num_threads()} threads\n"
    )
    print(
        "| variant | s per call (median) | lowest-highest | first call (compile) | rapiddiff+cache speed-up (per-round range) |"
    )
    print("|---|---|---|---|---|")
    speedups = {}
    for n in names:
        ratios = [a / b for a, b in zip(times[n], times[ours])]
        speedups[n] = (statistics.median(ratios), min(ratios), max(ratios))
        cell = "1.00x" if n == ours else f"{speedups[n][0]:.2f}x ({speedups[n][1]:.2f}-{speedups[n][2]:.2f})"
        print(f"| {n} | {median[n]:.2f} | {min(times[n]):.2f}-{max(times[n]):.2f} | {first[n]:.0f} s | {cell} |")
    reference = latents["diffusers+deepcache"]
    scale = reference.abs().max().item()
    diffs = {n: (latents[n] - reference).abs().max().item() for n in names}
    print(f"\nlatents vs Diffusers + DeepCache (max abs, scale {scale:.3f}): "
          + ", ".join(f"{n} {d:.2e}" for n, d in diffs.items()))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(settings=vars(args), seconds=times, first_call=first, speedup_of_cache=speedups,
                           latents_max_abs_diff=diffs, latents_scale=scale, torch=torch.__version__, device=device),
                      f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
