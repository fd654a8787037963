"""Finding checkpoint files: a local folder, or a Hugging Face Hub id resolved through huggingface_hub.

huggingface_hub honours HF_HUB_OFFLINE and its local cache; `local_files_only=True` never touches the network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Weight formats we never download from a repo (other frameworks, original single-file checkpoints).
IGNORED_REPO_PATTERNS = ("*.msgpack", "*.onnx", "*.onnx_data", "*.h5", "*.ckpt", "*.pb", "*.ot", "*.tflite")


def _is_local(name_or_path: str | os.PathLike) -> bool:
    s = str(name_or_path)
    return os.path.isdir(s) or s.startswith((".", "/", "~")) or os.sep in s and s.count("/") > 1


def resolve_dir(
    name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    *,
    allow_patterns: Sequence[str] | None = None,
    local_files_only: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    **_: Any,
) -> Path:
    """Return a local folder holding the checkpoint (downloading the needed files of a hub repo if necessary)."""
    if _is_local(name_or_path):
        root = Path(os.path.expanduser(str(name_or_path)))
        if root.is_file():
            raise NotADirectoryError(
                f"{str(name_or_path)!r} is a file, but from_pretrained expects a checkpoint folder (Diffusers' layout); "
                "a single-file checkpoint (.safetensors / .ckpt in the original layout) loads with from_single_file"
            )
        if not root.is_dir():
            raise FileNotFoundError(f"checkpoint folder {str(name_or_path)!r} does not exist")
    else:
        root = _snapshot(
            str(name_or_path),
            allow_patterns=allow_patterns,
            local_files_only=local_files_only,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
        )
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint {str(name_or_path)!r} has no subfolder {subfolder!r} (looked in {folder})")
    return folder


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    subfolder: str | None = None,
    **hub_kwargs: Any,
) -> Path:
    """Return the local path of one file of a checkpoint; a missing file is a FileNotFoundError naming it."""
    if _is_local(name_or_path):
        folder = resolve_dir(name_or_path, subfolder, **hub_kwargs)
    else:
        pattern = f"{subfolder}/{filename}" if subfolder else filename
        folder = resolve_dir(name_or_path, subfolder, allow_patterns=[pattern], **hub_kwargs)
    path = folder / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename!r} not found in {folder}")
    return path


def given_weight_file(
    source: str | os.PathLike, weight_name: str | None, subfolder: str | None, **hub_kwargs: Any
) -> Path | None:
    """`source` itself when it is a file, else file `weight_name` of the folder or Hub repo `source` when given;
    None: neither (the caller looks for its default file names)."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        return path
    if weight_name is not None:
        return resolve_file(source, weight_name, subfolder, **hub_kwargs)
    return None


def _snapshot(repo_id: str, *, allow_patterns: Sequence[str] | None, local_files_only: bool, **kwargs: Any) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    try:
        path = huggingface_hub.snapshot_download(
            repo_id,
            allow_patterns=list(allow_patterns) if allow_patterns else None,
            ignore_patterns=list(IGNORED_REPO_PATTERNS),
            local_files_only=local_files_only,
            **{k: v for k, v in kwargs.items() if v is not None},
        )
    except HFValidationError as e:
        raise FileNotFoundError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({e})") from e
    except Exception as e:  # offline with no cache, unknown repo, no network...
        raise FileNotFoundError(
            f"could not find {repo_id!r} locally or in the Hugging Face cache"
            f"{' (offline)' if local_files_only or os.environ.get('HF_HUB_OFFLINE') else ''}: {e}"
        ) from e
    return Path(path)
