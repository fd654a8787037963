"""The environment a run was measured in: device, library versions, git revision, CPU."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO_DIR = Path(__file__).resolve().parents[3]  # src/rapiddiff/bench -> the checkout, when installed editable


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_revision() -> str | None:
    """Short commit of the checkout rapiddiff runs from, "+dirty" with uncommitted changes; None when installed."""
    if not (REPO_DIR / "src" / "rapiddiff" / "bench").is_dir():
        return None  # not a source checkout: any repository around site-packages says nothing about rapiddiff

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True, timeout=10)
        if out.returncode:
            raise OSError(out.stderr)
        return out.stdout.strip()

    try:
        revision = git("rev-parse", "--short", "HEAD")
        return revision + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "rapiddiff": _version("rapiddiff"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_revision": git_revision(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# What must agree for two runs' numbers to be compared in one table.
COMPARABLE_KEYS = ("device_name", "dtype", "torch", "rapiddiff", "diffusers")
