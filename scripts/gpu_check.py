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
  sdxl      the SDXL base UNet alone at batch 1/4 (128x128 latents: 1024x1024, text_time inputs) as the SD UNet rows,
            then SDXL text-to-image at 1024x1024 in both libraries as the pipeline rows.
  whole     rapiddiff txt2img with whole_step=True.
  cached    SD txt2img whole calls at batch 1/4/16 with DeepCache (interval 3, branch 0): rapiddiff compiled + cache
            (`unet.enable_cache`), Diffusers + DeepCache 0.1.1's helper (eager: the only way it runs; needs the
            DeepCache wheel), and Diffusers with the seed's recipe, uncached; seconds per call, images/s.
  serve     `rapiddiff serve --compile` in this process (its app, batcher and pipeline setup) on SD txt2img at
            --max-batch-size 1/4/16 with as many clients, each sending its next request (n=1) when answered: images/s,
            p50/p95 latency, the mean batch run and the shapes compiled (one per batch size when batches fill).
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
CACHED = ("rapiddiff", "deepcache", "recipe")  # the cached rows: rapiddiff compiled + cache, and the two baselines
SERVE_STEPS = {"real": 20, "dry": 2}
SERVE_ROUNDS = {"real": 4, "dry": 2}  # requests per client, timed after one warm round
SDXL_UNET_BATCHES = {"real": (1, 4), "dry": (1,)}
UNET_MODELS = {"unet": "sd", "sdxlunet": "sdxl"}  # job kind -> bench checkpoint key of the UNet
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
    """In order of importance: the UNet table, the cached rows (DeepCache), the pipelines (rapiddiff first), SDXL,
    the whole step, the server, levers."""
    kind = "dry" if dry else "real"
    batches = UNET_BATCHES[kind]
    libraries = ("diffusers", "rapiddiff")
    unet = [f"unet:{lib}:{b}" for b in batches for lib in libraries]
    pipes = [f"pipeline:{lib}:{fig}" for lib in ("rapiddiff", "diffusers") for fig in FIGURES]
    sdxl = [f"sdxlunet:{lib}:{b}" for b in SDXL_UNET_BATCHES[kind] for lib in libraries]
    sdxl += [f"pipeline:{lib}:sdxl_txt2img" for lib in ("rapiddiff", "diffusers")]
    serve = [f"serve:rapiddiff:{b}" for b in UNET_BATCHES[kind]]
    levers = [f"unet:{name}:1" for name in LEVERS]
    cached = [f"cached:{lib}:{b}" for b in batches for lib in CACHED]
    return unet + cached + pipes + sdxl + ["whole:rapiddiff:sd_txt2img"] + serve + levers


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


def unet_config(run: Run, model: str = "sd") -> dict[str, Any]:
    from rapiddiff.bench.presets import preset_config

    return preset_config(model, "unet", "config.json", run.preset)


def build_unet(run: Run, library: str, dtype: torch.dtype | None = None, model: str = "sd") -> torch.nn.Module:
    """The same weights in both libraries (seeded per state-dict key by bench's random_model)."""
    import diffusers

    import rapiddiff
    from rapiddiff.bench.components import random_model

    config = unet_config(run, model)
    reference = random_model(lambda: diffusers.UNet2DConditionModel.from_config(config), run.device, dtype or run.dtype)
    if library == "diffusers":
        return reference
    with torch.device("meta"):
        model = rapiddiff.UNet2DConditionModel.from_config(config)
    model.load_checkpoint_state(dict(reference.state_dict()), source="diffusers' UNet")
    return model.eval()


def unet_inputs(run: Run, batch: int, dtype: torch.dtype, model: str = "sd") -> tuple[tuple[Any, ...], dict]:
    """(positional inputs, keyword inputs): SDXL's UNet also gets the pooled text and the time ids."""
    g = torch.Generator(run.device).manual_seed(0)
    n = 2 * batch
    config = unet_config(run, model)
    latent = run.latent * (2 if model == "sdxl" else 1)  # SDXL: 1024 px
    sample = torch.randn(n, 4, latent, latent, generator=g, device=run.device).to(dtype)
    text = torch.randn(n, 77, config["cross_attention_dim"], generator=g, device=run.device).to(dtype)
    extra = {}
    if model == "sdxl":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        size = float(8 * latent)
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(n, pooled, generator=g, device=run.device).to(dtype),
            "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * n, device=run.device).to(dtype),
        }
    return (sample, torch.tensor(999.0, device=run.device), text), extra


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


