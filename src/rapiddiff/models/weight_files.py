"""Model weight files in Diffusers' layout: names (variants, shards), writing (sharded safetensors or .bin), finding
and reading them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS_NAME = "diffusion_pytorch_model"

WEIGHT_EXTENSIONS = (".safetensors", ".bin")


def _add_variant(name: str, variant: str | None) -> str:
    """Diffusers' rule: the variant goes before the last extension (`x.fp16.safetensors`, `x.safetensors.index.fp16.json`)."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _weights_filename(base: str, ext: str, variant: str | None) -> str:
    return _add_variant(f"{base}.{ext}", variant)


def _not_model_file(name: str) -> bool:
    """Entries of an old model folder a new save carries over: anything but its config and weights."""
    return name != "config.json" and not name.endswith((*WEIGHT_EXTENSIONS, ".index.json")) and ".index." not in name


def parse_shard_size(value: int | str) -> int:
    """`max_shard_size`: bytes, or a string such as "5GB" / "100MB" / "10KiB" (as Diffusers and transformers)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
        text = value.strip().upper()
        for unit, factor in units.items():
            number = text.removesuffix(unit)
            if number != text:
                try:
                    size = float(number) * factor
                except ValueError:
                    break
                if size >= 1:
                    return int(size)
                break
    raise ValueError(f"max_shard_size must be a positive number of bytes or a size like '5GB', got {value!r}")


def write_weights(
    state: dict[str, torch.Tensor],
    folder: Path,
    base: str,
    variant: str | None,
    safe_serialization: bool,
    max_shard_size: int | str,
) -> list[Path]:
    """Write a state dict as Diffusers does: one file, or numbered shards plus an index when above max_shard_size."""
    from huggingface_hub import split_torch_state_dict_into_shards

    ext = "safetensors" if safe_serialization else "bin"
    name = _weights_filename(base, ext, variant)
    pattern = name.replace(f".{ext}", f"{{suffix}}.{ext}")
    split = split_torch_state_dict_into_shards(
        state, max_shard_size=parse_shard_size(max_shard_size), filename_pattern=pattern
    )
    written = []
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: state[k] for k in keys}
        path = folder / filename
        if safe_serialization:
            import safetensors.torch

            safetensors.torch.save_file(shard, str(path), metadata={"format": "pt"})
        else:
            torch.save(shard, path)
        written.append(path)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        path = folder / _add_variant(f"{base}.{ext}.index.json", variant)
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def find_weight_files(
    folder: Path, *, variant: str | None = None, use_safetensors: bool | None = None, base: str = WEIGHTS_NAME
) -> list[Path]:
    """The weight files of one component: a single file or the shards listed in an index, safetensors first."""
    exts = {None: ("safetensors", "bin"), True: ("safetensors",), False: ("bin", "safetensors")}[use_safetensors]
    for ext in exts:
        single = folder / _weights_filename(base, ext, variant)
        if single.is_file():
            return [single]
        index = folder / _add_variant(f"{base}.{ext}.index.json", variant)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index}: shard(s) {missing} missing")
            return [folder / s for s in shards]
    tried = ", ".join(_weights_filename(base, ext, variant) for ext in exts)
    present = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    last = _weights_filename(base, exts[-1], variant)
    raise FileNotFoundError(  # Diffusers' first sentence, which callers match
        f"Error no file named {last} found in directory {folder}. Looked for {tried}; the folder has {present}"
    )


def load_state_dict_file(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read one weight file on the CPU, casting floating tensors to `dtype`; a corrupt file names itself."""
    try:
        if path.name.endswith(".safetensors"):
            import safetensors.torch

            state = safetensors.torch.load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read weights file {path}: {type(e).__name__}: {e}") from e
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state
