"""Precisions side by side on the CPU: the full SD 1.5 UNet, compiled, in fp32, bf16, int8 dynamic (torchao) and int8
static (PT2E), for rapiddiff and for Diffusers where Diffusers has it; one process, interleaved rounds.

    flock /work/notes/bench.lock python scripts/bench_precision.py                   # 32x32 latents, batch 2
    python scripts/bench_precision.py --rows diffusers-bf16 rapiddiff-bf16 --rounds 3 --json out.json

Rows (random weights seeded by tensor name, the same in both libraries; inputs: a 2 x 4 x L x L sample at t=500 and
2 x 77 x 768 prompt embeddings, the guidance batch of one image):
  diffusers-fp32     Diffusers with the reference recipe (channels_last, torch.compile reduce-overhead, fullgraph):
                     the baseline of every speed-up.
  rapiddiff-fp32     rapiddiff's compile_pipeline default (CPU: inductor freezing).
  diffusers-bf16     Diffusers in bfloat16 with the recipe.
  rapiddiff-bf16     rapiddiff in bfloat16, compile_pipeline default.
  diffusers-int8dyn  Diffusers, bf16 + TorchAoConfig(Int8DynamicActivationInt8WeightConfig()), the recipe.
  rapiddiff-int8dyn  rapiddiff, the same config, compile_pipeline default.
  rapiddiff-int8static  rapiddiff's int8 static path (`int8_static_call`, what `quantize_pipeline` installs):
                     X86InductorQuantizer calibrated on --calib UNet calls (random samples at timesteps spread over
                     the schedule; the pipeline path calibrates on the pipeline's own steps), compiled with freezing;
                     the unquantized ops in bf16 under autocast where the CPU has native bf16 (torchao's
                     int8-mixed-bf16). Diffusers has no such path.
  rapiddiff-bf16-deepcache  rapiddiff-bf16 with the step cache (DeepCache, --cache-interval 3, branch 0): each call
                     runs a --cache-steps schedule of full and shallow UNet calls (DeepCache's placement); its
                     seconds are per UNet call over the schedule. Its deviation is that of a shallow call on the
                     feature of a full call at the same input (= bf16's): caching's own deviation builds up along a
                     trajectory and is measured on images by scripts/cache_quality.py (docs/cache.md).

Per row: seconds per UNet call (median of the rounds, each the mean of --iters calls) with the lowest-highest
spread; the speed-up over diffusers-fp32 and over diffusers-bf16 (ratio of medians, lowest-highest ratio of a
round); the first call's seconds (the compile); the output's deviation from fp32 eager Diffusers: max |diff| over the
output's scale (max |fp32 output|), and its PSNR over that scale. Rounds interleave the rows (each round in another
order) so that the machine's drift hits all of them. Every compiled row must compile a graph of its own at its first
call, or the run stops (a row must never time code compiled for another).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from rapiddiff.bench.components import random_model
from rapiddiff.bench.presets import PRESETS, preset_config
from rapiddiff.quantization.cpu import cpu_precisions

# name -> (library, dtype, technique: a quantization or the step cache)
ROWS: dict[str, tuple[str, torch.dtype, str | None]] = {
    "diffusers-fp32": ("diffusers", torch.float32, None),
    "rapiddiff-fp32": ("rapiddiff", torch.float32, None),
    "diffusers-bf16": ("diffusers", torch.bfloat16, None),
    "rapiddiff-bf16": ("rapiddiff", torch.bfloat16, None),
    "diffusers-int8dyn": ("diffusers", torch.bfloat16, "int8-dynamic"),
    "rapiddiff-int8dyn": ("rapiddiff", torch.bfloat16, "int8-dynamic"),
    "rapiddiff-int8static": ("rapiddiff", torch.float32, "int8-static"),
    "rapiddiff-bf16-deepcache": ("rapiddiff", torch.bfloat16, "deepcache"),
}
# most important first: --budget skips the last ones
DEFAULT_ROWS = [
    "diffusers-bf16",
    "rapiddiff-bf16",
    "rapiddiff-int8static",
    "diffusers-fp32",
    "rapiddiff-bf16-deepcache",
    "rapiddiff-int8dyn",
    "diffusers-int8dyn",
]


class Run(NamedTuple):
    """A built row: one call, and how many UNet calls it makes (the step cache's row runs a whole schedule)."""

    call: Callable[[], torch.Tensor]
    unet_calls: int = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=DEFAULT_ROWS)
    p.add_argument("--latent", type=int, default=32, help="latent height = width")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=2, help="timed calls per row and round")
    p.add_argument("--calib", type=int, default=8, help="calibration calls of the int8 static row")
    p.add_argument("--cache-interval", type=int, default=3, help="DeepCache's cache_interval (the cache row)")
    p.add_argument("--cache-steps", type=int, default=9, help="steps of the cache row's schedule")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument(
        "--budget", type=float, default=0.0, help="seconds for building and compiling; later rows skipped (0: none)"
    )
    p.add_argument("--tiny", action="store_true", help="a tiny UNet: checks the script, measures nothing")
    args = p.parse_args(argv)
    global PRESET
    PRESET = PRESETS["tiny" if args.tiny else "gpu"]
    return args


