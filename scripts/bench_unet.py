"""The SD 1.5 UNet alone, eager: rapiddiff vs diffusers on the same weights and inputs; prints steps/s and the ratio.

Full SD 1.5 architecture (rapiddiff/presets), random weights built once with diffusers and loaded into rapiddiff's
model, classifier-free guidance batch (2 x --batch). Rounds alternate between the backends so that a machine's
drift hits both. On the CPU the defaults shrink the latent and the repeat count so it runs in a minute or two.

    python scripts/bench_unet.py                              # CUDA: fp16, 64x64 latents; CPU: fp32, 16x16
    python scripts/bench_unet.py --batch 4 --attn vanilla --iters 30
    python scripts/bench_unet.py --formats contiguous          # one memory format only

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


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16" if cuda else "float32")
    p.add_argument("--batch", type=int, default=1, help="images; the UNet sees twice as many (guidance)")
    p.add_argument("--latent", type=int, default=64 if cuda else 16, help="latent height = width (512 px: 64)")
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
    return p.parse_args()


def build(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    import diffusers

    import rapiddiff

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = preset_config("sd", "unet", "config.json", PRESETS["gpu"])
    theirs = random_model(lambda: diffusers.UNet2DConditionModel.from_config(config), device, dtype)
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
    context = torch.randn(n, 77, 768, generator=g, device=device, dtype=dtype)
    timestep = torch.tensor(999, device=device)

    def step(model: torch.nn.Module) -> torch.Tensor:
        return model(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]

    print(f"SD 1.5 UNet, {args.device} {args.dtype}, batch {args.batch} (UNet batch {n}), latent {args.latent}, "
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
