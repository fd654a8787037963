"""Prompt files for batch generation: JSON Lines or plain text, read as a stream.

A JSON Lines file (`.jsonl` / `.ndjson`) holds one object a line: `prompt` (required), and optionally `id`,
`negative_prompt`, `seed`, `num_images`, `steps`, `guidance`. Any other file is plain text, one prompt a line. Blank
lines are skipped in both; line numbers are the file's own (1-based).

`scan_prompt_file` reads the file once, reports every bad line (with its number) in one ValueError, and builds a
`ChunkIndex`: for each chunk of B images, where in the file it starts. A worker then reads only its own chunks
(`iter_chunk`), seeking to them: nothing holds the whole file, on any rank.
"""

from __future__ import annotations

import hashlib
import json
import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import MAX_SEED

JSONL_SUFFIXES = (".jsonl", ".ndjson")
LINE_KEYS = ("prompt", "id", "negative_prompt", "seed", "num_images", "steps", "guidance")
# Keys that would change the compiled shape of a chunk: refused per line, set once per run.
RUN_ONLY_KEYS = ("height", "width", "batch_size")
MAX_REPORTED = 20  # bad lines listed in the error (all are counted)


@dataclass(frozen=True)
class Defaults:
    """Run-wide values a line may override."""

    negative_prompt: str | None
    num_images: int
    steps: int
    guidance: float
    seed: int


@dataclass(frozen=True)
class PromptLine:
    line: int  # 1-based line number in the file
    id: str
    prompt: str
    negative_prompt: str | None
    seed: int | None  # the line's own seed (image k uses seed + k); None: the run's --seed + global image number
    num_images: int
    steps: int
    guidance: float


@dataclass(frozen=True)
class ImageTask:
    """One image: image `k` of a prompt line, global image number `n`, with its own seed."""

    n: int
    k: int
    seed: int
    entry: PromptLine


@dataclass
class ChunkIndex:
    """Where each chunk of `batch_size` images starts: byte offset of its first line, that line's number, the first
    image's index within the line and the global image number of the line's first image."""

    batch_size: int
    total_images: int
    offsets: array  # one entry per chunk, int64
    lines: array
    first_k: array
    sha256: str
    num_lines: int

    @property
    def num_chunks(self) -> int:
        return len(self.offsets)


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


def parse_line(text: str, number: int, jsonl: bool, defaults: Defaults) -> PromptLine:
    """One line of the file as a PromptLine; ValueError (without the line number) says what is wrong."""
    if not jsonl:
        return PromptLine(number, str(number), text, defaults.negative_prompt, None, defaults.num_images,
                          defaults.steps, defaults.guidance)  # fmt: skip
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    run_only = [k for k in obj if k in RUN_ONLY_KEYS]
    if run_only:
        raise ValueError(f"{', '.join(run_only)} cannot be set per line (it fixes the compiled shape): use the option")
    unknown = [k for k in obj if k not in LINE_KEYS]
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(LINE_KEYS)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"'prompt' must be a non-empty string, got {prompt!r}")
    line_id = obj.get("id", number)
    if isinstance(line_id, bool) or not isinstance(line_id, (str, int)):
        raise ValueError(f"'id' must be a string or an integer, got {line_id!r}")
    negative = obj.get("negative_prompt", defaults.negative_prompt)
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"'negative_prompt' must be a string, got {negative!r}")
    num_images = _int(obj, "num_images", defaults.num_images, 1, 10_000)
    seed = obj.get("seed")
    if seed is not None:
        seed = _int(obj, "seed", None, 0, MAX_SEED - num_images)
    steps = _int(obj, "steps", defaults.steps, 1, 10_000)
    guidance = obj.get("guidance", defaults.guidance)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"'guidance' must be a finite number, got {guidance!r}")
    if (guidance > 1) != (defaults.guidance > 1):
        # guidance <= 1 turns classifier-free guidance off, which halves the model's batch: another compiled shape.
        raise ValueError(
            f"'guidance' {guidance} and the run's --guidance {defaults.guidance} are on different sides of 1 "
            "(guidance <= 1 turns classifier-free guidance off and changes the batch shape)"
        )
    return PromptLine(number, str(line_id), prompt, negative, seed, num_images, steps, float(guidance))


