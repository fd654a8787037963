"""Benchmark presets: image sizes, step counts and the model configs each workload is built from.

Every preset starts from the real checkpoints' configs shipped in `rapiddiff/presets/`. `gpu` uses them as they are
(the reference page's workloads); `cpu` and `tiny` shrink widths and depths through `overrides` so the same architectures (block
types, attention layout, IF's text projection) run in minutes on two cores, or in seconds in the tests.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from ..presets import PRESETS_DIR
from ..quantization.cpu import cpu_precisions

# Checkpoint key (as in `--model KEY=PATH`) -> folder of its configs under PRESETS_DIR.
CHECKPOINTS = {
    "sd": "stable-diffusion-v1-5",
    "sd_inpaint": "stable-diffusion-inpainting",
    "controlnet": "sd-controlnet-canny",
    "if_stage_1": "IF-I-M-v1.0",
    "if_stage_2": "IF-II-M-v1.0",
    "if_stage_3": "stable-diffusion-x4-upscaler",
    "sdxl": "stable-diffusion-xl-base-1.0",
}

# The reference page's step counts (the pipelines' own defaults).
REFERENCE_STEPS = {
    "sd_txt2img": 50,
    "sd_img2img": 50,
    "sd_inpaint": 50,
    "sd_controlnet": 50,
    "if_stage_1": 100,
    "if_stage_2": 50,
    "if_stage_3": 75,
    "sdxl_txt2img": 30,  # not on the reference page: the step count of Diffusers' SDXL speed recipes
}


@dataclasses.dataclass(frozen=True)
class Estimates:
    """Rough seconds a preset's work takes, per backend, for planning the time budget before anything was measured.

    The sweep scales them by what the groups done so far really took (`budget.Calibration`), so they need only be of
    the right order; a pair's time scales with the step count and as `1 + batch_slope * (batch - 1)` with the batch.
    """

    pair_s: Mapping[str, float]  # figure -> one (short, long) pair at batch 1 and the preset's steps
    compile_s: Mapping[str, float]  # figure -> the first compiled call (torch.compile of the denoisers)
    build_s: float  # building one figure's pipeline
    batch_slope: float
    reserve_s: float  # the end of the run: the report and charts


@dataclasses.dataclass(frozen=True)
class Preset:
    """What one `--preset` runs: sizes, steps, the default matrix and the config overrides."""

    name: str
    description: str
    dtype: str  # "float16" | "float32"
    sd_size: int  # SD height = width (txt2img, img2img, inpaint, controlnet)
    if_sizes: tuple[int, int]  # IF stage I and stage II output size; stage III upscales the stage-I image x4
    sdxl_size: int  # SDXL height = width
    steps: Mapping[str, int]  # figure -> steps of the long (timed, end-to-end) call
    batch_sizes: tuple[int, ...]
    modes: tuple[str, ...]
    repeats: int  # timed (short, long) pairs per cell at least; the medians give the rate
    max_repeats: int  # at most, while the speed-up's interval is wider than +-5 % (see measure.Rounds)
    cell_seconds: float  # no new round after this many seconds of timed calls in one cell
    warmup: int  # untimed calls before timing; the first one's time is reported (it compiles)
    # torch's CPU threads; None leaves torch's default. One on the CPU presets: on a shared machine a second thread
    # spin-waits for a busy core and small models slow down tenfold, drowning any difference between the backends.
    threads: int | None
    estimates: Estimates  # for planning the time budget
    # "<checkpoint>/<subfolder>" (or "<checkpoint>" for single-model checkpoints) -> config keys to replace
    overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # the batch sizes of the default matrix the compiled mode runs at (None: all); each is a compile per backend
    compiled_batch_sizes: tuple[int, ...] | None = None
    time_budget: float = 0.0  # seconds for the whole run by default (`--time-budget`); 0: none


_SD_DENOISERS = ("sd/unet", "sd_inpaint/unet", "controlnet")
_SD_VAES = ("sd/vae", "sd_inpaint/vae")
_SD_TEXT = ("sd/text_encoder", "sd_inpaint/text_encoder")


def _clip(width: int, layers: int, heads: int) -> dict[str, Any]:
    # vocab_size and max_position_embeddings stay: the real CLIP tokenizer feeds these encoders
    return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=heads, projection_dim=width)  # fmt: skip


def _sdxl_unet(widths: list[int], heads: list[int], layers: list[int], text: int, time: int) -> dict[str, Any]:
    """A narrower SDXL UNet reading two `text`-wide encoders (cross-attention on both, the second's pooled
    projection plus 6 time ids of `time` features in the added embedding)."""
    return dict(block_out_channels=widths, attention_head_dim=heads, transformer_layers_per_block=layers,
                cross_attention_dim=2 * text, addition_time_embed_dim=time,
                projection_class_embeddings_input_dim=text + 6 * time)  # fmt: skip


CPU_OVERRIDES: dict[str, Mapping[str, Any]] = {
    **dict.fromkeys(
        _SD_DENOISERS, dict(block_out_channels=[64, 128, 256, 256], layers_per_block=1, cross_attention_dim=256)
    ),
    **dict.fromkeys(_SD_VAES, dict(block_out_channels=[32, 64, 128, 128], layers_per_block=1)),
    **dict.fromkeys(_SD_TEXT, _clip(256, 4, 4)),
    "if_stage_1/unet": dict(block_out_channels=[64, 128, 192, 256], layers_per_block=1, cross_attention_dim=256),
    "if_stage_2/unet": dict(
        block_out_channels=[32, 64, 128, 256, 256],
        layers_per_block=[1, 1, 1, 2, 1],
        cross_attention_dim=256,
        time_embedding_dim=256,
    ),
    "if_stage_3/unet": dict(block_out_channels=[64, 128, 128, 256], layers_per_block=1, cross_attention_dim=256),
    "if_stage_3/vae": dict(block_out_channels=[32, 64, 64], layers_per_block=1),
    "if_stage_3/text_encoder": _clip(256, 4, 4),
    "sdxl/unet": _sdxl_unet([64, 128, 256], [1, 2, 4], [1, 1, 2], text=128, time=32) | dict(layers_per_block=1),
    "sdxl/vae": dict(block_out_channels=[32, 64, 128, 128], layers_per_block=1),
    **dict.fromkeys(("sdxl/text_encoder", "sdxl/text_encoder_2"), _clip(128, 2, 2)),
}

TINY_OVERRIDES: dict[str, Mapping[str, Any]] = {
    **dict.fromkeys(
        _SD_DENOISERS, dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, cross_attention_dim=32)
    ),
    **dict.fromkeys(_SD_VAES, dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1)),
    **dict.fromkeys(_SD_TEXT, _clip(32, 1, 2)),
    "if_stage_1/unet": dict(
        block_out_channels=[32, 32, 64, 64], layers_per_block=1, attention_head_dim=16, cross_attention_dim=64
    ),
    "if_stage_2/unet": dict(
        block_out_channels=[32, 32, 32, 64, 64],
        layers_per_block=1,
        attention_head_dim=16,
        cross_attention_dim=64,
        time_embedding_dim=64,
    ),
    "if_stage_3/unet": dict(block_out_channels=[32, 32, 32, 64], layers_per_block=1, cross_attention_dim=32),
    "if_stage_3/vae": dict(block_out_channels=[32, 32, 32], layers_per_block=1),
    "if_stage_3/text_encoder": _clip(32, 1, 2),
    "sdxl/unet": _sdxl_unet([32, 32, 64], [1, 1, 2], [1, 1, 1], text=32, time=8) | dict(layers_per_block=1),
    "sdxl/vae": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1),
    **dict.fromkeys(("sdxl/text_encoder", "sdxl/text_encoder_2"), _clip(32, 1, 2)),
}

# The 2-core CPU the `cpu` preset was tuned on (2026-12-07, quiet): compiles with a cold inductor cache, which later
# figures of the same architecture partly reuse.
CPU_ESTIMATES = Estimates(
    pair_s={"sd_txt2img": 0.85, "sd_img2img": 0.7, "sd_inpaint": 0.8, "sd_controlnet": 1.25, "if_stage_1": 0.75,
            "if_stage_2": 1.5, "if_stage_3": 0.5, "sdxl_txt2img": 1.0},
    compile_s={"sd_txt2img": 32.0, "sd_img2img": 11.0, "sd_inpaint": 19.0, "sd_controlnet": 33.0, "if_stage_1": 37.0,
               "if_stage_2": 36.0, "if_stage_3": 27.0, "sdxl_txt2img": 40.0},
    build_s=4.0,  # the first one imports the library's modules too
    batch_slope=0.55,
    reserve_s=15.0,
)  # fmt: skip

# Not measured yet: of the right order for an H100 (SD 1.5 eager ~34 it/s at 512x512, a UNet compile about a minute).
GPU_ESTIMATES = Estimates(
    pair_s={"sd_txt2img": 2.0, "sd_img2img": 1.6, "sd_inpaint": 2.0, "sd_controlnet": 2.8, "if_stage_1": 4.0,
            "if_stage_2": 3.0, "if_stage_3": 10.0, "sdxl_txt2img": 5.0},
    compile_s=dict.fromkeys(REFERENCE_STEPS, 60.0),
    build_s=5.0,
    batch_slope=0.9,
    reserve_s=15.0,
)  # fmt: skip

TINY_ESTIMATES = Estimates(
    pair_s=dict.fromkeys(REFERENCE_STEPS, 0.1), compile_s=dict.fromkeys(REFERENCE_STEPS, 10.0), build_s=0.5,
    batch_slope=0.5, reserve_s=1.0
)  # fmt: skip

# One line per aspect: sizes and steps; the default matrix; timing (rounds, warm-up, threads); configs and budget.
PRESETS = {
    p.name: p
    for p in (
        Preset(
            name="gpu",
            description="the reference matrix: real architectures, fp16, SD 512x512, default steps (SDXL: 1024x1024, 30)",
            dtype="float16", sd_size=512, if_sizes=(64, 256), sdxl_size=1024, steps=REFERENCE_STEPS,
            batch_sizes=(1, 4, 16), modes=("eager-sdpa", "compiled"),
            repeats=3, max_repeats=10, cell_seconds=120.0, warmup=2, threads=None,
            time_budget=1800.0, estimates=GPU_ESTIMATES,
        ),
        Preset(
            name="cpu",
            description="scaled-down architectures, fp32, SD and SDXL 128x128, IF 16 -> 64, 8 steps: minutes on two cores",
            dtype="float32", sd_size=128, if_sizes=(16, 64), sdxl_size=128, steps=dict.fromkeys(REFERENCE_STEPS, 8),
            # a CPU compile takes tens of seconds: one per pipeline and backend, at batch size 1
            batch_sizes=(1, 2), modes=("eager-sdpa", "compiled"), compiled_batch_sizes=(1,),
            # repeats odd: the median drops one call slowed by a busy machine
            repeats=3, max_repeats=9, cell_seconds=25.0, warmup=1, threads=1,
            overrides=CPU_OVERRIDES, time_budget=600.0, estimates=CPU_ESTIMATES,
        ),
        Preset(
            name="tiny",
            description="tiny architectures, fp32, SD 64x64, 6 steps: seconds, for tests",
            dtype="float32", sd_size=64, if_sizes=(16, 32), sdxl_size=64, steps=dict.fromkeys(REFERENCE_STEPS, 6),
            batch_sizes=(1, 2), modes=("eager-sdpa", "eager-vanilla"),
            repeats=1, max_repeats=1, cell_seconds=0.0, warmup=1, threads=1,
            overrides=TINY_OVERRIDES, estimates=TINY_ESTIMATES,
        ),
    )
}  # fmt: skip


def resolve_preset(name: str, cuda_available: bool) -> Preset:
    """`auto` is `gpu` where CUDA is available, else `cpu`. The `cpu` preset gains the compiled-bf16 column on a CPU
    that computes bfloat16 natively (AVX512-BF16 or AMX, as torch.cpu's probes report: `cpu_precisions`)."""
    if name == "auto":
        name = "gpu" if cuda_available else "cpu"
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not known; allowed: auto, {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if name == "cpu" and cpu_precisions().bf16:
        preset = dataclasses.replace(preset, modes=(*preset.modes, "compiled-bf16"))
    return preset


def preset_config(checkpoint: str, subfolder: str, filename: str, preset: Preset) -> dict[str, Any]:
    """A shipped config with the preset's overrides applied."""
    path = PRESETS_DIR / CHECKPOINTS[checkpoint] / subfolder / filename
    config = json.loads(path.read_text())
    key = f"{checkpoint}/{subfolder}" if subfolder else checkpoint
    return {**config, **preset.overrides.get(key, {})}
