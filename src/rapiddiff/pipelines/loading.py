"""Loading and saving a pipeline's components: class lookup, which files a component needs, the Hub.

Every class name in model_index.json resolves through one table, `rapiddiff.exports.EXPORTS`: pipelines (`_class_name`) and
components of the libraries "diffusers", "stable_diffusion" and "deepfloyd_if". Registering a new pipeline class is
adding it to that table.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..configuration import read_json
from ..exports import exported_class
from ..hub import IGNORED_REPO_PATTERNS, resolve_dir
from ..quantization.config import TorchAoConfig
from ..quantization.torchao_quant import quantize_model, refuse_save

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"

# model_index.json library names that resolve to rapiddiff classes. Diffusers names its pipeline-specific components
# (safety checkers, watermarker) after the pipeline sub-package that defines them.
RAPIDDIFF_LIBRARIES = ("diffusers", "stable_diffusion", "deepfloyd_if")
PIPELINE_COMPONENT_LIBRARY = {
    "StableDiffusionSafetyChecker": "stable_diffusion",
    "IFSafetyChecker": "deepfloyd_if",
    "IFWatermarker": "deepfloyd_if",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# transformers classes that model_index.json files name by an old name (Diffusers maps them the same way).
TRANSFORMERS_ALIASES = {"CLIPFeatureExtractor": "CLIPImageProcessor"}
# `DiffusionPipeline.from_pretrained(checkpoint, controlnet=...)` loads a text-to-image checkpoint into its ControlNet
# pipeline (what Diffusers' AutoPipelineForText2Image does with a `controlnet` argument).
CONTROLNET_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionControlNetPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLControlNetPipeline",
}


# --- class lookup --------------------------------------------------------------------------------------------------
def _component_class(library: str, class_name: str, what: str) -> type:
    if library in RAPIDDIFF_LIBRARIES:
        return exported_class(class_name, what)
    if library == "transformers":
        import transformers

        try:
            return getattr(transformers, TRANSFORMERS_ALIASES.get(class_name, class_name))
        except AttributeError as e:
            raise ValueError(f"{what}: transformers has no class {class_name!r}") from e
    raise ValueError(
        f"{what}: unknown library {library!r}; rapiddiff loads components of "
        f"{', '.join(repr(x) for x in (*RAPIDDIFF_LIBRARIES, 'transformers'))}."
    )


def _unwrap(module: Any) -> Any:
    """The module under a `torch.compile` wrapper (its config, class and weights are the original's)."""
    return getattr(module, "_orig_mod", module)


def is_compiled(module: Any) -> bool:
    """Whether calling `module` runs torch.compile'd code (`torch.compile(module)` or `module.compile()`)."""
    return hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None


def library_entry(component: Any) -> tuple[str | None, str | None]:
    """The `[library, class]` pair that model_index.json records for a component."""
    if component is None:
        return (None, None)
    cls = type(_unwrap(component))
    root = cls.__module__.split(".")[0]
    if root == "rapiddiff":
        return (PIPELINE_COMPONENT_LIBRARY.get(cls.__name__, "diffusers"), cls.__name__)
    return (root, cls.__name__)


def _is_transformers_model(obj: Any) -> bool:
    import transformers

    cls = obj if isinstance(obj, type) else type(obj)
    return issubclass(cls, transformers.PreTrainedModel)


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


# --- which files a component needs ------------------------------------------------------------------------------------
def file_variant(filename: str) -> str | None:
    """`diffusion_pytorch_model.fp16.safetensors` / `model.fp16-00001-of-00002.safetensors` -> "fp16"; plain -> None."""
    stem = filename
    for suffix in WEIGHT_SUFFIXES:
        stem = stem.removesuffix(suffix)
    parts = stem.split(".")
    return parts[-1].split("-")[0] if len(parts) > 1 else None


def _is_weight(filename: str) -> bool:
    return filename.endswith(WEIGHT_SUFFIXES)


def pick_weight_files(names: Sequence[str], variant: str | None, use_safetensors: bool | None) -> list[str]:
    """The weight files of one component to use: the variant's if it has them, else the plain ones (as Diffusers)."""
    suffixes = {None: (".safetensors", ".bin"), True: (".safetensors",), False: (".bin", ".safetensors")}
    for suffix in suffixes[use_safetensors]:
        files = [n for n in names if n.endswith(suffix)]
        wanted = [n for n in files if variant is not None and file_variant(n) == variant]
        plain = [n for n in files if file_variant(n) is None]
        if wanted or plain:
            return wanted or plain
    return []


def _folder_has_variant(folder: Path, variant: str | None) -> bool:
    return variant is not None and any(_is_weight(p.name) and file_variant(p.name) == variant for p in folder.iterdir())


def _check_variant_present(root: Path, names: list[str], variant: str | None, source: str) -> None:
    """Components without the variant load their plain weights, but a variant that no component has is a mistake."""
    if variant is None:
        return
    weighted = [n for n in names if (root / n).is_dir() and any(_is_weight(p.name) for p in (root / n).iterdir())]
    if weighted and not any(_folder_has_variant(root / n, variant) for n in weighted):
        raise ValueError(  # Diffusers' first sentence, which callers match
            f"You are trying to load the model files of the `variant={variant}`, but no such modeling files are "
            f"available. {source}: none of the components {weighted} has weight files of variant={variant!r}"
        )


def _load_component(
    root: Path,
    name: str,
    library: str | None,
    class_name: str | None,
    dtype: torch.dtype | None,
    variant: str | None,
    use_safetensors: bool | None,
    quantization_config: Any = None,
) -> Any:
    """One component from its folder; `quantization_config` (from a PipelineQuantizationConfig) quantizes it."""
    what = f"component {name!r} ([{library!r}, {class_name!r}])"
    if not isinstance(library, str) or not isinstance(class_name, str):
        raise ValueError(f"{root}/{MODEL_INDEX}: {what} must name a library and a class, or be [null, null]")
    cls = _component_class(library, class_name, what)
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{root}: missing folder {name!r} for {what}")
    kwargs: dict[str, Any] = {}
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        # transformers renamed `torch_dtype` to `dtype` in 4.56
        new_name = _is_transformers_model(cls) and _transformers_version() >= (4, 56)
        dtype_key = "dtype" if new_name else "torch_dtype"
        # a quantized component without a dtype loads in bfloat16 (Diffusers' default for torchao)
        default = torch.bfloat16 if quantization_config is not None else torch.float32
        kwargs[dtype_key] = dtype if dtype is not None else default
        kwargs["use_safetensors"] = use_safetensors
        if _folder_has_variant(folder, variant):  # else the plain weights, as Diffusers does
            kwargs["variant"] = variant
    elif quantization_config is not None:
        raise ValueError(f"quantization_config names {what}, which is not a torch model")
    post_quantize = isinstance(quantization_config, TorchAoConfig) and library not in RAPIDDIFF_LIBRARIES
    if quantization_config is not None and not post_quantize:
        kwargs["quantization_config"] = quantization_config  # rapiddiff models; transformers' own configs
    if library in RAPIDDIFF_LIBRARIES:
        return cls.from_pretrained(folder, **kwargs)
    try:  # transformers' errors about a corrupt file rarely name it
        component = cls.from_pretrained(folder, **kwargs)
    except Exception as e:
        raise ValueError(f"could not load {what} from {folder}: {_corrupt_files(folder)}{type(e).__name__}: {e}") from e
    # rapiddiff's TorchAoConfig on a transformers model: the same transform, applied once it is loaded
    return quantize_model(component, quantization_config) if post_quantize else component


def _corrupt_files(folder: Path) -> str:
    """Name the JSON files of a component folder that do not parse (the usual cause of a failed tokenizer load)."""
    bad = []
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            bad.append(f"{path} is not valid JSON ({e})")
    return "".join(f"{b}; " for b in bad)


def _save_component(
    component: Any, folder: Path, safe_serialization: bool, variant: str | None, max_shard_size: int | str | None
) -> None:
    if not hasattr(component, "save_pretrained"):
        raise TypeError(f"cannot save component {type(component).__name__} to {folder}: it has no save_pretrained")
    kwargs: dict[str, Any] = {}
    if isinstance(component, torch.nn.Module):
        refuse_save(component, f"saving {type(component).__name__} to {folder}")
        # Diffusers passes each option only to a save_pretrained that names it: transformers >= 5 has no
        # safe_serialization (it always writes safetensors), so safe_serialization=False is not an error there.
        accepted = inspect.signature(component.save_pretrained).parameters
        options = {"variant": variant, "max_shard_size": max_shard_size, "safe_serialization": safe_serialization}
        kwargs = {k: v for k, v in options.items() if k in accepted and not (k == "max_shard_size" and v is None)}
    component.save_pretrained(folder, **kwargs)


def _fetch_components(
    repo_id: str, names: list[str], variant: str | None, use_safetensors: bool | None, hub: dict[str, Any]
) -> Path:
    """Download (or find in the cache) model_index.json and the files of the components to load; the snapshot root.

    Online, the repo's file list picks exactly the needed weights (one variant, one format); offline, the cached
    snapshot is used as it is.
    """
    offline = hub["local_files_only"] or _hub_offline()
    files = None if offline else _list_repo_files(repo_id, hub)
    if files is None:
        patterns = [MODEL_INDEX, *(f"{n}/*" for n in names)]
        return resolve_dir(repo_id, allow_patterns=patterns, **{**hub, "local_files_only": True})
    wanted = [MODEL_INDEX]
    for name in names:
        inside = [f for f in files if f.startswith(f"{name}/") and f.count("/") == 1]
        wanted += [f for f in inside if not _is_weight(f) and not any(f.endswith(p[1:]) for p in IGNORED_REPO_PATTERNS)]
        wanted += pick_weight_files(inside, variant, use_safetensors)
    return resolve_dir(repo_id, allow_patterns=wanted, **hub)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _list_repo_files(repo_id: str, hub: dict[str, Any]) -> list[str] | None:
    import huggingface_hub

    try:
        return huggingface_hub.list_repo_files(repo_id, revision=hub["revision"], token=hub["token"])
    except Exception as e:  # no network: fall back to the local cache, which names itself if empty
        logger.warning("could not list the files of %r on the Hub (%s); using the local cache", repo_id, e)
        return None


def _indexed_components(directory: Path) -> list[str]:
    """The component folders an existing checkpoint's model_index.json names (they are replaced, not kept)."""
    try:
        index = read_json(directory / MODEL_INDEX)
    except (OSError, ValueError):
        return []
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple))]
