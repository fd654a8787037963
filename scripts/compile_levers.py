"""Compile levers side by side on the SD 1.5 UNet (CPU or GPU): Diffusers with the seed's recipe vs rapiddiff's.

    python scripts/compile_levers.py                                   # narrow UNet, the default variants
    python scripts/compile_levers.py --width full --variants diffusers-recipe rapiddiff-default
    python scripts/compile_levers.py --variants rapiddiff-default rapiddiff-fused-qkv rapiddiff-conv1x1-mm

Every variant gets the same random weights (built once with Diffusers, loaded into rapiddiff), is compiled on its own
(first call = compile + one step, timed), then all variants are timed in interleaved rounds (A, B, C, A, B, C...) so
that the machine's drift hits each alike. Reported per variant: seconds per UNet step (median of the rounds), the
speed-up over `--baseline` with its spread (lowest-highest of the per-round ratios), the first call's seconds, and the
output's max abs difference from fp32 eager Diffusers relative to the output's scale. `--warm` also times a second
process compiling `rapiddiff-default` from the caches the first one filled (the warm start).

"narrow": the real architecture with block widths divided down to a 32-channel first level (same module tree, graph
and kernels, thin tensors), because the full UNet's compile and steps are slow on a small CPU. `--cross-kv` estimates
the lever "text key/values once per generation" (not built): the share of an eager step spent in the 16
cross-attention layers' to_k/to_v projections of the text.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch

from rapiddiff.bench.components import random_model
from rapiddiff.bench.presets import PRESETS, preset_config

sys.path.insert(0, str(Path(__file__).parent))
from compile_warm_start import counters, narrow  # noqa: E402

# name -> (library, compiled?, compile_pipeline keyword arguments or Diffusers' recipe)
VARIANTS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "diffusers-eager": ("diffusers", False, {}),
    "diffusers-recipe": ("diffusers", True, {}),  # channels_last + compile(reduce-overhead, fullgraph)
    "rapiddiff-eager": ("rapiddiff", False, {}),
    "rapiddiff-recipe": ("rapiddiff", True, {"freezing": False}),  # the seed's recipe
    "rapiddiff-default": ("rapiddiff", True, {}),  # compile_pipeline's default
    "rapiddiff-freezing": ("rapiddiff", True, {"freezing": None}),  # inductor freezing for CPU weights
    "rapiddiff-fused-qkv": ("rapiddiff", True, {"fuse_qkv": True}),
    "rapiddiff-conv1x1-mm": ("rapiddiff", True, {"options": {"conv_1x1_as_mm": True}}),
    "rapiddiff-max-autotune": ("rapiddiff", True, {"mode": "max-autotune"}),
}
DEFAULT_VARIANTS = ["diffusers-eager", "diffusers-recipe", "rapiddiff-eager", "rapiddiff-default", "rapiddiff-freezing"]


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    p.add_argument("--baseline", default="diffusers-recipe", choices=list(VARIANTS))
    p.add_argument("--width", choices=["narrow", "full"], default="full" if cuda else "narrow")
    p.add_argument("--latent", type=int, default=64 if cuda else 32, help="latent height = width")
    p.add_argument("--batch", type=int, default=1, help="images; the UNet sees twice as many (guidance)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16" if cuda else "float32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=20 if cuda else 3, help="timed steps per variant and round")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--warm", action="store_true", help="also time a second process compiling rapiddiff-default")
    p.add_argument("--cross-kv", action="store_true", help="estimate the text key/value lever (eager profile)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--ready-only", action="store_true", help=argparse.SUPPRESS)  # the --warm child
    return p.parse_args()


def unet_config(width: str) -> dict[str, Any]:
    config = preset_config("sd", "unet", "config.json", PRESETS["gpu"])
    return config if width == "full" else narrow(config)


def build(name: str, config: dict[str, Any], state: dict[str, torch.Tensor], device: Any, dtype: Any) -> Any:
    import diffusers

    import rapiddiff
    from rapiddiff.compile import compile_pipeline

    library, compiled, kwargs = VARIANTS[name]
    if library == "diffusers":
        model = random_model(lambda: diffusers.UNet2DConditionModel.from_config(config), device, dtype)
        model.load_state_dict(state)
        if compiled:  # the seed's recipe
            model.to(memory_format=torch.channels_last)
            model = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        return model
    with torch.device("meta"):
        model = rapiddiff.UNet2DConditionModel.from_config(config)
    model.load_checkpoint_state({k: v.clone() for k, v in state.items()}, source="diffusers' UNet")
    model = model.eval()
    if not compiled:
        return model
    kwargs = dict(kwargs)
    if kwargs.pop("fuse_qkv", False):
        model.fuse_qkv_projections()
    compile_pipeline(types.SimpleNamespace(unet=model), components=["unet"], **kwargs)
    return model


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    config = unet_config(args.width)
    reference = random_model(lambda: diffusers.UNet2DConditionModel.from_config(config), device, torch.float32)
    state = {k: v.to(dtype) for k, v in reference.state_dict().items()}
    g = torch.Generator(device).manual_seed(0)
    n = 2 * args.batch
    sample = torch.randn(n, 4, args.latent, args.latent, generator=g, device=device)
    context = torch.randn(n, 77, config["cross_attention_dim"], generator=g, device=device)
    timestep = torch.tensor(999.0, device=device)
    inputs = (sample.to(dtype), timestep, context.to(dtype))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(model: Any) -> torch.Tensor:
        return model(*inputs, return_dict=False)[0]

    with torch.inference_mode():
        expected = reference(sample, timestep, context, return_dict=False)[0]
    if args.cross_kv:
        print(json.dumps(cross_kv_share(reference, (sample, timestep, context)), indent=1))
    del reference
    variants = ["rapiddiff-default"] if args.ready_only else args.variants
    models, first, error = {}, {}, {}
    with torch.inference_mode():
        for name in variants:
            models[name] = build(name, config, state, device, dtype)
            sync()
            start = time.perf_counter()
            out = step(models[name])
            sync()
            first[name] = time.perf_counter() - start
            error[name] = ((out.float() - expected).abs().max() / expected.abs().max()).item()
            print(f"{name}: first call {first[name]:.1f} s, relative error {error[name]:.1e}", flush=True)
        if args.ready_only:
            later = timed(lambda: step(models["rapiddiff-default"]), 1, sync)
            print(json.dumps({"ready_s": first["rapiddiff-default"] - later, **counters()}))
            return
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for name in variants:  # one more untimed call each (a CUDA graph is recorded at the second call)
            step(models[name])
        for _ in range(args.rounds):
            for name in variants:
                seconds[name].append(timed(functools.partial(step, models[name]), args.iters, sync))
    results = report(args, variants, seconds, first, error)
    if args.warm:
        results["warm_start"] = warm_start(args)
        print(f"warm start (second process, rapiddiff-default): {results['warm_start']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def timed(fn: Any, iters: int, sync: Any) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def report(args: argparse.Namespace, variants: list[str], seconds: dict, first: dict, error: dict) -> dict[str, Any]:
    base = args.baseline if args.baseline in seconds else variants[0]
    print(
        f"\nSD 1.5 UNet ({args.width}), {args.dtype}, UNet batch {2 * args.batch}, latent {args.latent}, "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds of {args.iters} steps; vs {base}"
    )
    print(f"| variant | s/step | vs {base} (spread) | first call s | rel. error |")
    print("|---|---|---|---|---|")
    rows = {}
    for name in variants:
        ratios = [b / s for b, s in zip(seconds[base], seconds[name])]
        median = statistics.median(seconds[name])
        speedup = statistics.median(seconds[base]) / median
        print(
            f"| {name} | {median:.3f} | {speedup:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{first[name]:.1f} | {error[name]:.1e} |"
        )
        rows[name] = dict(seconds=seconds[name], speedup=speedup, first_call_s=first[name], rel_error=error[name])
    return {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, "variants": rows}


def warm_start(args: argparse.Namespace) -> dict[str, Any]:
    """A second process compiling rapiddiff-default with this one's caches (TORCHINDUCTOR_CACHE_DIR is inherited)."""
    command = [sys.executable, __file__, "--ready-only", "--width", args.width, "--latent", str(args.latent)]
    command += ["--batch", str(args.batch), "--dtype", args.dtype] + (
        ["--threads", str(args.threads)] * bool(args.threads)
    )
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cross_kv_share(model: Any, inputs: tuple) -> dict[str, float]:
    """Eager seconds of a UNet step and of the cross-attention text key/value projections alone (same inputs)."""
    from diffusers.models.attention_processor import Attention

    layers = [m for n, m in model.named_modules() if isinstance(m, Attention) and n.endswith("attn2")]
    context = inputs[2]
    with torch.inference_mode():
        step = min(timed(lambda: model(*inputs), 1, lambda: None) for _ in range(3))
        kv = min(timed(lambda: [(a.to_k(context), a.to_v(context)) for a in layers], 1, lambda: None) for _ in range(3))
    return {"layers": len(layers), "step_s": step, "text_kv_s": kv, "share": kv / step}


if __name__ == "__main__":
    if "--ready-only" not in sys.argv and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="levers-")  # a cold start unless told
    main()
