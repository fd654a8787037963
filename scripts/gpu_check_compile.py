"""GPU check of `rapiddiff.compile` (issue 5): one run, under 8 minutes on an H100.

From the repository root on the GPU machine (see shared/gpu/README.md):

    PYTHONPATH=src python scripts/gpu_check_compile.py     # table on stdout, details in $OUT/gpu_check_compile.json
    python scripts/gpu_check_compile.py --smoke              # a CPU dry run of the logic: narrow model, no inductor

SD 1.5 architecture from the package's presets, random fp16 weights, 512x512 (64x64 latents), guidance (UNet batch 2).
  1. UNet alone: eager (SDPA, channels_last) and the recipe (channels_last, reduce-overhead, fullgraph) - steps/s
     and the first call's compile time - for rapiddiff and, when importable, for diffusers in this same process.
  2. txt2img loop it/s ((S_long - S_short) / (T_long - T_short): prompt encoding cancels) with the recipe.
  3. The compiled loop under forbid_host_syncs_in_loop (torch.cuda.set_sync_debug_mode("error")): PNDM, Euler,
     DPM-Solver++; then error_on_recompile across prompt, seed, guidance, steps and a scheduler swap.
  4. whole_step=True: compile time, loop it/s, no host sync, no recompile across calls.
  5. Warm start: a second process compiling the same UNet against the inductor cache this one filled.
  6. dynamic=True: compile time, steps/s at 512x512 and, without recompiling, at 512x768.
Every measurement is saved as soon as it is taken; a failing section is recorded and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# A cache of our own, empty: the first compile below is cold, the warm-start process reads what it leaves.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="rapiddiff-inductor-"))

import torch  # noqa: E402

from rapiddiff.presets import PRESETS_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = PRESETS_DIR / "stable-diffusion-v1-5"  # the package ships the real configs
OUT = Path(os.environ.get("OUT", "."))
PROMPT = "ghibli style, a fantasy landscape with castles"
DIFFUSERS_ANCHOR = "shared/gpu/README.md: SD 1.5 UNet, H100, fp16, batch 1: 137.9 steps/s compiled, 52 s compile"


class Run:
    """Device, sizes and the results file of this run."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.float32 if smoke else torch.float16
        self.latent = 16 if smoke else 64
        self.steps = (2, 4) if smoke else (10, 40)  # (S_short, S_long)
        self.compile = dict(backend="eager") if smoke else {}  # smoke: graph capture only, no code generation
        self.results: dict[str, Any] = {"env": env(), "rows": []}

    def record(self, section: str, **values: Any) -> None:
        row = {"section": section, **values}
        self.results["rows"].append(row)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "gpu_check_compile.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        print(json.dumps(row, default=str), flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def seconds(self, fn: Any, repeats: int) -> float:
        """Median wall time of `fn` after two warm-up calls (synchronised, so CUDA-graph replays are counted)."""
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    def first_call(self, fn: Any) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    @contextlib.contextmanager
    def section(self, name: str):
        try:
            yield
        except Exception as e:  # one failure must not cost the rest of the run
            self.record(name, error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-2000:])
            torch._dynamo.reset()


def env() -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    with contextlib.suppress(ImportError):
        import diffusers

        info["diffusers"] = diffusers.__version__
    return info


# --- models --------------------------------------------------------------------------------------------------------
def config(name: str, smoke: bool) -> dict[str, Any]:
    values = {k: v for k, v in json.loads((CONFIGS / name / "config.json").read_text()).items() if k[0] != "_"}
    if smoke and "block_out_channels" in values:
        sys.path.insert(0, str(Path(__file__).parent))
        from compile_warm_start import narrow

        values = narrow(values)
    return values


def build(run: Run, cls: Any, name: str) -> torch.nn.Module:
    with torch.device(run.device):
        return cls.from_config(config(name, run.smoke)).to(run.dtype).eval().to(memory_format=torch.channels_last)


def unet_step(unet: Any, inputs: tuple[torch.Tensor, ...]) -> Any:
    """One UNet call on (sample, timestep, text embeddings); the same positional arguments in both libraries."""
    return lambda: unet(*inputs, return_dict=False)


