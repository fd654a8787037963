"""Checks `rapiddiff generate` runs before it loads a model: a bad output path, device, seed or input image is a
one-line error before any work, never a traceback after it (issue 14: nothing lost)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

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
