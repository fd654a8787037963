"""Single-file checkpoints in the original Stable Diffusion layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`, ControlNet's `control_model.*`), read offline.

The conversion is one table: for each model, `*_rules(config)` lists `Rule`s, each mapping a key prefix of the original
layout to Diffusers' (the block indices follow from the config), with optional renames of the part of the key below
the prefix and a tensor transform. `to_diffusers` applies a table; `to_original` applies it backwards (used to write
original-layout files, e.g. by the tests). The architecture is detected from keys and shapes; the configs come from the
package's presets (`rapiddiff.presets`) or from `config=`, a local Diffusers folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..configuration import read_json
from ..exports import exported_class
from ..models.modeling_utils import resolve_dtype_arg
from ..models.single_file import cast_floats, load_model, read_checkpoint, read_model_config
from ..models.single_file_keys import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    XL_CLIP_PREFIX,
    XL_OPENCLIP_PREFIX,
    XL_REFINER_OPENCLIP_PREFIX,
    clip_rules,
    openclip_rules,
    to_diffusers,
    unet_rules,
    vae_rules,
)
from ..presets import PRESETS_DIR
from ..quantization.config import pipeline_quantization
from ..quantization.torchao_quant import quantize_loaded

logger = logging.getLogger(__name__)

PRESETS = {
    "v1": "stable-diffusion-v1-5",
    "v1-inpainting": "stable-diffusion-inpainting",
    "v2": "stable-diffusion-2-1",
    "xl-base": "stable-diffusion-xl-base-1.0",
    "xl-refiner": "stable-diffusion-xl-refiner-1.0",
}
# The text encoders of each architecture: (component, key prefix, OpenCLIP layout?).
TEXT_ENCODERS = {
    "v1": (("text_encoder", CLIP_PREFIX, False),),
    "v2": (("text_encoder", OPENCLIP_PREFIX, True),),
    "xl-base": (("text_encoder", XL_CLIP_PREFIX, False), ("text_encoder_2", XL_OPENCLIP_PREFIX, True)),
    "xl-refiner": (("text_encoder_2", XL_REFINER_OPENCLIP_PREFIX, True),),
}


# --- reading the file and finding the architecture --------------------------------------------------------------------
def detect(state: Mapping[str, torch.Tensor], path: str) -> str:
    """The architecture of an original SD checkpoint, from its keys and shapes: "v1", "v2", "xl-base", "xl-refiner",
    with "-inpainting" for a 9-channel UNet."""
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        sample = ", ".join(sorted(state)[:5])
        raise ValueError(
            f"{path} is not a Stable Diffusion checkpoint in the original layout: no {UNET_PREFIX}input_blocks.0.0.weight "
            f"(first keys: {sample})"
        )
    inpainting = "-inpainting" if conv_in.shape[1] == 9 else ""
    if any(k.startswith("conditioner.embedders.") for k in state):  # SDXL: the refiner has one (OpenCLIP) embedder
        xl = "xl-base" if any(k.startswith("conditioner.embedders.1.") for k in state) else "xl-refiner"
        return xl + inpainting
    context = [v.shape[-1] for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    v2 = any(k.startswith(OPENCLIP_PREFIX) for k in state) or 1024 in context
    kind = "v2" if v2 else "v1"
    return kind + inpainting


def config_folder(kind: str, config: str | os.PathLike | None) -> Path:
    """`config=` (a local Diffusers folder), else the package preset of the detected architecture."""
    if config is not None:
        folder = Path(os.path.expanduser(str(config)))
        if not folder.is_dir():
            raise FileNotFoundError(f"config={str(config)!r} must be a local Diffusers folder (offline: no Hub ids)")
        return folder
    if kind not in PRESETS:
        raise ValueError(
            f"no preset config for a {kind} checkpoint (presets: {', '.join(PRESETS)}); pass config= a local Diffusers "
            "folder of the same architecture"
        )
    return PRESETS_DIR / PRESETS[kind]


# --- building the models ---------------------------------------------------------------------------------------------
def load_text_encoder(config: Mapping[str, Any], state: dict[str, torch.Tensor], source: str) -> Any:
    """A CLIPTextModel, or the CLIPTextModelWithProjection its config's `architectures` names (SDXL's second)."""
    import transformers

    text_config = transformers.CLIPTextConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a buffer transformers builds
    with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or ())
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    model = cls(text_config)
    dtype = next(iter(state.values())).dtype
    model.to(dtype)
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5 drops the level
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not fit the config
        raise ValueError(f"{source}: {e}") from e
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{source}: the text encoder does not fit {config.get('_name_or_path', 'its config')}: missing keys "
            f"{missing[:8]}, unexpected keys {unexpected[:8]}"
        )
    return model.eval()


def convert_components(
    path: str | os.PathLike,
    config: str | os.PathLike | None,
    dtype: torch.dtype | str,
    skip: tuple[str, ...] = (),
) -> tuple[Path, dict[str, Any], str, int | None]:
    """Read an SD checkpoint: (config folder, {unet, vae, text_encoder} not in `skip`, kind, global_step)."""
    from ..models.autoencoder_kl import AutoencoderKL
    from ..models.unet_2d_condition import UNet2DConditionModel

    checkpoint = read_checkpoint(path)
    state, source = checkpoint["state"], str(path)
    kind = detect(state, source)
    folder = config_folder(kind, config)
    models: dict[str, Any] = {}
    if "unet" not in skip:
        unet_config = read_model_config(folder, "unet")
        what = f"{source} (UNet, {kind}, config {folder / 'unet'})"
        converted = cast_floats(to_diffusers(state, unet_rules(unet_config), what, (UNET_PREFIX,)), dtype)
        models["unet"] = load_model(UNet2DConditionModel, unet_config, converted, what)
    if "vae" not in skip:
        vae_config = read_model_config(folder, "vae")
        what = f"{source} (VAE, config {folder / 'vae'})"
        converted = cast_floats(to_diffusers(state, vae_rules(vae_config), what, (VAE_PREFIX,)), dtype)
        if not converted:
            raise ValueError(f"{source} has no VAE weights ({VAE_PREFIX}*): pass vae=")
        models["vae"] = load_model(AutoencoderKL, vae_config, converted, what)
    for name, prefix, openclip in TEXT_ENCODERS[kind.removesuffix("-inpainting")]:
        if name in skip:
            continue
        text_config = read_model_config(folder, name)
        rules = openclip_rules(text_config, prefix) if openclip else clip_rules(text_config, prefix)
        what = f"{source} ({name}, config {folder / name})"
        converted = to_diffusers(state, rules, what, (prefix,))
        if not converted:
            raise ValueError(f"{source} has no {name} weights ({prefix}*): pass {name}=")
        models[name] = load_text_encoder(text_config, cast_floats(converted, dtype), what)
    return folder, models, kind, checkpoint["global_step"]


def prediction_type_for(kind: str, given: str | None, global_step: int | None) -> str | None:
    """Diffusers' rule: SD 2.x is v-prediction unless the file says it is the 512 base model (global_step 875000)."""
    if given is not None:
        return given
    if kind.startswith("v2"):
        return "epsilon" if global_step == 875000 else "v_prediction"
    return None  # the config folder's scheduler decides