def unet_inputs(run: Run, height: int, width: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(run.device).manual_seed(0)
    x = torch.randn(2, 4, height, width, device=run.device, dtype=run.dtype, generator=g)
    text = torch.randn(2, 77, 768, device=run.device, dtype=run.dtype, generator=g)
    return x, torch.tensor(999.0, device=run.device), text


def pipeline(run: Run, unet: torch.nn.Module) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    import rapiddiff

    text_config = config("text_encoder", smoke=False)
    text_config.pop("architectures", None)
    with torch.device(run.device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).to(run.dtype).eval()
    pipe = rapiddiff.StableDiffusionPipeline(
        vae=build(run, rapiddiff.AutoencoderKL, "vae"),
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(CONFIGS / "tokenizer"),
        unet=unet,
        scheduler=rapiddiff.PNDMScheduler.from_pretrained(CONFIGS / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(run: Run, pipe: Any, steps: int, **kwargs: Any) -> Any:
    size = 8 * run.latent
    args = dict(num_inference_steps=steps, height=size, width=size, output_type="latent")
    return pipe(PROMPT, generator=torch.Generator().manual_seed(kwargs.pop("seed", 0)), **args | kwargs)


def loop_its(run: Run, pipe: Any) -> float:
    """Denoising steps per second, prompt encoding cancelled out."""
    short, long = run.steps
    t_short = run.seconds(lambda: generate(run, pipe, short), 3)
    t_long = run.seconds(lambda: generate(run, pipe, long), 3)
    return (long - short) / (t_long - t_short)


# --- sections ----------------------------------------------------------------------------------------------------------
def unet_alone(run: Run, unet: torch.nn.Module) -> None:
    from rapiddiff.compile import compile_pipeline

    step = unet_step(unet, unet_inputs(run, run.latent, run.latent))
    with torch.no_grad():
        run.record("unet", library="rapiddiff", variant="eager sdpa channels_last", steps_s=1 / run.seconds(step, 20))
        compile_pipeline(SimpleNamespace(unet=unet), components=["unet"], **run.compile)
        compile_s = run.first_call(step)
        run.record(
            "unet", library="rapiddiff", variant="recipe", compile_s=compile_s, steps_s=1 / run.seconds(step, 20)
        )


def diffusers_unet(run: Run) -> None:
    try:
        import diffusers
    except ImportError:
        run.record("unet", library="diffusers", skipped=f"diffusers not installed; anchor: {DIFFUSERS_ANCHOR}")
        return
    unet = build(run, diffusers.UNet2DConditionModel, "unet")
    inputs = unet_inputs(run, run.latent, run.latent)
    step = unet_step(unet, inputs)
    with torch.no_grad():
        run.record("unet", library="diffusers", variant="eager sdpa channels_last", steps_s=1 / run.seconds(step, 20))
        torch._dynamo.reset()
        compiled = torch.compile(unet, fullgraph=True, **(run.compile or dict(mode="reduce-overhead")))
        step = unet_step(compiled, inputs)
        compile_s = run.first_call(step)
        run.record(
            "unet", library="diffusers", variant="recipe", compile_s=compile_s, steps_s=1 / run.seconds(step, 20)
        )
    torch._dynamo.reset()


def checked_loop(run: Run, pipe: Any, section: str, schedulers: list[str], recompiles: list[dict[str, Any]]) -> None:
    """The compiled loop with every scheduler under forbid_host_syncs_in_loop, then calls that must not recompile."""
    import rapiddiff
    from rapiddiff.compile import forbid_host_syncs_in_loop

    base = pipe.scheduler
    for name in schedulers:
        pipe.scheduler = getattr(rapiddiff, name).from_config(base.config)
        generate(run, pipe, 6)  # compile (a whole-step graph per scheduler) and record CUDA graphs
        generate(run, pipe, 6)
        # On the CPU the check is a dispatch mode, which compiled frames refuse: the smoke run checks eager steps.
        guarded = contextlib.nullcontext() if run.smoke else forbid_host_syncs_in_loop(pipe)
        with guarded:
            generate(run, pipe, 6, seed=1)
        run.record(section, check="no host sync in the loop", scheduler=name, ok=True)
    pipe.scheduler = base
    generate(run, pipe, 6)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for kwargs in recompiles:
            scheduler = kwargs.pop("scheduler", None)
            if scheduler:
                pipe.scheduler = getattr(rapiddiff, scheduler).from_config(base.config)
            generate(run, pipe, **kwargs)
    pipe.scheduler = base
    run.record(section, check="no recompile", calls=len(recompiles), ok=True)


def warm_start(run: Run, cold_s: float | None) -> None:
    """Second processes compile the same UNet: against this process's inductor cache (warm), and against an empty one
    primed with save_compile_cache's file (portable: the cache carried to another machine)."""
    from rapiddiff.compile import save_compile_cache

    starts = [("warm", os.environ["TORCHINDUCTOR_CACHE_DIR"], "")]
    if not run.smoke:  # the smoke run generates no code: nothing to carry
        saved = save_compile_cache(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "artifacts.bin")
        starts.append(("portable", tempfile.mkdtemp(), str(saved)))
    for kind, cache, artifacts in starts:
        command = [sys.executable, __file__, "--warm-start-worker", artifacts]
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        done = subprocess.run(command + (["--smoke"] if run.smoke else []), capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{kind}: {done.stderr.strip().splitlines()[-1]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        size = Path(artifacts).stat().st_size if artifacts else None
        run.record("warm start", kind=kind, cold_compile_s=cold_s, artifacts_bytes=size, **result)


def warm_start_worker(run: Run, artifacts: str) -> None:
    from torch._dynamo.utils import counters

    import rapiddiff
    from rapiddiff.compile import compile_pipeline, load_compile_cache

    if artifacts:
        load_compile_cache(artifacts)
    unet = build(run, rapiddiff.UNet2DConditionModel, "unet")
    compile_pipeline(SimpleNamespace(unet=unet), components=["unet"], **run.compile)
    with torch.no_grad():
        ready = run.first_call(unet_step(unet, unet_inputs(run, run.latent, run.latent)))
    hits = {k: counters["inductor"][k] for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}
    print(json.dumps({"ready_s": ready, **hits}))


def dynamic_sizes(run: Run, unet: torch.nn.Module, static_steps_s: float | None) -> None:
    from rapiddiff.compile import compile_pipeline

    torch._dynamo.reset()
    compile_pipeline(SimpleNamespace(unet=unet), components=["unet"], dynamic=True, **run.compile)
    rows = {}
    with torch.no_grad():
        for height, width in ((run.latent, run.latent), (run.latent, run.latent * 3 // 2)):
            step = unet_step(unet, unet_inputs(run, height, width))
            patch = torch._dynamo.config.patch(error_on_recompile=bool(rows))  # the second size must not recompile
            with patch:
                first = run.first_call(step)
                rows[f"{8 * height}x{8 * width}"] = dict(first_call_s=first, steps_s=1 / run.seconds(step, 20))
    run.record("dynamic", sizes=rows, static_steps_s=static_steps_s)


# --- main ------------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU dry run: narrow model, backend='eager'")
    parser.add_argument("--budget", type=float, default=480, help="seconds; later sections are skipped past it")
    parser.add_argument("--warm-start-worker", metavar="ARTIFACTS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    run = Run(args.smoke)
    if args.warm_start_worker is not None:
        warm_start_worker(run, args.warm_start_worker)
        return

    import rapiddiff
    from rapiddiff.compile import compile_pipeline

    start = time.perf_counter()
    run.record("env", **run.results["env"], inductor_cache=os.environ["TORCHINDUCTOR_CACHE_DIR"])
    unet = build(run, rapiddiff.UNet2DConditionModel, "unet")
    pipe = pipeline(run, unet)
    schedulers = ["PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"]
    recompiles = [
        dict(steps=8, seed=3, guidance_scale=4.0),
        dict(steps=5, scheduler="EulerDiscreteScheduler", guidance_scale=9.0),  # float32 timesteps
        dict(steps=7, scheduler="DPMSolverMultistepScheduler"),
    ]

    def recipe_value(key: str) -> float | None:
        return next((r.get(key) for r in run.results["rows"] if r.get("variant") == "recipe"), None)

    def recipe_loop() -> None:
        run.record("recipe loop", its=loop_its(run, pipe))
        checked_loop(run, pipe, "recipe loop", schedulers, recompiles)

    def whole_step() -> None:
        torch._dynamo.reset()
        pipe.unet = build(run, rapiddiff.UNet2DConditionModel, "unet")  # uncompiled: the step's graph holds it
        compile_pipeline(pipe, components=["unet"], whole_step=True, **run.compile)
        run.record("whole step", compile_s=run.first_call(lambda: generate(run, pipe, 2)))
        run.record("whole step", its=loop_its(run, pipe))
        # a graph per scheduler class (about a minute each on an H100): two of them
        checked_loop(run, pipe, "whole step", schedulers[:2], [dict(steps=9, seed=5), dict(steps=4, seed=6)])

    # In order of importance, each about a minute or two on an H100 (two compiles for "unet": ours and Diffusers').
    sections = [
        ("unet", lambda: unet_alone(run, unet)),
        ("diffusers", lambda: diffusers_unet(run)),
        ("recipe loop", recipe_loop),
        ("warm start", lambda: warm_start(run, recipe_value("compile_s"))),
        ("dynamic", lambda: dynamic_sizes(run, unet, recipe_value("steps_s"))),
        ("whole step", whole_step),
    ]
    for name, body in sections:
        if time.perf_counter() - start > args.budget - 120:
            run.record(name, skipped=f"out of time ({args.budget:.0f} s budget)")
            continue
        with run.section(name):
            body()
    run.record("done", total_s=time.perf_counter() - start)
    print_table(run.results["rows"])


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| section | what | value |\n|---|---|---|")
    for r in rows:
        what = {k: v for k, v in r.items() if k not in ("section", "trace")}
        print(f"| {r['section']} | {json.dumps(what, default=str)[:200]} |")


if __name__ == "__main__":
    main()
