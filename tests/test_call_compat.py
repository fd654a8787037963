"""Diffusers call habits that keep working: the SD pipelines' deprecated `callback` / `callback_steps`, numpy scalars
for numbers, `pipe.progress_bar(iterable)`."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import assert_same_images, seeded

import rapiddiff


@pytest.fixture(scope="module")
def sd_pair(tiny_sd_dir):
    pipes = (
        diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_dir),
        rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir),
    )
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def test_old_callback_and_numpy_scalars_as_diffusers(sd_pair):
    outs, records = [], []
    for pipe in sd_pair:
        calls, ends = [], []

        def on_end(p, i, t, kw, _ends=ends):
            _ends.append(i)
            return {}

        with pytest.warns(
            FutureWarning, match="`callback` is deprecated and will be removed in version 1.0.0"
        ) as warned:
            out = pipe(
                "a red cube",
                num_inference_steps=np.int64(3),
                guidance_scale=np.float32(6.5),
                eta=np.float64(0.0),
                num_images_per_prompt=np.int64(1),
                height=np.int64(16),
                width=np.int64(24),
                output_type="np",
                generator=seeded(0),
                callback=lambda step, t, latents, _calls=calls: _calls.append((step, int(t), latents.clone())),
                callback_steps=2,
                callback_on_step_end=on_end,
            )
        assert any("callback_steps" in str(w.message) for w in warned)
        outs.append(out)
        records.append((calls, ends))
    assert_same_images(*outs)
    (ref_calls, ref_ends), (calls, ends) = records
    assert ends == ref_ends == [0, 1, 2, 3]  # PNDM: 3 steps are 4 timesteps
    # PNDM warms up one step: Diffusers calls back at step 2 only (i % 2 == 0 where the progress bar advances)
    assert [c[:2] for c in calls] == [c[:2] for c in ref_calls] == [(2, 334)]
    for ours, ref in zip(calls, ref_calls):
        torch.testing.assert_close(ours[2], ref[2], rtol=0, atol=1e-4)


def test_progress_bar_over_an_iterable(sd_pair):
    pipe = sd_pair[1]
    assert list(pipe.progress_bar(range(3))) == [0, 1, 2]
    with pipe.progress_bar(total=2) as bar:
        bar.update()
    with pytest.raises(ValueError, match="iterable or total"):
        pipe.progress_bar()
