"""`rapiddiff generate` in-process on a tiny checkpoint: PNG files equal to the pipeline's own output."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from rapiddiff import DiffusionPipeline, EulerAncestralDiscreteScheduler, cli

ARGS = ["--steps", "2", "--seed", "3", "--height", "32", "--width", "48"]


def _pipeline_images(folder, n=1, scheduler=None):
    pipe = DiffusionPipeline.from_pretrained(folder)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red cube", num_inference_steps=2, height=32, width=48, num_images_per_prompt=n,
               generator=torch.Generator().manual_seed(3))  # fmt: skip
    return [np.asarray(i) for i in out.images]


def test_generate_writes_the_pipeline_image(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "cube.png"
    assert cli.main(["generate", "a red cube", "--model", str(tiny_sd_dir), "-o", str(out), *ARGS]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    written = np.asarray(PIL.Image.open(out))
    assert written.shape == (32, 48, 3)
    np.testing.assert_array_equal(written, _pipeline_images(tiny_sd_dir)[0])


def test_generate_several_images_into_a_folder(tiny_sd_dir, tmp_path):
    argv = ["generate", "a red cube", "--model", str(tiny_sd_dir), "-o", str(tmp_path / "out"), "--num-images", "2"]
    assert cli.main([*argv, "--scheduler", "euler_a", "--attention", "vanilla", *ARGS]) == 0
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["3-0.png", "3-1.png"]
    expected = _pipeline_images(tiny_sd_dir, 2, EulerAncestralDiscreteScheduler)
    for f, e in zip(files, expected):
        assert np.abs(np.asarray(PIL.Image.open(f)).astype(int) - e).max() <= 1  # vanilla vs SDPA rounding


def test_generate_reports_bad_input(tiny_sd_dir, tmp_path, capsys):
    argv = ["generate", "x", "--model", str(tiny_sd_dir), "-o", str(tmp_path / "x.png"), "--height", "36"]
    assert cli.main(argv) == 2
    assert "height must be divisible by 8" in capsys.readouterr().err
    assert cli.main(["generate", "x", "--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--dtype", "int8"], ["--scheduler", "heun"], ["--steps", "0"], ["--attention", "x"]])
def test_generate_rejects_bad_options(tiny_sd_dir, bad):
    with pytest.raises(SystemExit):
        cli.main(["generate", "x", "--model", str(tiny_sd_dir), *bad])
