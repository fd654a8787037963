"""Cold vs warm torch.compile start per model, each start in a fresh process (CPU); and dynamic vs static shapes.

    python scripts/compile_warm_start.py                       # every model, every mode; table + compile_warm_start.json
    python scripts/compile_warm_start.py --models sd-unet --modes cold warm

Models are built from their real configs (the package's presets, rapiddiff/presets) with every width divided down to a
32-channel first level ("narrow"): the same module tree, so the same graph and the same number of kernels to generate,
at a fraction of the compute. `--models sd-unet-full` runs the SD 1.5 UNet at its real widths (not in the default run:
its calls take seconds each on a CPU). Each compiles with fullgraph=True on inductor (mode "default": no CUDA graphs on a CPU).
Modes, each a new process:

  cold      empty cache directory (TORCHINDUCTOR_CACHE_DIR): every kernel is generated and built;
  warm      the directory cold filled: inductor's FX-graph cache and AOTAutograd's cache answer;
  portable  another empty directory, primed with rapiddiff.compile.load_compile_cache() from the file cold wrote with
            save_compile_cache() - the cache carried to another machine;
  regional  empty directory, each repeated block (ResnetBlock2D, Transformer2DModel, a block's own Attention) compiled
            on its own instead of the whole model (graphs of equal shapes are shared);
  dynamic   warm directory; steady-state seconds per call at two sizes, compiled with static and with dynamic shapes.

Reported: the first call (compile + one run) minus a later call (one run) = time to ready, and the cache hit counters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rapiddiff.presets import PRESETS_DIR as CONFIGS  # (the package ships the real configs)

MODELS = {  # name -> (config folder, latent/sample size of the real pipeline, second size for "dynamic")
    "sd-unet": ("stable-diffusion-v1-5/unet", 64, (48, 80)),
    "controlnet": ("sd-controlnet-canny", 64, (48, 80)),
    "vae-decoder": ("stable-diffusion-v1-5/vae", 32, (24, 40)),
    "if-i-unet": ("IF-I-M-v1.0/unet", 64, (48, 80)),
    "x4-unet": ("stable-diffusion-x4-upscaler/unet", 64, (48, 80)),
    "sd-unet-full": ("stable-diffusion-v1-5/unet", 64, (48, 80)),  # the real widths: not in the default run
}
FULL = ("sd-unet-full",)
MODES = ("cold", "warm", "portable", "regional", "dynamic")


# --- models --------------------------------------------------------------------------------------------------------
def narrow(config: dict[str, Any]) -> dict[str, Any]:
    """The config with block widths scaled so the first is 32 (multiples of 32, the GroupNorm group count)."""
    widths = config["block_out_channels"]
    ratio = widths[0] / 32
    config = dict(config, block_out_channels=[max(32, round(w / ratio / 32) * 32) for w in widths])
    if config.get("encoder_hid_dim"):  # IF: attention_head_dim is the width of a head
        config["attention_head_dim"] = 32
    return config


def build(name: str) -> tuple[torch.nn.Module, Any]:
    """(module to compile, function running it once on random inputs of the real pipeline's size)."""
    import rapiddiff

    folder, size, _ = MODELS[name]
    config = json.loads((CONFIGS / folder / "config.json").read_text())
    config = config if name in FULL else narrow(config)
    torch.manual_seed(0)
    if name == "vae-decoder":
        vae = rapiddiff.AutoencoderKL(**config).eval()
        return vae.decoder, lambda module, h, w: module(torch.randn(1, 4, h, w))
    if name == "controlnet":
        model = rapiddiff.ControlNetModel(**config).eval()
        return model, lambda module, h, w: module(
            torch.randn(2, 4, h, w), torch.tensor(500.0), torch.randn(2, 77, 768), torch.randn(2, 3, 8 * h, 8 * w)
        )
    model = rapiddiff.UNet2DConditionModel(**config).eval()
    text = torch.randn(2, 77, config.get("encoder_hid_dim") or config["cross_attention_dim"])
    channels = config["in_channels"]
    labels = {"class_labels": torch.tensor([20, 20])} if config.get("num_class_embeds") else {}
    return model, lambda module, h, w: module(torch.randn(2, channels, h, w), torch.tensor(500.0), text, **labels)


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    from rapiddiff.models.attention_processor import Attention
    from rapiddiff.models.resnet import ResnetBlock2D
    from rapiddiff.models.transformer_2d import Transformer2DModel

    blocks = [m for m in model.modules() if isinstance(m, (ResnetBlock2D, Transformer2DModel))]
    inside = {id(m) for b in blocks if isinstance(b, Transformer2DModel) for m in b.modules()}
    return blocks + [m for m in model.modules() if isinstance(m, Attention) and id(m) not in inside]


# --- one process: one measurement ----------------------------------------------------------------------------------
def seconds(fn: Any) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


def counters() -> dict[str, int]:
    from torch._dynamo.utils import counters as c

    return {
        "fxgraph_hit": c["inductor"]["fxgraph_cache_hit"],
        "fxgraph_miss": c["inductor"]["fxgraph_cache_miss"],
        "aot_hit": c["aot_autograd"]["autograd_cache_hit"],
        "aot_miss": c["aot_autograd"]["autograd_cache_miss"],
    }


def worker(name: str, mode: str, artifacts: Path) -> dict[str, Any]:
    from rapiddiff.compile import load_compile_cache, save_compile_cache

    module, run = build(name)
    size = MODELS[name][1]
    if mode == "dynamic":
        return dynamic_speed(name, module, run)
    if mode == "portable":
        load_compile_cache(artifacts)
    if mode == "regional":
        torch._dynamo.config.recompile_limit = 1000  # one code object, a graph per distinct block shape
        blocks = repeated_blocks(module)
        for block in blocks:
            block.compile(fullgraph=True)
    else:
        module.compile(fullgraph=True)
    first = seconds(lambda: run(module, size, size))
    later = min(seconds(lambda: run(module, size, size)) for _ in range(2))
    result = {"model": name, "mode": mode, "ready_s": first - later, "run_s": later, **counters()}
    if mode == "regional":
        result["blocks"] = len(blocks)
    if mode == "cold":
        result["artifacts_bytes"] = save_compile_cache(artifacts).stat().st_size
    return result


def dynamic_speed(name: str, module: torch.nn.Module, run: Any) -> dict[str, Any]:
    """Seconds per call, eager and compiled with static / dynamic shapes, at the real size and a second one."""
    from rapiddiff.compile import without_duck_shapes

    sizes = [(MODELS[name][1],) * 2, MODELS[name][2]]
    result: dict[str, Any] = {"model": name, "mode": "dynamic", "sizes": sizes}

    def steady(target: torch.nn.Module, h: int, w: int) -> float:
        seconds(lambda: run(target, h, w))  # compile or warm up
        return min(seconds(lambda: run(target, h, w)) for _ in range(3))

    result["eager_s"] = [steady(module, h, w) for h, w in sizes]
    for dynamic in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(module, fullgraph=True, dynamic=dynamic)
        if dynamic:
            compiled = without_duck_shapes(compiled)
        key = "dynamic" if dynamic else "static"
        start = time.perf_counter()
        result[f"{key}_s"] = [steady(compiled, h, w) for h, w in sizes]
        result[f"{key}_compile_and_measure_s"] = time.perf_counter() - start
    return result


# --- the driver ------------------------------------------------------------------------------------------------------
def spawn(name: str, mode: str, cache: Path, artifacts: Path) -> dict[str, Any]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache))
    command = [sys.executable, __file__, "--worker", name, mode, str(artifacts)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        errors = [line for line in lines if "Error" in line]
        return {"model": name, "mode": mode, "error": (errors or lines)[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(models: list[str], modes: list[str], root: Path) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        warm_dir, artifacts = root / name / "warm", root / name / "artifacts.bin"
        for mode in modes:
            cache = warm_dir if mode in ("cold", "warm", "dynamic") else root / name / mode
            row = spawn(name, mode, cache, artifacts)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | mode | ready (s) | one call (s) | FX-graph cache hit/miss | AOT cache hit/miss |",
        "|---" * 6 + "|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | error: {r['error']} | | | |")
        elif r["mode"] == "dynamic":
            sizes = " / ".join(f"{h}x{w}" for h, w in r["sizes"])
            per = " / ".join(
                f"eager {e:.3f}, static {s:.3f}, dynamic {d:.3f}"
                for e, s, d in zip(r["eager_s"], r["static_s"], r["dynamic_s"])
            )
            lines.append(f"| {r['model']} | dynamic ({sizes}) | {per} | | | |")
        else:
            lines.append(
                f"| {r['model']} | {r['mode']} | {r['ready_s']:.1f} | {r['run_s']:.3f} | "
                f"{r['fxgraph_hit']}/{r['fxgraph_miss']} | {r['aot_hit']}/{r['aot_miss']} |"
            )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], Path(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=[m for m in MODELS if m not in FULL])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=Path("compile_warm_start.json"))
    args = parser.parse_args()
    if {"warm", "portable"} & set(args.modes) and "cold" not in args.modes:
        parser.error("warm and portable read what cold writes: include cold")
    with tempfile.TemporaryDirectory(prefix="rapiddiff-compile-") as root:
        rows = measure(args.models, args.modes, Path(root))
    env = {"torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
