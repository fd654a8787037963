"""Compile levers side by side on SD 1.5 (CPU or GPU): Diffusers with the reference recipe vs rapiddiff's variants.

    python scripts/compile_levers.py                                       # full UNet, the default variants
    python scripts/compile_levers.py --level pipeline --dtype bfloat16     # a pipeline step instead of a UNet call
    python scripts/compile_levers.py --variants rapiddiff-recipe rapiddiff-fused-qkv --latent 32

One process per variant. Dynamo keeps compiled code per Python code object and its guards check a module's
structure, not its identity: a second UNet of the same class compiled in the same process can run the first one's
graph (a lever that "does nothing" because it never compiled). So each variant runs in a fresh process beside the
baseline (`--baseline`, Diffusers' recipe by default: another class, so nothing is shared), and each compiled model
must add graphs to dynamo's counter at its first call, or the run stops. In each process the two are timed in
interleaved rounds (baseline, variant, baseline, ...) so that the machine's drift hits both; the speed-up is the
ratio of their medians, the spread the lowest-highest ratio of a round.

Levels: `unet` times one UNet call (batch 2 x --batch, the guidance batch); `pipeline` times a whole
StableDiffusionPipeline call on precomputed prompt embeddings (the full UNet, a tiny VAE that the latent output
never runs) and reports seconds per denoising step. Reported per variant: seconds per step, the speed-up over the
baseline with its spread, the first call's seconds (the compile), the graphs it compiled, and the output's
difference from fp32 eager Diffusers relative to the output's scale (`unet`) or from the baseline's (`pipeline`).
`--warm` also times a second process compiling `rapiddiff-default` from the caches the first filled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rapiddiff.bench.components import random_model
from rapiddiff.bench.presets import PRESETS, preset_config

# name -> (library, compiled?, compile_pipeline keyword arguments; Diffusers' compiled variant is the recipe)
VARIANTS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "diffusers-eager": ("diffusers", False, {}),
    "diffusers-recipe": ("diffusers", True, {}),  # channels_last + compile(reduce-overhead, fullgraph)
    "rapiddiff-eager": ("rapiddiff", False, {}),
    "rapiddiff-recipe": ("rapiddiff", True, {"freezing": False}),  # the reference recipe alone
    "rapiddiff-default": ("rapiddiff", True, {}),  # compile_pipeline's default
    "rapiddiff-fused-qkv": ("rapiddiff", True, {"fuse_qkv": True}),
    "rapiddiff-conv1x1-mm": ("rapiddiff", True, {"options": {"conv_1x1_as_mm": True}}),
    "rapiddiff-max-autotune": ("rapiddiff", True, {"mode": "max-autotune"}),
}
DEFAULT_VARIANTS = ["rapiddiff-eager", "rapiddiff-recipe", "rapiddiff-default"]
DTYPES = ("float16", "bfloat16", "float32")


class NotCompiledAnew(RuntimeError):
    """A compiled variant's first call added no graph: it ran code compiled for another model."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    p.add_argument("--baseline", default="diffusers-recipe", choices=list(VARIANTS))
    p.add_argument("--level", choices=["unet", "pipeline"], default="unet")
    p.add_argument("--latent", type=int, default=64 if cuda else 16, help="latent height = width")
    p.add_argument("--batch", type=int, default=1, help="images; the UNet sees twice as many (guidance)")
    p.add_argument("--dtype", choices=DTYPES, default="float16" if cuda else "float32")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per pipeline call (--level pipeline)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=20 if cuda else 2, help="timed calls per model and round")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--warm", action="store_true", help="also time a second process compiling rapiddiff-default")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one variant beside the baseline
    return p.parse_args(argv)


# --- models ----------------------------------------------------------------------------------------------------------
def unet_config() -> dict[str, Any]:
    return preset_config("sd", "unet", "config.json", PRESETS["gpu"])


def build_unet(library: str, state: dict[str, torch.Tensor], device: Any, dtype: Any) -> torch.nn.Module:
    """The full SD 1.5 UNet of `library` holding `state` (Diffusers' random weights), eager, in eval mode."""
    import diffusers

    import rapiddiff

    cls = (diffusers if library == "diffusers" else rapiddiff).UNet2DConditionModel
    model = random_model(lambda: cls.from_config(unet_config()), device, dtype)
    model.load_state_dict(state)
    return model.eval()


