"""One pipeline, many threads: each call's state is its own (`pipelines/call_state.py`), each call steps its own copy
of the scheduler, and what a call sets on the shared models is undone when it ends."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import rapiddiff

# (steps, guidance scale, seed) of 8 calls: two per thread, every one different
CALLS = [(2, 7.5, 0), (3, 1.0, 1), (4, 3.0, 2), (2, 5.0, 3), (3, 7.5, 4), (4, 1.0, 5), (5, 2.0, 6), (2, 0.0, 7)]


def call(pipe, steps: int, guidance: float, seed: int, seen: list | None = None) -> np.ndarray:
    def check_state(p, i, t, kwargs):  # Diffusers' properties read this thread's call
        if seen is not None:
            seen.append(
                (p.guidance_scale, p.num_timesteps, p.do_classifier_free_guidance) == (guidance, n, guidance > 1)
            )
        return {}

    n = steps * pipe.scheduler.order + (1 if isinstance(pipe.scheduler, rapiddiff.PNDMScheduler) else 0)
    return pipe(
        "a red cube",
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        callback_on_step_end=check_state,
    ).images


def sequential(pipe) -> list[np.ndarray]:
    """CALLS one after the other, on one worker thread (torch's intra-op thread count is per thread: the main
    thread's may differ, and with it the summation order)."""
    with ThreadPoolExecutor(1) as pool:
        return list(pool.map(lambda c: call(pipe, *c), CALLS))


def threaded(pipe, seen: list) -> list[np.ndarray]:
    """CALLS on 4 threads, two calls each, started together."""
    barrier = threading.Barrier(4)

    def worker(k: int) -> list[np.ndarray]:
        barrier.wait()
        return [call(pipe, *CALLS[k], seen), call(pipe, *CALLS[k + 4], seen)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(worker, range(4)))
    return [results[k % 4][k // 4] for k in range(8)]


def sd_pipeline(tiny_sd_dir, scheduler: str) -> rapiddiff.StableDiffusionPipeline:
    pipe = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.scheduler = getattr(rapiddiff, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", ["PNDMScheduler", "DPMSolverMultistepScheduler"])
def test_four_threads_on_one_pipeline_give_the_sequential_images(tiny_sd_dir, scheduler):
    pipe = sd_pipeline(tiny_sd_dir, scheduler)
    expected = sequential(pipe)
    seen: list[bool] = []
    for got, want in zip(threaded(pipe, seen), expected):
        np.testing.assert_array_equal(got, want)
    assert len(seen) >= 8 and all(seen)
    assert pipe.scheduler._step_index is None  # the configured scheduler never steps: each call steps a copy


@pytest.mark.compile
def test_four_threads_on_one_compiled_pipeline_give_the_sequential_images(tiny_sd_dir):
    """Compiled calls are serialized (one lock per compiled model): the same images, in any order."""
    pipe = rapiddiff.compile_pipeline(sd_pipeline(tiny_sd_dir, "EulerDiscreteScheduler"), mode=None, backend="eager")
    expected = sequential(pipe)
    seen: list[bool] = []
    for got, want in zip(threaded(pipe, seen), expected):
        np.testing.assert_array_equal(got, want)
    assert all(seen)


def test_state_outside_calls_and_a_callback_changing_its_call_only(tiny_sd_dir):
    pipe = sd_pipeline(tiny_sd_dir, "PNDMScheduler")
    with pytest.raises(AttributeError, match="running call"):
        pipe._guidance_scale = 0.0  # outside a call there is no call to change

    def stop(p, i, t, kwargs):
        p._interrupt = True
        return {}

    steps = []
    pipe("a cube", num_inference_steps=3, callback_on_step_end=lambda p, i, t, k: steps.append(i) or stop(p, i, t, k))
    assert steps == [0] and pipe.interrupt  # the last call's state, in this thread
    pipe("a cube", num_inference_steps=2, guidance_scale=3.0)
    assert not pipe.interrupt and pipe.guidance_scale == 3.0
    other = []
    t = threading.Thread(target=lambda: other.append((pipe.guidance_scale, pipe.num_timesteps)))
    t.start()
    t.join()
    assert other == [(7.5, None)]  # another thread sees no call of its own


def test_changing_shared_models_while_a_call_runs_is_refused(tiny_sd_dir):
    from test_lora import make_lora

    pipe = sd_pipeline(tiny_sd_dir, "PNDMScheduler")
    lora = make_lora(pipe, "peft", seed=0)
    errors = []

    def load_during_call(p, i, t, kwargs):
        for change in (lambda: p.load_lora_weights(lora), lambda: rapiddiff.compile_pipeline(p, backend="eager")):
            with pytest.raises(RuntimeError, match="in use by 1 running pipeline call"):
                change()
            errors.append(i)
        return {}

    pipe("a cube", num_inference_steps=1, callback_on_step_end=load_during_call)
    assert errors == [0, 0]
    pipe.load_lora_weights(lora)  # once the call has returned
    assert pipe.get_active_adapters()


def test_a_scheduler_with_a_patched_method_is_stepped_in_place_one_call_at_a_time(tiny_sd_dir):
    """`scheduler.step = wrapper` (bound to the configured scheduler, as a step counter does) cannot run on a copy:
    such calls step the configured scheduler, serialized, and give the same images."""
    pipe = sd_pipeline(tiny_sd_dir, "EulerDiscreteScheduler")
    expected = sequential(pipe)
    scheduler, steps = pipe.scheduler, []
    step = scheduler.step

    def counted(*args, **kwargs):
        steps.append(1)
        return step(*args, **kwargs)

    scheduler.step = counted
    for got, want in zip(threaded(pipe, []), expected):
        np.testing.assert_array_equal(got, want)
    assert len(steps) == sum(c[0] for c in CALLS)