def unet_job(run: Run, library: str, batch: int, measure: bool, unet: str = "sd") -> dict[str, Any]:
    library, precision = split_precision(library)
    dtype, torchao_config = PRECISIONS[precision] if precision else (run.dtype, None)
    model = build_unet(run, library, dtype, model=unet)
    if torchao_config:
        quantize(library, model, torchao_config)
    model = compile_unet(run, library, model)
    inputs, extra = unet_inputs(run, batch, dtype, unet)

    def step() -> torch.Tensor:
        return model(*inputs, return_dict=False, **extra)[0]

    with torch.inference_mode():
        ready_s, out = run.first_call(step)
        result: dict[str, Any] = {"ready_s": ready_s}
        if measure:
            out = out.float().clone()
            reference = build_unet(run, "diffusers", torch.float32, model=unet)
            ref_inputs, ref_extra = unet_inputs(run, batch, torch.float32, unet)
            expected = reference(*ref_inputs, return_dict=False, **ref_extra)[0]
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


def cached_job(run: Run, variant: str, batch: int, measure: bool) -> dict[str, Any]:
    """SD txt2img whole calls at `batch` with DeepCache (interval 3, branch 0), or Diffusers' recipe uncached."""
    import rapiddiff
    from rapiddiff.bench.workloads import FIGURES_BY_NAME

    figure = "sd_txt2img"
    pipe = build_pipeline(run, "rapiddiff" if variant == "rapiddiff" else "diffusers", figure)
    if variant == "rapiddiff":
        pipe.unet.enable_cache(rapiddiff.DeepCacheConfig(cache_interval=3, cache_branch_id=0))
        rapiddiff.compile_pipeline(pipe, **run.backend)
    elif variant == "deepcache":
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=3, cache_branch_id=0)
        helper.enable()
    else:
        for name in FIGURES_BY_NAME[figure].denoisers:
            module = getattr(pipe, name)
            module.to(memory_format=torch.channels_last)
            setattr(pipe, name, torch.compile(module, fullgraph=True, **(run.backend or {"mode": "reduce-overhead"})))
    kwargs = FIGURES_BY_NAME[figure].inputs(run.settings, batch)
    steps = run.steps[1]

    def call() -> Any:
        generator = torch.Generator(run.device).manual_seed(0)
        return pipe(num_inference_steps=steps, **(kwargs | {"generator": generator})).images

    with torch.inference_mode():
        result: dict[str, Any] = {"ready_s": run.first_call(call)[0], "steps": steps}
        if measure:
            result["call_s"] = run.seconds_per_call(call, 2)
            result["images_s"] = batch / result["call_s"]


