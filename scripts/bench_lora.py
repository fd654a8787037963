"""Cost of a LoRA per UNet step: no LoRA vs unfused adapters vs fused, eager, same inputs; prints times and ratios.

A small SD-shaped UNet (block widths --width, x2, x4; two layers per block; 77 text tokens) with rank --rank adapters on
every attention projection, feed-forward and transformer projection (a typical SD LoRA's targets; --locon adds the
ResNet convolutions). Rounds alternate between the variants so that a loaded machine's drift hits all of them.

    python scripts/bench_lora.py --threads 1          # CPU defaults: width 64, 32x32 latents, batch 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import rapiddiff

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", type=int, default=2, help="unfused adapters loaded and active at once")
    p.add_argument("--locon", action="store_true", help="adapters on the ResNet convolutions too")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int)
    return p.parse_args()


def random_lora(unet: nn.Module, rank: int, seed: int, locon: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in unet.named_modules():
        conv = locon and ".resnets." in name and isinstance(m, nn.Conv2d)
        if not (name.endswith(TARGETS) or conv):
            continue
        if isinstance(m, nn.Linear):
            down, up = torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g)
        else:
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g)
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g)
        sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"] = down * 0.01, up * 0.01
    return sd


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w = args.width
    torch.manual_seed(0)
    unet = rapiddiff.UNet2DConditionModel(
        block_out_channels=(w, 2 * w, 4 * w),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256,
        attention_head_dim=8,
        layers_per_block=2,
        norm_num_groups=32,
    ).to(args.device)
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=args.device)
    emb = torch.randn(args.batch, 77, 256, device=args.device)
    t = torch.tensor(500.0, device=args.device)

    def step() -> torch.Tensor:
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    names = [f"a{i}" for i in range(args.adapters)]

    def variant(kind: str) -> None:
        unet.unfuse_lora()
        unet.set_adapters(names)
        if kind == "fused":
            unet.fuse_lora()

    times: dict[str, list[float]] = {"no LoRA": [], f"{args.adapters} unfused": [], "fused": []}
    saved = {k: v.clone() for k, v in unet.state_dict().items()}
    for _ in range(args.rounds):
        for label in times:
            if label == "no LoRA":
                unet.unload_lora()
                unet.load_state_dict(saved)
            else:
                if not unet.get_list_adapters():
                    for i, name in enumerate(names):
                        sd = random_lora(unet, args.rank, i, args.locon)
                        unet.load_lora_adapter(sd, prefix="unet", adapter_name=name)
                variant("fused" if label == "fused" else "unfused")
            step()  # warm-up
            sync()
            start = time.perf_counter()
            for _ in range(args.iters):
                step()
            sync()
            times[label].append((time.perf_counter() - start) / args.iters)
    base = statistics.median(times["no LoRA"])
    print(f"UNet widths {w}/{2 * w}/{4 * w}, latent {args.latent}, batch {args.batch}, rank {args.rank}, "
          f"{'LoCon, ' if args.locon else ''}{args.device}, threads {torch.get_num_threads()}")  # fmt: skip
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:>12}: {med * 1000:8.1f} ms/step  x{med / base:.3f}")


if __name__ == "__main__":
    main()
