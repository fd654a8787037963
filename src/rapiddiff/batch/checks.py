"""Checks `rapiddiff generate` runs before it loads a model: a bad output path, device, seed or input image, an output
that exists, a request too large for the memory there is are one-line errors before any work, never a traceback
after it; and the one way it writes an output image."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..pipelines.checks import MemoryRequest, check_memory
from ..utils.atomic_io import process_alive

MAX_SEED = 2**64  # torch.Generator.manual_seed takes [0, 2**64)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def check_output_folder(path: Path, option: str = "-o/--output") -> None:
    """`path` is, or can become, a folder: not an existing file, with no file among its parents, writable."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: exists and is not a folder")
    _check_parents(path, option)


def check_output_file(path: Path, option: str = "-o/--output") -> None:
    """`path` can be written as a file: not a folder, its parent is (or can become) a writable folder."""
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder; give a file name ending in an image suffix, or a folder")
    _check_parents(path, option)


def _check_parents(path: Path, option: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{option} {path}: cannot write into {parent} (permission denied)")
            return


def resolve_device(text: str | None, local_rank: int = 0) -> torch.device:
    """--device as a torch.device, checked: default cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu."""
    if text is None:
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r}: not a device; use cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available on this machine")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: cuda:{index} does not exist ({torch.cuda.device_count()} GPU(s))")
        device = torch.device("cuda", index)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: MPS is not available on this machine")
    return device


def check_seed(seed: int | None, count: int = 1) -> None:
    """Seeds seed .. seed + count - 1 must all fit torch's generator."""
    if seed is not None and not 0 <= seed <= MAX_SEED - count:
        raise ValueError(f"--seed {seed}: must be in [0, {MAX_SEED - count}] (torch generators take 64-bit seeds)")


def open_image(path: Path, mode: str, option: str) -> Any:
    """The image at `path`, converted to `mode`; ValueError naming the option if it is missing or unreadable."""
    import PIL.Image

    if not path.is_file():
        raise ValueError(f"{option} {path}: no such file" if not path.exists() else f"{option} {path}: not a file")
    try:
        with PIL.Image.open(path) as image:
            return image.convert(mode)
    except (PIL.Image.UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{option} {path}: cannot read the image ({e})") from None


def check_not_there(paths: list[Path]) -> None:
    """Output images are never overwritten unless asked: an existing one is an error (before any model loads)."""
    there = [p for p in paths if os.path.lexists(p)]
    if there:
        more = f" and {len(there) - 1} more" if len(there) > 1 else ""
        raise ValueError(f"-o/--output: {there[0]}{more} already exists; pass --overwrite to replace, or another -o")


def write_image(image: Any, path: Path, overwrite: bool) -> None:
    """Write `image` whole at `path` (a pid-tagged temporary, then a rename); without `overwrite`, the final step is
    a hard link, which fails rather than replace a file another process wrote meanwhile. An OSError names the path;
    temporaries left by dead processes are removed first."""
    from .files import save_synced, writing  # one temporary-file rule for every output

    path.parent.mkdir(parents=True, exist_ok=True)
    for stray in path.parent.glob(f"{path.name}.tmp-*"):
        pid = stray.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            stray.unlink(missing_ok=True)
    with writing(path, replace=overwrite) as tmp:
        save_synced(image, tmp, _FORMATS.get(path.suffix.lower(), "PNG"))


_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _unet_config(model: str) -> tuple[dict[str, Any], int] | None:
    """(the UNet's config, the VAE's scale factor) of a local checkpoint folder; None for a Hub id or an unreadable
    config (the loader reports those, naming the file)."""
    root = Path(os.path.expanduser(model))
    try:
        unet = json.loads((root / "unet" / "config.json").read_text(encoding="utf-8"))
        vae_file = root / "vae" / "config.json"
        blocks = (
            json.loads(vae_file.read_text(encoding="utf-8")).get("block_out_channels") if vae_file.is_file() else None
        )
    except (OSError, ValueError):
        return None
    factor = 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else 1
    return (unet, factor) if isinstance(unet, dict) else None


def check_memory_before_loading(model: str, images: int, guidance: float, height: int | None, width: int | None,
                                dtype: torch.dtype, device: torch.device, what: str) -> None:  # fmt: skip
    """The pipelines' memory check (pipelines/checks.py), from the checkpoint's config files before it loads."""
    found = _unet_config(model) if height is not None and width is not None else None
    if found is None:
        return
    config, factor = found
    request = MemoryRequest.for_unet(config, images, guidance > 1, height, width, factor, dtype)
    check_memory(request, device, what)


def check_generate_memory(args: Any, device: torch.device, dtype: torch.dtype) -> None:
    """`rapiddiff generate PROMPT`: --num-images at --height x --width."""
    check_memory_before_loading(args.model, args.num_images, args.guidance, args.height, args.width, dtype, device,
                                f"--num-images {args.num_images} at --height {args.height} --width {args.width}")  # fmt: skip


def check_request_memory(settings: Any, index: Any) -> None:
    """`generate --prompts`: one call of --batch-size images at --height x --width (every chunk runs at that shape)."""
    dtype = getattr(torch, settings.dtype)
    check_memory_before_loading(settings.model, settings.batch_size, settings.guidance, settings.height,
                                settings.width, dtype, torch.device(settings.device_type),
                                f"--batch-size {settings.batch_size} at --height {settings.height} --width {settings.width}")  # fmt: skip