PRESET = PRESETS["gpu"]  # the full SD 1.5 UNet


def unet_config() -> dict[str, Any]:
    return preset_config("sd", "unet", "config.json", PRESET)


def build(name: str, inputs: tuple[torch.Tensor, ...], args: argparse.Namespace) -> Run:
    """Row `name`'s model, quantized, cached and compiled as the row says; returns its call on `inputs` (cast)."""
    import types

    import diffusers
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    import rapiddiff
    from rapiddiff.quantization.static import int8_static_call
    from rapiddiff.quantization.torchao_quant import quantize_model

    library, dtype, quant = ROWS[name]
    lib = diffusers if library == "diffusers" else rapiddiff
    unet = random_model(lambda: lib.UNet2DConditionModel.from_config(unet_config()), torch.device("cpu"), dtype)
    sample, timestep, context = (x.to(dtype) if x.is_floating_point() and x.ndim else x for x in inputs)
    if quant == "int8-dynamic":
        if library == "diffusers":
            # Diffusers' quantizer applies quantize_ to each nn.Linear at loading; the same transform, after building
            from torchao.quantization import quantize_

            for module in unet.modules():
                if isinstance(module, torch.nn.Linear):
                    quantize_(module, Int8DynamicActivationInt8WeightConfig())
        else:
            quantize_model(unet, rapiddiff.TorchAoConfig(Int8DynamicActivationInt8WeightConfig()))
    if quant == "int8-static":
        g = torch.Generator().manual_seed(1)
        calibration = [
            (torch.randn(sample.shape, generator=g), torch.tensor(float(t)), context)
            for t in torch.linspace(999, 1, args.calib).round()
        ]
        unet._compiled_call_impl = int8_static_call(unet, calibration)
        return Run(lambda: unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0])
    if library == "diffusers":  # the reference recipe
        unet.to(memory_format=torch.channels_last)
        compiled = torch.compile(unet, mode="reduce-overhead", fullgraph=True)
    else:
        holder = types.SimpleNamespace(unet=unet)
        rapiddiff.compile_pipeline(holder, components=["unet"])
        compiled = holder.unet
    if quant == "deepcache":
        return cached_schedule(compiled, unet, (sample, timestep, context), args)
    return Run(lambda: compiled(sample, timestep, encoder_hidden_states=context, return_dict=False)[0])


def cached_schedule(compiled: Any, unet: Any, inputs: tuple[torch.Tensor, ...], args: argparse.Namespace) -> Run:
    """One call: a --cache-steps schedule of the compiled UNet's full and shallow calls, placed as DeepCache places
    them (what a cached pipeline's loop runs); the last call's output."""
    from rapiddiff.models.deep_cache import DeepCacheConfig, DeepCacheStep, cache_point, full_steps

    sample, timestep, context = inputs
    point = cache_point(unet.down_blocks, 0)
    full = full_steps(DeepCacheConfig(cache_interval=args.cache_interval), list(range(args.cache_steps)))

    def run() -> torch.Tensor:
        feature = None
        for is_full in full:
            step = DeepCacheStep(point, None if is_full else feature)
            out, new = compiled(sample, timestep, encoder_hidden_states=context, deep_cache=step, return_dict=False)
            if is_full:
                feature = new.clone()  # owned, as the pipeline's loop keeps it (CUDA-graph replays reuse outputs)
        return out

    return Run(run, unet_calls=args.cache_steps)


class Stop(Exception):
    """SIGTERM arrived."""


STOPPED: list[bool] = []  # SIGTERM seen (dynamo may wrap the Stop it raised inside a compile)


