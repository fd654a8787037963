"""The GPU check (issue 10): rapiddiff's compile_pipeline default vs Diffusers with the seed's recipe, one run.

On the GPU machine, from the repository root (Diffusers from wheels, see shared/gpu/README.md):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=src:/tmp/site python scripts/gpu_check.py          # table last; everything in $OUT/gpu_check.json
    python scripts/gpu_check.py --dry-run                          # the same logic on the CPU: tiny configs, nothing
                                                                   # compiled (torch.compile returns its input)

What it measures (real architectures from rapiddiff.presets, random fp16 weights, the same in both libraries):
  unet      SD 1.5 UNet alone at batch 1/4/16 (UNet batch 2/8/32, guidance), 64x64 latents: Diffusers with the seed's
            recipe (channels_last, compile reduce-overhead, fullgraph) vs rapiddiff's `compile_pipeline` default; steps/s
            from CUDA events around back-to-back calls; each output against an fp32 eager Diffusers reference.
  pipeline  it/s of five pipelines at batch 1, both libraries compiled ((S_long - S_short) / (T_long - T_short): text
            encoding and decoding cancel): SD txt2img, img2img, inpainting, ControlNet (the compiled ControlNet ->
            UNet handoff), IF stage I; each compiled image against the same pipeline's eager image.
  whole     rapiddiff txt2img with whole_step=True.
  levers    the UNet at batch 1 with each candidate lever on top of rapiddiff's default (docs/compile.md section 9):
            inductor freezing, fused Q/K/V, max-autotune, cudnn.benchmark (last: it is a process-wide switch).
  precision `--precision`: the UNet table in fp16, bf16, int8 dynamic and float8 dynamic (torchao; float8 needs
            compute capability >= 8.9), both libraries, batch 1/4/16 (docs/precision.md).
Every job records inductor's cudagraph_skips, FX-graph cache hits/misses and dynamo's recompiles.

Time: compiling is what costs (about 50 s per UNet graph on an H100). Phase 1 compiles every job in parallel worker
processes (`--workers`), which fill one inductor cache; phase 2 then runs the jobs one at a time in this process,
where compiling is a cache hit, and times them with nothing else on the GPU. Jobs go in order of importance and are
skipped, recorded as such, past `--budget` seconds (default 520: the whole run stays under 9 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="rapiddiff-gpu-check-"))

import torch  # noqa: E402

OUT = Path(os.environ.get("OUT", "."))
FIGURES = ("sd_txt2img", "sd_img2img", "sd_inpaint", "sd_controlnet", "if_stage_1")
UNET_BATCHES = {"real": (1, 4, 16), "dry": (1, 2)}
# Candidate levers on top of compile_pipeline's default, measured on the UNet at batch 1: compile_pipeline keyword
# arguments, plus fuse_qkv (before compiling) and cudnn_benchmark (process-wide, so it runs last).
LEVERS: dict[str, dict[str, Any]] = {
    "rapiddiff-freezing": {"compile": {"freezing": True}},
    "rapiddiff-fusedqkv": {"fuse_qkv": True},
    "rapiddiff-autotune": {"compile": {"mode": "max-autotune"}},
    "rapiddiff-cudnn": {"cudnn_benchmark": True},
}


class Run:
    def __init__(self, dry: bool):
        from rapiddiff.bench.presets import PRESETS
        from rapiddiff.bench.settings import Settings

        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.dtype = torch.float32 if dry else torch.float16
        self.preset = PRESETS["tiny" if dry else "gpu"]
        self.settings = Settings.create(self.preset, device=self.device, dtype=self.preset.dtype, progress=False)
        self.latent = 8 if dry else 64
        self.steps = (2, 4) if dry else (10, 40)
        self.iters = 3 if dry else 30
        # the dry run checks the script's logic, not compilers: torch.compile returns the function as it is, so
        # nothing is traced and the models run eagerly
        self.backend = {"backend": "eager"} if dry else {}
        if dry:
            torch.compile = lambda fn, **kwargs: fn

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def seconds_per_call(self, fn: Any, iters: int) -> float:
        """Back-to-back calls after two warm-ups; CUDA events on the GPU, wall time on the CPU."""
        for _ in range(2):
            fn()
        if self.device.type != "cuda":
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - start) / iters
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000 / iters

    def first_call(self, fn: Any) -> tuple[float, Any]:
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out


# --- jobs ------------------------------------------------------------------------------------------------------------
def jobs(dry: bool) -> list[str]:
    """In order of importance: the UNet table, the pipelines (rapiddiff first), the whole step."""
    unet = [f"unet:{lib}:{b}" for b in UNET_BATCHES["dry" if dry else "real"] for lib in ("diffusers", "rapiddiff")]
    pipes = [f"pipeline:{lib}:{fig}" for lib in ("rapiddiff", "diffusers") for fig in FIGURES]
    levers = [f"unet:{name}:1" for name in LEVERS]
    return unet + pipes + ["whole:rapiddiff:sd_txt2img"] + levers


def precision_jobs(dry: bool) -> list[str]:
    """`--precision`: the UNet at batch 1/4/16 in fp16 (the plain unet rows), bf16, int8 dynamic and float8 dynamic
    (torchao, on a bf16 model as Diffusers' TorchAoConfig loads it), both libraries."""
    batches = UNET_BATCHES["dry" if dry else "real"]
    kinds = [p for p in PRECISIONS if not (dry and PRECISIONS[p][1] == "Float8DynamicActivationFloat8WeightConfig")]
    plain = [f"unet:{lib}:{b}" for b in batches for lib in ("diffusers", "rapiddiff")]
    return plain + [f"unet:{lib}-{p}:{b}" for p in kinds for b in batches for lib in ("diffusers", "rapiddiff")]


# precision -> (the model's dtype, the torchao config class applied to every nn.Linear; None: none)
PRECISIONS: dict[str, tuple[torch.dtype, str | None]] = {
    "bf16": (torch.bfloat16, None),
    "int8dyn": (torch.bfloat16, "Int8DynamicActivationInt8WeightConfig"),
    "fp8dyn": (torch.bfloat16, "Float8DynamicActivationFloat8WeightConfig"),  # compute capability >= 8.9
}


def split_precision(library: str) -> tuple[str, str | None]:
    """ "rapiddiff-int8dyn" -> ("rapiddiff", "int8dyn"); "rapiddiff" -> ("rapiddiff", None); levers stay whole."""
    base, _, precision = library.partition("-")
    return (base, precision) if precision in PRECISIONS else (library, None)


def quantize(library: str, model: torch.nn.Module, config_name: str) -> None:
    """Diffusers' TorchAoConfig transform (quantize_ on each nn.Linear); rapiddiff's through its TorchAoConfig."""
    import torchao.quantization as ao

    import rapiddiff
    from rapiddiff.quantization.torchao_quant import quantize_model

    config = getattr(ao, config_name)()
    if library == "rapiddiff":
        quantize_model(model, rapiddiff.TorchAoConfig(config))
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            ao.quantize_(module, config)


def unet_config(run: Run) -> dict[str, Any]:
    from rapiddiff.bench.presets import preset_config

    return preset_config("sd", "unet", "config.json", run.preset)


def build_unet(run: Run, library: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The same weights in both libraries (seeded per state-dict key by bench's random_model)."""
    import diffusers

    import rapiddiff
    from rapiddiff.bench.components import random_model

    config = unet_config(run)
    reference = random_model(lambda: diffusers.UNet2DConditionModel.from_config(config), run.device, dtype or run.dtype)
    if library == "diffusers":
        return reference
    with torch.device("meta"):
        model = rapiddiff.UNet2DConditionModel.from_config(config)
    model.load_checkpoint_state(dict(reference.state_dict()), source="diffusers' UNet")
    return model.eval()


def unet_inputs(run: Run, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(run.device).manual_seed(0)
    n = 2 * batch
    sample = torch.randn(n, 4, run.latent, run.latent, generator=g, device=run.device).to(dtype)
    text = torch.randn(n, 77, unet_config(run)["cross_attention_dim"], generator=g, device=run.device).to(dtype)
    return sample, torch.tensor(999.0, device=run.device), text


def compile_unet(run: Run, library: str, model: torch.nn.Module) -> Any:
    from rapiddiff.compile import compile_pipeline

    if library == "diffusers":  # the seed's recipe
        model.to(memory_format=torch.channels_last)
        return torch.compile(model, fullgraph=True, **(run.backend or {"mode": "reduce-overhead"}))
    lever = LEVERS.get(library, {})
    if lever.get("fuse_qkv"):
        model.fuse_qkv_projections()
    if lever.get("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
    options = {} if run.dry else lever.get("compile", {})  # the dry run compiles nothing: inductor options do not apply
    compile_pipeline(SimpleNamespace(unet=model), components=["unet"], **run.backend, **options)
    return model


def unet_job(run: Run, library: str, batch: int, measure: bool) -> dict[str, Any]:
    library, precision = split_precision(library)
    dtype, torchao_config = PRECISIONS[precision] if precision else (run.dtype, None)
    model = build_unet(run, library, dtype)
    if torchao_config:
        quantize(library, model, torchao_config)
    model = compile_unet(run, library, model)
    inputs = unet_inputs(run, batch, dtype)

    def step() -> torch.Tensor:
        return model(*inputs, return_dict=False)[0]

    with torch.inference_mode():
        ready_s, out = run.first_call(step)
        result: dict[str, Any] = {"ready_s": ready_s}
        if measure:
            out = out.float().clone()
            reference = build_unet(run, "diffusers", torch.float32)
            expected = reference(*unet_inputs(run, batch, torch.float32), return_dict=False)[0]
            del reference
            result["rel_error_vs_fp32"] = ((out - expected).abs().max() / expected.abs().max()).item()
            result["steps_s"] = 1 / run.seconds_per_call(step, run.iters)
    return result


def build_pipeline(run: Run, library: str, figure: str) -> Any:
    from rapiddiff.bench.backends import Backend
    from rapiddiff.bench.workloads import FIGURES_BY_NAME
    from rapiddiff.bench.workloads import build_pipeline as bench_pipeline

    return bench_pipeline(FIGURES_BY_NAME[figure], Backend(library), run.settings)


def generate(run: Run, pipe: Any, figure: str, steps: int) -> Any:
    from rapiddiff.bench.workloads import FIGURES_BY_NAME

    kwargs = FIGURES_BY_NAME[figure].inputs(run.settings, 1)
    kwargs["generator"] = torch.Generator(run.device).manual_seed(0)
    kwargs.setdefault("output_type", "np")
    return pipe(num_inference_steps=steps, **kwargs).images


def pipeline_job(run: Run, library: str, figure: str, measure: bool, whole_step: bool = False) -> dict[str, Any]:
    from rapiddiff.bench.workloads import FIGURES_BY_NAME
    from rapiddiff.compile import compile_pipeline

    pipe = build_pipeline(run, library, figure)
    short, long = run.steps
    result: dict[str, Any] = {}
    with torch.inference_mode():
        eager = generate(run, pipe, figure, short) if measure else None
        if library == "rapiddiff":
            compile_pipeline(pipe, whole_step=whole_step, **run.backend)
        else:
            for name in FIGURES_BY_NAME[figure].denoisers:
                module = getattr(pipe, name)
                setattr(
                    pipe, name, torch.compile(module, fullgraph=True, **(run.backend or {"mode": "reduce-overhead"}))
                )
        result["ready_s"], images = run.first_call(lambda: generate(run, pipe, figure, short))
        if measure:
            result["max_abs_diff_vs_eager"] = float(abs(_numpy(images) - _numpy(eager)).max())
            t_short = run.first_call(lambda: generate(run, pipe, figure, short))[0]
            t_long = run.first_call(lambda: generate(run, pipe, figure, long))[0]
            result["its"] = (long - short) / (t_long - t_short)
    return result


def _numpy(images: Any) -> Any:
    return images.float().cpu().numpy() if isinstance(images, torch.Tensor) else images


def run_job(run: Run, job: str, measure: bool) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    kind, library, what = job.split(":")
    before = _counts(counters)
    if kind == "unet":
        result = unet_job(run, library, int(what), measure)
    else:
        result = pipeline_job(run, library, what, measure, whole_step=kind == "whole")
    after = _counts(counters)
    return result | {k: after[k] - before.get(k, 0) for k in after}


def _counts(counters: Any) -> dict[str, int]:
    return {
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "recompiles": sum(counters["recompiles"].values()),
        "graphs": counters["stats"]["unique_graphs"],
    }


# --- phases ----------------------------------------------------------------------------------------------------------
def compile_in_workers(run: Run, names: list[str], workers: int, record: Any) -> None:
    """Phase 1: every job compiled (and run once) in its own process, `workers` at a time; they share the cache."""

    def one(job: str) -> None:
        command = [sys.executable, __file__, "--compile-job", job] + ["--dry-run"] * run.dry
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        row: dict[str, Any] = {"phase": "compile", "job": job, "process_s": time.perf_counter() - start}
        if done.returncode == 0:
            row |= json.loads(done.stdout.strip().splitlines()[-1])
        else:
            row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1][:500]
        record(row)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny configs, graphs run eagerly")
    parser.add_argument("--workers", type=int, default=6, help="parallel compile processes (phase 1)")
    parser.add_argument("--budget", type=float, default=520, help="seconds; later jobs are skipped past it")
    parser.add_argument("--jobs", nargs="+", help="run only these (names as in the JSON)")
    parser.add_argument("--precision", action="store_true", help="the precision table only (see precision_jobs)")
    parser.add_argument("--compile-job", help=argparse.SUPPRESS)  # a phase-1 worker
    args = parser.parse_args()
    run = Run(args.dry_run)
    if args.compile_job:
        print(json.dumps(run_job(run, args.compile_job, measure=False)))
        return
    start = time.perf_counter()
    results: dict[str, Any] = {"env": env(run), "rows": []}

    def record(row: dict[str, Any]) -> None:
        results["rows"].append(row)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(json.dumps(row, default=str), flush=True)

    names = args.jobs or (precision_jobs if args.precision else jobs)(args.dry_run)
    compile_in_workers(run, names, args.workers, record)
    for job in names:
        if time.perf_counter() - start > args.budget:
            record({"phase": "measure", "job": job, "skipped": f"out of time ({args.budget:.0f} s budget)"})
            continue
        try:
            record({"phase": "measure", "job": job, **run_job(run, job, measure=True)})
        except Exception as e:  # one failure must not cost the rest of the run
            record({"phase": "measure", "job": job, "error": f"{type(e).__name__}: {e}"[:500],
                    "trace": traceback.format_exc()[-2000:]})  # fmt: skip
        torch._dynamo.reset()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    record({"phase": "done", "total_s": time.perf_counter() - start})
    print_table(results["rows"])


def env(run: Run) -> dict[str, Any]:
    import diffusers

    import rapiddiff

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "rapiddiff": rapiddiff.__version__}
    info |= {"date": time.strftime("%Y-%m-%d"), "dry_run": run.dry, "cache": os.environ["TORCHINDUCTOR_CACHE_DIR"]}
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    return info


def print_table(rows: list[dict[str, Any]]) -> None:
    measured = {r["job"]: r for r in rows if r.get("phase") == "measure"}
    compiled = {r["job"]: r for r in rows if r.get("phase") == "compile"}
    print("\n| job | steps/s or it/s | error | compile s (worker) | ready s | cudagraph skips | recompiles |")
    print("|---|---|---|---|---|---|---|")
    for job, r in measured.items():
        rate = r.get("steps_s", r.get("its"))
        err = r.get("rel_error_vs_fp32", r.get("max_abs_diff_vs_eager"))
        cells = [rate, err, compiled.get(job, {}).get("ready_s"), r.get("ready_s")]
        text = [f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells]
        note = r.get("error") or r.get("skipped") or ""
        print(f"| {job} | {' | '.join(text)} | {r.get('cudagraph_skips')} | {r.get('recompiles')} | {note}")
    unet = {j: r.get("steps_s") for j, r in measured.items() if j.startswith("unet:")}
    for batch in sorted({j.split(":")[2] for j in unet}, key=int):
        ours, theirs = unet.get(f"unet:rapiddiff:{batch}"), unet.get(f"unet:diffusers:{batch}")
        if ours and theirs:
            print(f"UNet batch {batch}: rapiddiff / Diffusers-with-recipe = {ours / theirs:.2f}x")
        for p in PRECISIONS:
            ours_p, theirs_p = unet.get(f"unet:rapiddiff-{p}:{batch}"), unet.get(f"unet:diffusers-{p}:{batch}")
            if ours_p and theirs_p and theirs:
                print(f"UNet batch {batch}, {p}: rapiddiff / Diffusers-{p} = {ours_p / theirs_p:.2f}x; "
                      f"rapiddiff-{p} / Diffusers-fp16 = {ours_p / theirs:.2f}x")  # fmt: skip
    theirs = unet.get("unet:diffusers:1")
    for name in LEVERS:
        ours = unet.get(f"unet:{name}:1")
        if ours and theirs:
            print(f"UNet batch 1, {name}: / Diffusers-with-recipe = {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
