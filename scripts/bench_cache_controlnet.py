"""What stopping the ControlNet early saves on DeepCache's shallow steps (eager: the saving does not depend on it).

The `rapiddiff bench` ControlNet workload of a preset (default `cpu`: the SD architectures scaled down, 128x128, fp32;
`gpu`: the real ones), DeepCache interval 3 branch 0, whole calls interleaved over `--rounds`:

    rapiddiff+cache             shallow steps run the ControlNet only up to the residuals they read (the default)
    rapiddiff+cache, whole CN   the same, the ControlNet run whole at every step (as DeepCache does)
    diffusers+deepcache         Diffusers with DeepCache 0.1.1's helper
    rapiddiff uncached

    python scripts/bench_cache_controlnet.py --steps 9 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch

import rapiddiff
from rapiddiff.bench.backends import Backend
from rapiddiff.bench.presets import PRESETS
from rapiddiff.bench.settings import Settings
from rapiddiff.bench.workloads import FIGURES_BY_NAME, build_pipeline
from rapiddiff.pipelines.deep_cache import DeepCacheLoop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=list(PRESETS))
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    figure = FIGURES_BY_NAME["sd_controlnet"]
    settings = Settings.create(PRESETS[args.preset], progress=False)
    pipes = {lib: build_pipeline(figure, Backend(lib), settings) for lib in ("rapiddiff", "diffusers")}
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipes["diffusers"])
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper_on = [False]
    inputs = figure.inputs(settings, 1) | {"num_inference_steps": args.steps, "output_type": "np"}
    ours = pipes["rapiddiff"]
    stop_early = DeepCacheLoop.residuals

    def whole(self: DeepCacheLoop, i: int) -> None:
        return None

    def variant(name: str) -> tuple[Any, Any]:
        """(pipe, set-up) of a variant."""

        def setup() -> None:
            if helper_on[0]:
                helper.disable()
                helper_on[0] = False
            ours.unet.disable_cache()
            DeepCacheLoop.residuals = stop_early
            if name == "rapiddiff+cache":
                ours.unet.enable_cache(rapiddiff.DeepCacheConfig(3, 0))
            elif name == "rapiddiff+cache, whole CN":
                ours.unet.enable_cache(rapiddiff.DeepCacheConfig(3, 0))
                DeepCacheLoop.residuals = whole
            elif name == "diffusers+deepcache":
                helper.enable()
                helper_on[0] = True

        return (pipes["diffusers"] if name == "diffusers+deepcache" else ours), setup

    names = ["rapiddiff+cache", "rapiddiff+cache, whole CN", "diffusers+deepcache", "rapiddiff uncached"]
    times: dict[str, list[float]] = {n: [] for n in names}
    images: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for r in range(args.rounds + 1):  # round 0 warms up
            for name in names if r % 2 else list(reversed(names)):
                pipe, setup = variant(name)
                setup()
                start = time.perf_counter()
                images[name] = pipe(**(inputs | {"generator": torch.Generator().manual_seed(0)})).images
                if r:
                    times[name].append(time.perf_counter() - start)
    variant("rapiddiff uncached")[1]()
    print(f"\nControlNet pipeline ({args.preset} preset, {settings.preset.sd_size}px, fp32), {args.steps} steps, "
          f"DeepCache 3:0, eager, {args.rounds} interleaved rounds, torch {torch.__version__}\n")  # fmt: skip
    print("| variant | s per call (median) | lowest-highest | max abs diff vs diffusers+deepcache |")
    print("|---|---|---|---|")
    for n in names:
        diff = np.abs(images[n] - images["diffusers+deepcache"]).max()
        print(f"| {n} | {statistics.median(times[n]):.3f} | {min(times[n]):.3f}-{max(times[n]):.3f} | {diff:.1e} |")
    ratios = [b / a for a, b in zip(times["rapiddiff+cache"], times["rapiddiff+cache, whole CN"])]
    print(f"\nstopping the ControlNet early: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
