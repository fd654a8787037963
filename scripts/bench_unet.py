"""The SD 1.5 (or SDXL) UNet alone, eager: rapiddiff vs diffusers on the same weights and inputs; prints steps/s and
the ratio.

Full SD 1.5 / SDXL base architecture (rapiddiff/presets), random weights built once with diffusers, in the run's
dtype, and shared by rapiddiff's model (one copy in memory), classifier-free guidance batch (2 x --batch). Rounds alternate between the backends so that a machine's
drift hits both. On the CPU the defaults shrink the latent and the repeat count so it runs in a minute or two.

    python scripts/bench_unet.py                              # CUDA: fp16, 64x64 latents; CPU: fp32, 16x16
    python scripts/bench_unet.py --batch 4 --attn vanilla --iters 30
    python scripts/bench_unet.py --formats contiguous          # one memory format only
    python scripts/bench_unet.py --model sdxl --dtype bfloat16   # SDXL's 2.6B UNet (5.1 GB in bf16), text_time inputs

Each memory format is a table row: steps/s of each backend (median of the rounds) and the speed-up with its spread
(lowest-highest ratio of the rounds, each round timing both backends back to back).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rapiddiff.bench.components import random_model
from rapiddiff.bench.measure import synchronize
from rapiddiff.bench.presets import PRESETS, preset_config

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
MODELS = {"sd": ("SD 1.5", 64), "sdxl": ("SDXL base", 128)}  # --model -> (name, trained latent size)


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="sd", help="the UNet: SD 1.5 or SDXL base 1.0")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16" if cuda else "float32")
    p.add_argument("--batch", type=int, default=1, help="images; the UNet sees twice as many (guidance)")
    p.add_argument("--latent", type=int, help="latent height = width (default: CUDA the model's size, 64 for SD "
                   "and 128 for SDXL; CPU 16)")  # fmt: skip
    p.add_argument("--iters", type=int, default=20 if cuda else 2, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per backend; the median is reported")
    p.add_argument("--attn", choices=["sdpa", "vanilla"], default="sdpa")
    p.add_argument(
        "--formats",
        nargs="+",
        choices=list(FORMATS),
        default=list(FORMATS),
        help="memory formats to measure, one after the other on the same models (default: both)",
    )
    p.add_argument("--threads", type=int, help="CPU threads for torch (a loaded machine: 1)")
    args = p.parse_args()
    if args.latent is None:
        args.latent = MODELS[args.model][1] if cuda else 16
    return args


def build(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    import diffusers

    import rapiddiff

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = preset_config(args.model, "unet", "config.json", PRESETS["gpu"])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the run's dtype: no float32 copy of a 2.6B model on the way
    try:
        theirs = random_model(lambda: diffusers.UNet2DConditionModel.from_config(config), device, dtype)
    finally:
        torch.set_default_dtype(default)
    with torch.device("meta"):
        ours = rapiddiff.UNet2DConditionModel.from_config(config)
    ours.load_checkpoint_state(dict(theirs.state_dict()), source="diffusers' UNet")  # the very same tensors
    models = {"rapiddiff": ours.eval(), "diffusers": theirs}
    for model in models.values():
        if args.attn == "vanilla":
            model.set_default_attn_processor()
    return models


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    models = build(args)
    g = torch.Generator(device).manual_seed(0)
    n = 2 * args.batch
    sample = torch.randn(n, 4, args.latent, args.latent, generator=g, device=device, dtype=dtype)
    config = models["diffusers"].config
    context = torch.randn(n, 77, config.cross_attention_dim, generator=g, device=device, dtype=dtype)
    timestep = torch.tensor(999, device=device)
    extra = {}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text and the 6 micro-conditioning numbers
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        size = float(8 * args.latent)
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(n, pooled, generator=g, device=device, dtype=dtype),
            "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * n, device=device, dtype=dtype),
        }

    def step(model: torch.nn.Module) -> torch.Tensor:
        return model(sample, timestep, encoder_hidden_states=context, return_dict=False, **extra)[0]

    print(f"{MODELS[args.model][0]} UNet, {args.device} {args.dtype}, batch {args.batch} (UNet batch {n}), latent {args.latent}, "
          f"attention {args.attn}, torch threads {torch.get_num_threads()}, {args.rounds} interleaved rounds of "
          f"{args.iters} steps")  # fmt: skip
    for label in args.formats:
        for model in models.values():
            model.to(memory_format=FORMATS[label])
        seconds: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            outputs = {name: step(model) for name, model in models.items()}  # warm-up, and the parity check
            for _ in range(args.rounds):
                for name, model in models.items():
                    synchronize(device)
                    start = time.perf_counter()
                    for _ in range(args.iters):
                        step(model)
                    synchronize(device)
                    seconds[name].append((time.perf_counter() - start) / args.iters)
        ratios = [d / r for r, d in zip(seconds["rapiddiff"], seconds["diffusers"])]
        rate = {name: 1.0 / statistics.median(s) for name, s in seconds.items()}
        diff = (outputs["rapiddiff"].float() - outputs["diffusers"].float()).abs().max().item()
        scale = outputs["diffusers"].float().abs().max().item()
        print(f"  {label:13s} rapiddiff {rate['rapiddiff']:7.3f} steps/s, diffusers {rate['diffusers']:7.3f} steps/s: "
              f"{rate['rapiddiff'] / rate['diffusers']:.3f}x (rounds {min(ratios):.3f}-{max(ratios):.3f}); "
              f"max abs difference {diff:.1e} (output scale {scale:.1e})")  # fmt: skip


if __name__ == "__main__":
    main()
