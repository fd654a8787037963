"""CUDA-graph handoffs, simulated on the CPU.

With `mode="reduce-overhead"` a compiled module's outputs live in memory its CUDA graphs own: the next replay of a
graph may overwrite them (pytorch issue 160281: g(f(x)) with two cudagraphed modules). Whatever the loop keeps from
one compiled call past the next one (ControlNet residuals going into the UNet, scheduler history, latents) must be a
copy the loop owns. The simulation replaces torch.compile by a wrapper that runs the function eagerly but first
overwrites with NaN every tensor returned by any earlier call of any function "compiled" so (except outputs sharing
memory with their call's inputs or the module's weights, which a CUDA graph does not own); every pipeline family, with
compile_pipeline's model-only and whole-step modes, must still give the eager images. No graph is traced: it runs at
eager speed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from test_compile import CALLS, call, make_pipeline

from rapiddiff.compile import compile_pipeline


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from tensors_in(getattr(obj, field.name))
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()


class PoisoningCompile:
    """Stands in for torch.compile: `fn` runs eagerly, each call first poisoning all earlier outputs."""

    def __init__(self) -> None:
        self.returned: list[torch.Tensor] = []
        self.calls = 0

    def __call__(self, fn: Callable[..., Any], **compile_kwargs: Any) -> Callable[..., Any]:
        owner = getattr(fn, "__self__", None)  # nn.Module.compile() compiles the bound `module._call_impl`

        def run(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            with torch.no_grad():
                for t in self.returned:
                    t.fill_(float("nan"))
            # outputs that share memory with the inputs or the weights are not the graph's own
            kept = {t.untyped_storage().data_ptr() for t in tensors_in([args, kwargs, owner])}
            out = fn(*args, **kwargs)
            self.returned += [
                t for t in tensors_in(out) if t.is_floating_point() and t.untyped_storage().data_ptr() not in kept
            ]
            return out

        return run


@pytest.mark.parametrize("whole_step", [False, True], ids=["model-only", "whole-step"])
@pytest.mark.parametrize("family", list(CALLS))
def test_compiled_outputs_may_be_overwritten_by_the_next_graph(
    family, whole_step, tiny_sd_dir, tiny_upscaler_dir, monkeypatch
):
    if whole_step and family == "controlnet":
        pytest.skip("compile_pipeline refuses whole_step for ControlNet pipelines")
    pipe = make_pipeline(family, tiny_sd_dir, tiny_upscaler_dir)
    # the first call of the family, and its last (another scheduler) without guidance: the model's output then goes
    # to the scheduler as is
    specs = [CALLS[family][0], dict(CALLS[family][-1], guidance_scale=1.0)]
    scheduler = pipe.scheduler
    expected = [call(pipe, family, spec) for spec in specs]
    pipe.scheduler = scheduler
    poisoning = PoisoningCompile()
    monkeypatch.setattr(torch, "compile", poisoning)
    compile_pipeline(pipe, backend="eager", whole_step=whole_step)
    for spec, want in zip(specs, expected):
        got = call(pipe, family, spec)
        assert np.isfinite(got).all(), f"{family}: a compiled output was read after the next graph ran"
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert poisoning.calls >= 4 and poisoning.returned  # the models did run through the stand-in


@pytest.mark.parametrize("whole_step", [False, True], ids=["model-only", "whole-step"])
@pytest.mark.parametrize("family", ["txt2img", "controlnet"])
def test_deep_cache_owns_its_feature(family, whole_step, tiny_sd_dir, tiny_upscaler_dir, monkeypatch):
    """DeepCache: the feature a full step leaves is read by the shallow steps after it, while other graphs ran."""
    from rapiddiff import DeepCacheConfig

    if whole_step and family == "controlnet":
        pytest.skip("compile_pipeline refuses whole_step for ControlNet pipelines")
    pipe = make_pipeline(family, tiny_sd_dir, tiny_upscaler_dir)
    pipe.unet.enable_cache(DeepCacheConfig(cache_interval=3, cache_branch_id=1))
    spec = dict(CALLS[family][0], num_inference_steps=7)
    expected = call(pipe, family, spec)
    poisoning = PoisoningCompile()
    monkeypatch.setattr(torch, "compile", poisoning)
    compile_pipeline(pipe, backend="eager", whole_step=whole_step)
    got = call(pipe, family, spec)
    assert np.isfinite(got).all(), f"{family}: the cached feature was read after the next graph ran"
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert poisoning.calls >= 7