def _stop(*_: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the process
    STOPPED.append(True)
    raise Stop


def first_calls(
    name: str, runs: dict[str, Run], inputs: tuple, reference: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    """Build row `name` into `runs`, make its first two calls (the compile); its build and first-call seconds and
    its output's deviation from the fp32 reference."""
    before = graphs()
    start = time.perf_counter()
    with torch.inference_mode(ROWS[name][2] != "int8-static"):  # export traces outside inference mode
        runs[name] = build(name, inputs, args)
    build_s = time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        out = runs[name].call().float()
        first_s = time.perf_counter() - start
        runs[name].call()
    if graphs() == before:
        raise RuntimeError(f"{name}: its first call compiled no graph (it would time another model's code)")
    return {"build_s": build_s, "first_call_s": first_s, "seconds": [], **deviation(out, reference)}


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def deviation(out: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    out, reference = out.double(), reference.double()
    scale = reference.abs().max().item()
    mse = ((out - reference) ** 2).mean().item()
    return {
        "rel_max_abs_diff": (out - reference).abs().max().item() / scale,
        "psnr_db": math.inf if mse == 0 else 10 * math.log10(scale**2 / mse),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import diffusers

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = cpu_precisions()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, args.latent, args.latent, generator=g)
    context = torch.randn(2, 77, unet_config()["cross_attention_dim"], generator=g)
    inputs = (sample, torch.tensor(500.0), context)
    with torch.inference_mode():
        reference_model = random_model(
            lambda: diffusers.UNet2DConditionModel.from_config(unet_config()), torch.device("cpu"), torch.float32
        )
        reference = reference_model(*inputs[:2], encoder_hidden_states=context, return_dict=False)[0]
        del reference_model
    runs, results = {}, {}
    failed = {}
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, _stop)  # `timeout`: stop building, time the rows built so far
    for name in args.rows:
        if args.budget and time.perf_counter() - started > args.budget:
            failed[name] = f"skipped: past --budget {args.budget:.0f} s of building and compiling"
            print(f"{name}: {failed[name]}", flush=True)
            continue
        try:
            results[name] = first_calls(name, runs, inputs, reference, args)
        except Exception as e:  # a row that cannot run is reported, the others still measured
            if STOPPED:
                failed[name] = "interrupted (SIGTERM) while building or compiling"
                runs.pop(name, None)
                print(f"{name}: {failed[name]}", flush=True)
                break
            failed[name] = f"{type(e).__name__}: {e}"
            runs.pop(name, None)
            print(f"{name}: FAILED {failed[name]}", flush=True)
            continue
        print(f"{name}: {results[name]}", flush=True)
    failed |= {n: "not built (SIGTERM)" for n in args.rows if n not in results and n not in failed}
    rows = list(results)
    try:
        with torch.no_grad():
            for r in range(args.rounds if rows else 0):
                order = rows[r % len(rows) :] + rows[: r % len(rows)]
                seconds = {}
                for name in order:
                    start = time.perf_counter()
                    for _ in range(args.iters):
                        runs[name].call()
                    seconds[name] = (time.perf_counter() - start) / (args.iters * runs[name].unet_calls)
                for name, s in seconds.items():  # whole rounds only
                    results[name]["seconds"].append(s)
                print(f"round {r + 1}/{args.rounds}", flush=True)
    except Stop:
        print("SIGTERM: the rounds done so far", flush=True)
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, native: "
        f"{precisions.describe()}",
        "torch": torch.__version__,
        "latent": args.latent,
        "cache": {"interval": args.cache_interval, "branch": 0, "steps": args.cache_steps},
        "rows": results,
        "failed": failed,
    }
    print(table(results, args) + "".join(f"\n{name}: FAILED {why}" for name, why in failed.items()))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


def ratio(results: dict[str, Any], name: str, base: str) -> str:
    if base not in results:
        return "-"
    ours, theirs = results[name]["seconds"], results[base]["seconds"]
    if not ours or not theirs:
        return "-"
    per_round = [b / a for a, b in zip(ours, theirs)]
    return f"{statistics.median(theirs) / statistics.median(ours):.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"Full SD 1.5 UNet, {args.latent}x{args.latent} latents, batch 2 (guidance), compiled; torch {torch.__version__}"
        f"; native: {cpu_precisions().describe()}; {args.rounds} rounds x {args.iters} calls; cache row: DeepCache "
        f"interval {args.cache_interval}, branch 0, {args.cache_steps}-step schedule",
        "",
        "| row | s / UNet call (low-high) | vs diffusers-fp32 | vs diffusers-bf16 | first call s | max abs diff / scale "
        "| PSNR dB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s = r["seconds"] or [math.nan]
        lines.append(
            f"| {name} | {statistics.median(s):.3f} ({min(s):.3f}-{max(s):.3f}) | {ratio(results, name, 'diffusers-fp32')} "
            f"| {ratio(results, name, 'diffusers-bf16')} | {r['first_call_s']:.0f} | {r['rel_max_abs_diff']:.4f} "
            f"| {r['psnr_db']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