# --- entry points ---------------------------------------------------------------------------------------------------
def pipeline_from_single_file(
    pipeline_cls: type,
    path: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    torch_dtype: Any = None,
    dtype: Any = None,
    prediction_type: str | None = None,
    quantization_config: Any = None,
    **kwargs: Any,
) -> Any:
    """`Pipeline.from_single_file`: the converted UNet, VAE and text encoder, the other components from the config
    folder; keyword arguments named after components replace them (those given are not read from the file).
    `quantization_config`: a PipelineQuantizationConfig, as in from_pretrained."""
    where = f"{pipeline_cls.__name__}.from_single_file"
    quantization = pipeline_quantization(quantization_config, where)
    load_dtype = resolve_dtype_arg(torch_dtype, dtype, where)
    components = set(pipeline_cls.component_names())
    if not {"unet", "vae", "text_encoder"} <= components:
        raise TypeError(
            f"{pipeline_cls.__name__}.from_single_file: single-file checkpoints load into Stable Diffusion pipelines "
            "(StableDiffusionPipeline, its img2img / inpainting / ControlNet variants)"
        )
    if prediction_type not in (None, "epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
    for unsupported in ("original_config", "original_config_file"):
        if unsupported in kwargs:
            raise TypeError(
                f"{unsupported}= (a YAML of the original repository) is not supported: pass config= a Diffusers folder"
            )
    kwargs.pop("local_files_only", None)  # always offline
    given = tuple(k for k in kwargs if k in components)
    folder, models, kind, step = convert_components(path, config, load_dtype, skip=given)
    if quantization is not None:
        quantization.check_components(components, where)
        for name, model in models.items():
            quantize_loaded(model, quantization._resolve_quant_config(module_name=name), torch_dtype or dtype, where)
        kwargs["quantization_config"] = quantization  # for the components read from the config folder
    if "scheduler" not in kwargs:
        kwargs["scheduler"] = _scheduler(folder, prediction_type_for(kind, prediction_type, step))
    if (
        "safety_checker" in components
        and "safety_checker" not in kwargs
        and not _has_weights(folder / "safety_checker")
    ):
        logger.warning(
            "%s: no safety checker weights in %s; the pipeline has no safety checker (pass safety_checker= to add one)",
            path,
            folder,
        )
        kwargs["safety_checker"] = None
        kwargs.setdefault("requires_safety_checker", False)
    pipe = pipeline_cls.from_pretrained(
        folder, torch_dtype=None if load_dtype == "auto" else load_dtype, **models, **kwargs
    )
    pipe._name_or_path = str(path)
    return pipe


def _scheduler(folder: Path, prediction_type: str | None) -> Any:
    path = folder / "scheduler" / "scheduler_config.json"
    values = read_json(path)
    cls = exported_class(values.get("_class_name", ""), str(path))
    overrides = {"prediction_type": prediction_type} if prediction_type is not None else {}
    return cls.from_config(values, **overrides)


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir())