def serve_job(run: Run, batch: int, measure: bool) -> dict[str, Any]:
    """The server with `--compile --max-batch-size batch` and `batch` closed-loop clients, through FastAPI's
    TestClient (no sockets: the app, the batcher and the pipeline are what is timed)."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from rapiddiff.serve.app import create_app
    from rapiddiff.serve.batcher import ServeSettings
    from rapiddiff.serve.setup import PipelineSetup

    pipe = PipelineSetup("sd_txt2img", compile=True).prepare(build_pipeline(run, "rapiddiff", "sd_txt2img"))
    settings = ServeSettings(max_batch_size=batch, batch_wait_ms=100, max_queue=4 * batch, pad_to_compiled=True)
    size = run.settings.preset.sd_size
    steps, rounds = SERVE_STEPS["dry" if run.dry else "real"], SERVE_ROUNDS["dry" if run.dry else "real"]

    def client(c: int, count: int) -> list[float]:
        latencies = []
        for r in range(count):
            body = {"prompt": f"a photo of an astronaut, {c} {r}", "size": f"{size}x{size}", "seed": 1000 * c + r,
                    "num_inference_steps": steps}  # fmt: skip
            start = time.perf_counter()
            response = http.post("/v1/images/generations", json=body)
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise RuntimeError(f"status {response.status_code}: {response.text[:300]}")
        return latencies

    with TestClient(create_app(pipe, "sd_txt2img", settings)) as http, ThreadPoolExecutor(batch) as pool:
        ready_s, _ = run.first_call(lambda: list(pool.map(client, range(batch), [1] * batch)))  # compiles
        result: dict[str, Any] = {"ready_s": ready_s}
        if measure:
            start = time.perf_counter()
            latencies = sorted(t for ts in pool.map(client, range(batch), [rounds] * batch) for t in ts)
            elapsed = time.perf_counter() - start
            samples = {s.name: s.value for f in text_string_to_metric_families(http.get("/metrics").text)
                       for s in f.samples if not s.labels}  # fmt: skip
            result |= {
                "images_s": len(latencies) / elapsed,
                "p50_s": latencies[len(latencies) // 2],
                "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
                "mean_batch": samples["rapiddiff_batch_size_sum"] / samples["rapiddiff_batch_size_count"],
                "shapes_compiled": samples["rapiddiff_compiled_shapes_total"],
            }
    return result


def _numpy(images: Any) -> Any:
    return images.float().cpu().numpy() if isinstance(images, torch.Tensor) else images


def run_job(run: Run, job: str, measure: bool) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    kind, library, what = job.split(":")
    before = _counts(counters)
    if kind in UNET_MODELS:
        result = unet_job(run, library, int(what), measure, UNET_MODELS[kind])
    elif kind == "cached":
        result = cached_job(run, library, int(what), measure)
    elif kind == "serve":
        result = serve_job(run, int(what), measure)
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
    print("\n| job | steps/s, it/s or images/s | error | compile s (worker) | ready s | cudagraph skips | recompiles |")
    print("|---|---|---|---|---|---|---|")
    for job, r in measured.items():
        rate = r.get("steps_s", r.get("its", r.get("images_s")))
        err = r.get("rel_error_vs_fp32", r.get("max_abs_diff_vs_eager"))
        cells = [rate, err, compiled.get(job, {}).get("ready_s"), r.get("ready_s")]
        text = [f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells]
        note = r.get("error") or r.get("skipped") or ""
        print(f"| {job} | {' | '.join(text)} | {r.get('cudagraph_skips')} | {r.get('recompiles')} | {note}")
    unet = {j: r.get("steps_s") for j, r in measured.items() if j.split(":")[0] in UNET_MODELS}
    for kind, label in (("unet", "UNet"), ("sdxlunet", "SDXL UNet")):
        for batch in sorted({j.split(":")[2] for j in unet if j.startswith(kind + ":")}, key=int):
            ours, theirs = unet.get(f"{kind}:rapiddiff:{batch}"), unet.get(f"{kind}:diffusers:{batch}")
            if ours and theirs:
                print(f"{label} batch {batch}: rapiddiff / Diffusers-with-recipe = {ours / theirs:.2f}x")
            for p in PRECISIONS:
                ours_p, theirs_p = unet.get(f"{kind}:rapiddiff-{p}:{batch}"), unet.get(f"{kind}:diffusers-{p}:{batch}")
                if ours_p and theirs_p and theirs:
                    print(f"{label} batch {batch}, {p}: rapiddiff / Diffusers-{p} = {ours_p / theirs_p:.2f}x; "
                          f"rapiddiff-{p} / Diffusers-fp16 = {ours_p / theirs:.2f}x")  # fmt: skip
    cached = {j: r.get("call_s") for j, r in measured.items() if j.startswith("cached:")}
    for batch in sorted({j.split(":")[2] for j in cached}, key=int):
        ours = cached.get(f"cached:rapiddiff:{batch}")
        for other in ("deepcache", "recipe"):
            theirs = cached.get(f"cached:{other}:{batch}")
            if ours and theirs:
                print(f"txt2img batch {batch}: rapiddiff compiled + DeepCache vs {other}: {theirs / ours:.2f}x")
    serve = {j: r for j, r in measured.items() if j.startswith("serve:") and "images_s" in r}
    for job, r in serve.items():
        print(f"{job}: {r['images_s']:.3g} images/s, p50 {r['p50_s']:.3g} s, p95 {r['p95_s']:.3g} s, mean batch "
              f"{r['mean_batch']:.3g}, shapes compiled {r['shapes_compiled']:g}")  # fmt: skip
    theirs = unet.get("unet:diffusers:1")
    for name in LEVERS:
        ours = unet.get(f"unet:{name}:1")
        if ours and theirs:
            print(f"UNet batch 1, {name}: / Diffusers-with-recipe = {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
