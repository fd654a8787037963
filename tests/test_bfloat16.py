"""Every pipeline in bfloat16 on the CPU, as Diffusers runs it: the same dtypes at every step (latents handed to the
step callback, the scheduler's timesteps), float32 images out, and images as close to float32 as Diffusers' own.

bfloat16 keeps 8 bits of mantissa: on these tiny random models Diffusers' bf16 images are up to ~0.2 from its fp32
images, so the two libraries cannot agree to fp32's tolerance; each library's distance to the fp32 images is compared
instead."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import random_image, seeded
from test_controlnet import tiny_controlnet

import rapiddiff

# rapiddiff bf16 may be this much farther from fp32 than Diffusers bf16 is (the rounding differs op by op)
SLACK = 1.5
SLACK_ABS = 0.02


def _run(lib, name: str, path, dtype: torch.dtype, extra: dict) -> tuple[np.ndarray, list]:
    kwargs = dict(extra)
    if "controlnet" in kwargs:
        kwargs.pop("controlnet")
        net_cls = lib.ControlNetModel
        components = {"controlnet": net_cls.from_pretrained(extra["controlnet"], torch_dtype=dtype)}
    else:
        components = {}
    pipe = getattr(lib, name).from_pretrained(path, torch_dtype=dtype, **components)
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def record(p, i, t, tensors):
        seen.append((tensors["latents"].dtype, t.dtype if torch.is_tensor(t) else type(t)))
        return tensors

    if name == "StableDiffusionUpscalePipeline":  # Diffusers' upscaler takes the old callback only
        kwargs["callback"] = lambda i, t, latents: record(None, i, t, {"latents": latents})
    else:
        kwargs["callback_on_step_end"] = record
    out = pipe("a red cube", num_inference_steps=2, generator=seeded(0), output_type="np", **kwargs)
    return out.images, seen


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16-controlnet") / "cn"
    tiny_controlnet(1).save_pretrained(path)
    return path


CASES = {
    "txt2img": ("StableDiffusionPipeline", "sd", {}),
    "img2img": ("StableDiffusionImg2ImgPipeline", "sd", {"image": random_image(32, 32)}),
    "inpaint": (
        "StableDiffusionInpaintPipeline",
        "sd",
        {"image": random_image(32, 32), "mask_image": random_image(32, 32, mode="L")},
    ),
    "controlnet": ("StableDiffusionControlNetPipeline", "sd", {"image": random_image(32, 32, seed=3)}),
    "upscale": ("StableDiffusionUpscalePipeline", "x4", {"image": random_image(8, 8)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pipeline_runs_in_bfloat16_as_diffusers(case, tiny_sd_dir, tiny_upscaler_dir, controlnet_dir):
    name, checkpoint, extra = CASES[case]
    path = tiny_sd_dir if checkpoint == "sd" else tiny_upscaler_dir
    if case == "controlnet":
        extra = {**extra, "controlnet": controlnet_dir}
    reference, _ = _run(diffusers, name, path, torch.float32, extra)
    ref_bf16, ref_seen = _run(diffusers, name, path, torch.bfloat16, extra)
    ours_bf16, our_seen = _run(rapiddiff, name, path, torch.bfloat16, extra)
    assert ours_bf16.dtype == ref_bf16.dtype == np.float32 and ours_bf16.shape == ref_bf16.shape
    assert np.isfinite(ours_bf16).all()
    assert our_seen == ref_seen  # latents and timesteps in Diffusers' dtypes at every step
    ref_distance = np.abs(ref_bf16 - reference).max()
    our_distance = np.abs(ours_bf16 - reference).max()
    assert our_distance <= SLACK * ref_distance + SLACK_ABS, (case, our_distance, ref_distance)


# --- the benchmark's bf16 column -------------------------------------------------------------------------------------
def test_cpu_preset_has_a_bf16_column_where_the_cpu_has_bf16(monkeypatch):
    from rapiddiff.bench import presets
    from rapiddiff.quantization.cpu import CpuPrecisions

    for native in (True, False):
        monkeypatch.setattr(presets, "cpu_precisions", lambda n=native: CpuPrecisions(bf16=n, int8=n, amx=n))
        assert ("compiled-bf16" in presets.resolve_preset("cpu", cuda_available=False).modes) is native
        assert "compiled-bf16" not in presets.resolve_preset("gpu", cuda_available=True).modes


@pytest.mark.parametrize("library", ["rapiddiff", "diffusers"])
def test_compiled_bf16_mode_casts_compiles_and_undoes(library, monkeypatch):
    from rapiddiff.bench.backends import Backend
    from rapiddiff.bench.modes import MODES
    from rapiddiff.bench.presets import PRESETS
    from rapiddiff.bench.settings import Settings
    from rapiddiff.bench.workloads import FIGURES_BY_NAME, build_pipeline

    compiled = []
    monkeypatch.setattr(rapiddiff, "compile_pipeline", lambda pipe, **kw: compiled.append(kw["components"]))
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(type(model).__name__) or model)
    settings = Settings.create(PRESETS["tiny"], device="cpu", backends=(library,), progress=False)
    figure = FIGURES_BY_NAME["sd_txt2img"]
    pipe = build_pipeline(figure, Backend(library), settings)
    undo = MODES["compiled-bf16"](pipe, figure, Backend(library))
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16 and compiled
    undo()
    assert pipe.unet.dtype == pipe.vae.dtype == torch.float32