def compile_variant(name: str, pipe: Any) -> None:
    """Apply variant `name` to `pipe` (anything with a `.unet`) in place."""
    from rapiddiff.compile import compile_pipeline

    library, compiled, kwargs = VARIANTS[name]
    if not compiled:
        return
    if library == "diffusers":  # the reference recipe
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
        return
    kwargs = dict(kwargs)
    if kwargs.pop("fuse_qkv", False):
        pipe.unet.fuse_qkv_projections()
    compile_pipeline(pipe, components=["unet"], **kwargs)


def pipeline(library: str, unet: torch.nn.Module, device: Any, dtype: Any) -> Any:
    """StableDiffusionPipeline of `library` around `unet`, with a tiny VAE (unused: latents out) and no text encoder."""
    import diffusers

    import rapiddiff

    lib = diffusers if library == "diffusers" else rapiddiff
    vae_config = preset_config("sd", "vae", "config.json", PRESETS["tiny"])
    scheduler_config = preset_config("sd", "scheduler", "scheduler_config.json", PRESETS["gpu"])
    pipe = lib.StableDiffusionPipeline(
        vae=random_model(lambda: lib.AutoencoderKL.from_config(vae_config), device, dtype),
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=lib.PNDMScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- one process: the baseline and one variant -----------------------------------------------------------------------
def compile_counters() -> dict[str, int]:
    """Graphs dynamo compiled so far, and inductor's FX-graph cache hits and misses (a warm start hits)."""
    from torch._dynamo.utils import counters

    return {
        "graphs": counters["stats"]["unique_graphs"],
        "fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
    }


def rss_mb() -> float:
    """This process's resident memory (Linux), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def first_call(name: str, run: Callable[[], torch.Tensor], sync: Callable[[], None]) -> dict[str, Any]:
    """Time `run`'s first call and count the graphs it compiled; a compiled variant that compiled none fails."""
    before, rss = compile_counters(), rss_mb()
    sync()
    start = time.perf_counter()
    out = run()
    sync()
    seconds = time.perf_counter() - start
    counts = {k: v - before[k] for k, v in compile_counters().items()}
    require_compiled_anew(name, VARIANTS[name][1], counts["graphs"])
    return {"first_call_s": seconds, **counts, "rss_growth_mb": rss_mb() - rss, "out": out}


def require_compiled_anew(name: str, compiled: bool, graphs: int) -> None:
    if compiled and graphs == 0:
        raise NotCompiledAnew(
            f"{name}: its first call compiled no graph - it ran code compiled earlier in this process for another "
            "model of the same class; measure it in a process of its own"
        )


def child(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    reference = random_model(lambda: diffusers.UNet2DConditionModel.from_config(unet_config()), device, torch.float32)
    state = {k: v.to(dtype) for k, v in reference.state_dict().items()}
    g = torch.Generator(device).manual_seed(0)
    n = 2 * args.batch
    sample = torch.randn(n, 4, args.latent, args.latent, generator=g, device=device)
    context = torch.randn(n, 77, unet_config()["cross_attention_dim"], generator=g, device=device)
    timestep = torch.tensor(999.0, device=device)
    with torch.inference_mode():
        expected = reference(sample, timestep, context, return_dict=False)[0] if args.level == "unet" else None
    del reference

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    names = [args.baseline, args.child]
    runs: dict[str, Callable[[], torch.Tensor]] = {}
    for name in names:
        library = VARIANTS[name][0]
        unet = build_unet(library, state, device, dtype)
        if args.level == "unet":
            holder = types.SimpleNamespace(unet=unet)
            compile_variant(name, holder)
            runs[name] = lambda h=holder: h.unet(sample.to(dtype), timestep, context.to(dtype), return_dict=False)[0]
        else:
            pipe = pipeline(library, unet, device, dtype)
            compile_variant(name, pipe)
            embeds = context.to(dtype).chunk(2)
            call = dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_inference_steps=args.steps,
                        height=8 * args.latent, width=8 * args.latent, output_type="latent")  # fmt: skip
            runs[name] = lambda p=pipe, c=call: p(**c, generator=torch.Generator(device).manual_seed(0)).images
    del state  # a copy of the weights less (the full UNet: 3.4 GB in fp32)
    first, seconds = {}, {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            first[name] = first_call(name, runs[name], sync)
            print(
                f"{name}: first call {first[name]['first_call_s']:.1f} s, {first[name]['graphs']} graph(s)", flush=True
            )
            runs[name]()  # a CUDA graph is recorded at the second call
        for _ in range(args.rounds):
            for name in names:
                seconds[name].append(
                    timed(runs[name], args.iters, sync) / (args.steps if args.level == "pipeline" else 1)
                )
    reference_out = expected if expected is not None else first[args.baseline]["out"].float()
    rows = {}
    for name in names:
        out = first[name]["out"].float()
        error = ((out - reference_out).abs().max() / reference_out.abs().max()).item()
        rows[name] = {k: v for k, v in first[name].items() if k != "out"}
        rows[name].update(seconds=seconds[name], rel_error=error)
    return rows


def timed(fn: Callable[[], Any], iters: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


# --- the parent: a process per variant, one table ----------------------------------------------------------------------
def child_command(args: argparse.Namespace, name: str) -> list[str]:
    command = [sys.executable, __file__, "--child", name, "--baseline", args.baseline, "--level", args.level]
    for flag in ("latent", "batch", "dtype", "steps", "rounds", "iters", "threads"):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    return command


def run_child(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Variant `name` and the baseline, measured in a fresh process (its last stdout line is the JSON result)."""
    done = subprocess.run(child_command(args, name), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: the measuring process failed:\n{done.stderr[-4000:]}")
    print(done.stdout.rsplit("\n", 2)[0], flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(name: str, result: dict[str, Any], baseline: str) -> dict[str, Any]:
    mine, base = result[name], result[baseline]
    ratios = [b / s for b, s in zip(base["seconds"], mine["seconds"])]
    return dict(
        s_per_step=statistics.median(mine["seconds"]),
        baseline_s_per_step=statistics.median(base["seconds"]),
        speedup=statistics.median(base["seconds"]) / statistics.median(mine["seconds"]),
        spread=(min(ratios), max(ratios)),
        first_call_s=mine["first_call_s"],
        baseline_first_call_s=base["first_call_s"],
        graphs=mine["graphs"],
        rss_growth_mb=mine["rss_growth_mb"],
        baseline_rss_growth_mb=base["rss_growth_mb"],
        rel_error=mine["rel_error"],
        baseline_rel_error=base["rel_error"],
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = {name: row(name, run_child(args, name), args.baseline) for name in args.variants if name != args.baseline}
    what = "UNet call" if args.level == "unet" else f"pipeline step ({args.steps}-step calls)"
    print(
        f"\nSD 1.5 {what}, full UNet, {args.dtype}, UNet batch {2 * args.batch}, latent {args.latent}, "
        f"{args.threads or torch.get_num_threads()} threads, one process per variant, {args.rounds} interleaved "
        f"rounds of {args.iters}; baseline {args.baseline}"
    )
    print(
        f"| variant | s/step | {args.baseline} s/step | speed-up (spread) | first call s | graphs | "
        "memory at first call MiB | rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['s_per_step']:.3f} | {r['baseline_s_per_step']:.3f} | {r['speedup']:.2f}x "
            f"({r['spread'][0]:.2f}-{r['spread'][1]:.2f}) | {r['first_call_s']:.1f} (baseline "
            f"{r['baseline_first_call_s']:.1f}) | {r['graphs']} | {r['rss_growth_mb']:.0f} (baseline "
            f"{r['baseline_rss_growth_mb']:.0f}) | {r['rel_error']:.1e} |"
        )
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, "variants": rows}
    if args.warm:
        results["warm_start"] = warm_start(args)
        print(f"warm start (second process, rapiddiff-default): {results['warm_start']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def warm_start(args: argparse.Namespace) -> dict[str, Any]:
    """rapiddiff-default's first call in a new process with the caches the runs above filled (inherited
    TORCHINDUCTOR_CACHE_DIR), and the FX-graph cache's hits and misses."""
    result = run_child(args, "rapiddiff-default")["rapiddiff-default"]
    return {k: result[k] for k in ("first_call_s", "graphs", "fxgraph_hit", "fxgraph_miss")}


if __name__ == "__main__":
    if "--child" not in sys.argv and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="levers-")  # a cold start unless told
    main()