def _int(obj: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"'{key}' must be an integer in [{low}, {high}], got {value!r}")
    return value


def _decode(raw: bytes, offset: int) -> str:
    """A line of the file without its newline; the file's first line loses a UTF-8 byte-order mark (utf-8-sig), as
    editors on Windows write one, so it never becomes part of the first prompt."""
    return raw.decode("utf-8-sig" if offset == 0 else "utf-8").rstrip("\r\n")


def _lines(path: Path, start: int = 0) -> Iterator[tuple[int, str]]:
    """(byte offset, decoded line without its newline) from `start`; blank lines included."""
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        for raw in f:
            yield offset, _decode(raw, offset)
            offset += len(raw)


def scan_prompt_file(path: str | Path, batch_size: int, defaults: Defaults) -> ChunkIndex:
    """Validate the whole file (every bad line reported, with its number) and index its chunks; see the module doc."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    jsonl = is_jsonl(path)
    errors: list[str] = []
    num_errors = 0
    digest = hashlib.sha256()
    offsets, lines, first_k = array("q"), array("q"), array("q")
    total = 0
    num_lines = 0
    number = 0
    with open(path, "rb") as f:
        offset = 0
        for number, raw in enumerate(f, start=1):
            digest.update(raw)
            line_offset, offset = offset, offset + len(raw)
            try:
                text = _decode(raw, line_offset)
            except UnicodeDecodeError as e:
                num_errors += 1
                if len(errors) < MAX_REPORTED:
                    errors.append(f"line {number}: not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                entry = parse_line(text, number, jsonl, defaults)
            except ValueError as e:
                num_errors += 1
                if len(errors) < MAX_REPORTED:
                    errors.append(f"line {number}: {e}")
                continue
            if entry.seed is None and defaults.seed + total + entry.num_images > MAX_SEED:
                num_errors += 1
                errors.append(f"line {number}: --seed {defaults.seed} + image number exceeds 2**64 - 1")
                continue
            num_lines += 1
            # Chunks whose first image falls on this line start here.
            first_chunk = -(-total // batch_size)
            for c in range(first_chunk, (total + entry.num_images - 1) // batch_size + 1):
                offsets.append(line_offset)
                lines.append(number)
                first_k.append(c * batch_size - total)
            total += entry.num_images
    if num_errors:
        more = f"\n  ... and {num_errors - len(errors)} more" if num_errors > len(errors) else ""
        raise ValueError(f"--prompts {path}: {num_errors} bad line(s):\n  " + "\n  ".join(errors) + more)
    if total == 0:
        raise ValueError(f"--prompts {path}: no prompts (the file has {number} line(s), all blank)")
    return ChunkIndex(batch_size, total, offsets, lines, first_k, digest.hexdigest(), num_lines)


def iter_chunk(path: Path, index: ChunkIndex, chunk: int, defaults: Defaults) -> list[ImageTask]:
    """The images of chunk `chunk` (at most batch_size; fewer only for the last chunk), read from the file."""
    if not 0 <= chunk < index.num_chunks:
        raise ValueError(f"chunk {chunk} out of range [0, {index.num_chunks})")
    jsonl = is_jsonl(path)
    n = chunk * index.batch_size
    end = min(n + index.batch_size, index.total_images)
    k = index.first_k[chunk]
    tasks: list[ImageTask] = []
    number = index.lines[chunk]
    for _, text in _lines(path, index.offsets[chunk]):
        if text.strip():
            entry = parse_line(text, number, jsonl, defaults)
            while k < entry.num_images and n < end:
                seed = entry.seed + k if entry.seed is not None else defaults.seed + n
                tasks.append(ImageTask(n, k, seed, entry))
                k, n = k + 1, n + 1
            if n >= end:
                break
            k = 0
        number += 1
    return tasks
