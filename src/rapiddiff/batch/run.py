"""Batch generation from a prompt file: fixed chunks, one generator per image, atomic commits, resume.

Layout of the output folder DIR:

    DIR/run.json                      the run's settings (`fingerprint`); a rerun with other settings is refused
    DIR/images/NNNNNN/NNNNNNNNN.png   image number n (global, in prompt-file order), 1000 to a subfolder
    DIR/parts/CCCCCCCC.jsonl          chunk c's manifest lines; its existence commits the chunk
    DIR/manifest.jsonl                all parts merged, sorted by image number (written when every chunk is committed)

Images are numbered globally (line order, then image index within the line) and cut into chunks of `batch_size`; chunk
c goes to worker c mod W. Every image has its own generator (the line's seed + k, or --seed + n), and every chunk runs
as a batch of exactly `batch_size` (the last one padded, the padding discarded), so an image's pixels do not depend on
the number of workers or on what was already done. A chunk is written image by image (temporary name, then rename) and
committed by renaming its manifest part into place: a crash leaves uncommitted chunks, which a rerun regenerates whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..exports import __version__
from . import checks
from .prompts import ChunkIndex, Defaults, ImageTask, iter_chunk, scan_prompt_file

RUN_FILE = "run.json"
MANIFEST = "manifest.jsonl"
PARTS = "parts"
IMAGES = "images"
IMAGES_PER_FOLDER = 1000
TMP = ".tmp"
FORMAT = 1


@dataclass(frozen=True)
class Worker:
    """Which share of the chunks this process generates: chunk c is ours iff c % count == index."""

    index: int = 0
    count: int = 1
    local_rank: int = 0
    name: str = "0/1"

    @classmethod
    def from_env(cls, num_shards: int = 1, shard_index: int = 0) -> Worker:
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent: one worker), within shard `shard_index` of `num_shards`."""
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"--shard-index {shard_index}: must be in [0, {num_shards}) for --num-shards {num_shards}")
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
        index, count = shard_index * world + rank, num_shards * world
        return cls(index, count, int(os.environ.get("LOCAL_RANK", 0)), f"{index}/{count}")


@dataclass
class BatchSettings:
    """Everything that decides the pixels (compared between runs through run.json), and what does not."""

    model: str
    batch_size: int
    seed: int
    steps: int
    guidance: float
    negative_prompt: str | None
    num_images: int
    height: int | None
    width: int | None
    scheduler: str | None
    attention: str
    dtype: str
    device_type: str
    compile: bool
    defaults: Defaults = field(init=False)

    def __post_init__(self) -> None:
        self.defaults = Defaults(self.negative_prompt, self.num_images, self.steps, self.guidance, self.seed)

    def fingerprint(self, index: ChunkIndex) -> dict[str, Any]:
        settings = {k: v for k, v in asdict(self).items() if k not in ("defaults", "model")}
        return {
            "format": FORMAT,
            "settings": settings,
            "model": model_fingerprint(self.model),
            "prompts": {"sha256": index.sha256, "lines": index.num_lines, "images": index.total_images},
            "versions": {"rapiddiff": __version__, "torch": torch.__version__},
        }


def model_fingerprint(model: str) -> dict[str, Any]:
    """The checkpoint's files: every file's size, and the hash of its small (config, tokenizer) files; a hub id as is."""
    root = Path(os.path.expanduser(model))
    if not root.is_dir():
        return {"id": model}
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        size = path.stat().st_size
        small = path.suffix in (".json", ".txt", ".model") and size < 16 * 2**20
        files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if small else size
    return {"files": files}


class Layout:
    """Paths in the output folder (see the module doc)."""

    def __init__(self, root: Path):
        self.root = root
        self.run_file = root / RUN_FILE
        self.manifest = root / MANIFEST
        self.parts = root / PARTS

    def image(self, n: int) -> Path:
        return self.root / IMAGES / f"{n // IMAGES_PER_FOLDER:06d}" / f"{n:09d}.png"

    def part(self, chunk: int) -> Path:
        return self.parts / f"{chunk:08d}.jsonl"

    def committed(self) -> set[int]:
        if not self.parts.is_dir():
            return set()
        return {int(p[:-6]) for p in os.listdir(self.parts) if p.endswith(".jsonl") and p[:-6].isdigit()}


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file renamed into place (readers see all of it or nothing)."""
    tmp = path.with_name(path.name + TMP + f"-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_run_file(layout: Layout, fingerprint: dict[str, Any]) -> None:
    """Write run.json on the first run; on a rerun, refuse any difference (a mix of settings is never resumed)."""
    if layout.run_file.exists():
        old = json.loads(layout.run_file.read_text())
        old = {k: old.get(k) for k in fingerprint}
        if old != fingerprint:
            diffs = _differences(old, fingerprint)
            raise ValueError(
                f"{layout.root} holds a run with other settings ({'; '.join(diffs[:6])}): "
                "rerun with the same settings to resume it, or use another --output folder"
            )
        return
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write(layout.run_file, (json.dumps(fingerprint, indent=1, sort_keys=True) + "\n").encode())


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: was {_short(old)}, now {_short(new)}"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def pixel_hash(image: Any) -> str:
    """sha256 of the decoded pixels (mode, size, bytes): independent of the PNG encoder."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class StopFlag:
    """Set by SIGTERM: the worker finishes the chunk it is on, commits it and stops."""

    def __init__(self) -> None:
        self.set = False
        self._previous: Any = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.set = True


class ChunkRunner:
    """Generates and commits whole chunks with one loaded pipeline; shared by the torchrun and Ray engines."""

    def __init__(self, pipe: Any, settings: BatchSettings, prompts: Path, index: ChunkIndex, layout: Layout,
                 worker: str):  # fmt: skip
        self.pipe, self.settings, self.prompts, self.index, self.layout = pipe, settings, prompts, index, layout
        # Timestamps (time.time()) in the worker field feed `rapiddiff bench scale`: ready = pipeline loaded.
        self.worker = {"name": worker, "host": socket.gethostname(), "pid": os.getpid(), "ready": time.time()}
        self.committed_here = 0

    def run_chunk(self, chunk: int) -> list[dict[str, Any]]:
        """Generate chunk `chunk`, write its images, commit it; returns its manifest records."""
        start = time.time()
        tasks = iter_chunk(self.prompts, self.index, chunk, self.settings.defaults)
        images = self.generate(tasks)
        records = []
        for task, image in zip(tasks, images):
            path = self.layout.image(task.n)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + TMP)  # deterministic: a rerun overwrites a stray one
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
            records.append(self.record(task, path, pixel_hash(image), chunk))
        end = time.time()
        for record in records:
            record["worker"] |= {"chunk_start": start, "chunk_end": end}
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        self.layout.parts.mkdir(parents=True, exist_ok=True)
        atomic_write(self.layout.part(chunk), data)  # the commit
        self.committed_here += 1
        return records

    def generate(self, tasks: list[ImageTask]) -> list[Any]:
        """The chunk's images; each (steps, guidance) group runs as one call padded to batch_size."""
        groups: dict[tuple[int, float], list[int]] = {}
        for i, task in enumerate(tasks):
            groups.setdefault((task.entry.steps, task.entry.guidance), []).append(i)
        images: list[Any] = [None] * len(tasks)
        size = self.settings.batch_size
        for (steps, guidance), members in groups.items():
            batch = [tasks[i] for i in members]
            batch += [batch[-1]] * (size - len(batch))  # padding: same shape every call, results discarded
            negatives = [t.entry.negative_prompt for t in batch]
            out = self.pipe(
                prompt=[t.entry.prompt for t in batch],
                negative_prompt=None if all(n is None for n in negatives) else [n or "" for n in negatives],
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=self.settings.height,
                width=self.settings.width,
                generator=[torch.Generator("cpu").manual_seed(t.seed) for t in batch],
                output_type="pil",
            )
            for i, image in zip(members, out.images):
                images[i] = image
        return images

    def record(self, task: ImageTask, path: Path, digest: str, chunk: int) -> dict[str, Any]:
        e = task.entry
        return {
            "n": task.n,
            "id": e.id,
            "line": e.line,
            "image_index": task.k,
            "prompt": e.prompt,
            "negative_prompt": e.negative_prompt,
            "seed": task.seed,
            "steps": e.steps,
            "guidance": e.guidance,
            "height": self.settings.height,
            "width": self.settings.width,
            "file": path.relative_to(self.layout.root).as_posix(),
            "sha256": digest,
            "chunk": chunk,
            "worker": dict(self.worker),
        }


def merge_manifest(layout: Layout, num_chunks: int) -> bool:
    """Write DIR/manifest.jsonl from the parts if every chunk is committed; True if written."""
    committed = layout.committed()
    if any(c not in committed for c in range(num_chunks)):
        return False
    tmp = layout.manifest.with_name(MANIFEST + TMP + f"-{os.getpid()}")
    with open(tmp, "wb") as out:
        for c in range(num_chunks):
            out.write(layout.part(c).read_bytes())
    os.replace(tmp, layout.manifest)  # several workers may merge at once: each writes the same file
    return True


def remove_stray_temporaries(layout: Layout, chunk_images: Iterable[int]) -> None:
    """Temporaries a crashed run left for these images (the chunk is regenerated whole, so they are garbage)."""
    for n in chunk_images:
        path = layout.image(n)
        path.with_name(path.name + TMP).unlink(missing_ok=True)


@dataclass
class BatchJob:
    """A validated run: settings, prompt index, output layout. `prepare` does every check before any model loads."""

    settings: BatchSettings
    prompts: Path
    index: ChunkIndex
    layout: Layout
    compile_cache: Path | None = None

    @classmethod
    def prepare(cls, settings: BatchSettings, prompts: Path, output: Path, compile_cache: Path | None) -> BatchJob:
        checks.check_output_folder(output)
        if compile_cache is not None:
            checks.check_output_file(compile_cache, "--compile-cache")
        index = scan_prompt_file(prompts, settings.batch_size, settings.defaults)
        layout = Layout(output)
        check_run_file(layout, settings.fingerprint(index))
        return cls(settings, prompts, index, layout, compile_cache)

    def pending(self, worker: Worker) -> list[int]:
        """This worker's chunks that are not committed yet."""
        committed = self.layout.committed()
        return [c for c in range(worker.index, self.index.num_chunks, worker.count) if c not in committed]

    def chunk_images(self, chunk: int) -> range:
        start = chunk * self.index.batch_size
        return range(start, min(start + self.index.batch_size, self.index.total_images))


def run_workers(job: BatchJob, worker: Worker, load: Callable[[], Any], log: Callable[[str], None]) -> int:
    """The torchrun engine's worker: generate this worker's pending chunks; 0 when done, 143 when stopped by SIGTERM."""
    pending = job.pending(worker)
    stop = StopFlag()
    stop.install()
    try:
        if pending:
            start = time.perf_counter()
            pipe = warm_pipeline(load, job, worker)
            log(
                f"worker {worker.name}: {len(pending)} chunk(s) to do, pipeline ready in {time.perf_counter() - start:.1f}s"
            )
            runner = ChunkRunner(pipe, job.settings, job.prompts, job.index, job.layout, worker.name)
            for done, chunk in enumerate(pending):
                if stop.set:
                    log(f"worker {worker.name}: SIGTERM: stopped after {done} chunk(s); rerun the command to resume")
                    return 143
                remove_stray_temporaries(job.layout, job.chunk_images(chunk))
                runner.run_chunk(chunk)
                if done == 0:
                    save_compile_cache_once(job, worker)
        else:
            log(f"worker {worker.name}: nothing to do (all its chunks are committed)")
        if stop.set:
            return 143
    finally:
        stop.uninstall()
    if merge_manifest(job.layout, job.index.num_chunks):
        log(f"worker {worker.name}: all {job.index.total_images} image(s) done: {job.layout.manifest}")
    return 0


def warm_pipeline(load: Callable[[], Any], job: BatchJob, worker: Worker) -> Any:
    """Load the pipeline; with --compile-cache, first load the compile artifacts an earlier run saved."""
    if job.compile_cache is not None and job.compile_cache.is_file():
        from ..compile import load_compile_cache

        load_compile_cache(job.compile_cache)
        log_stderr(f"worker {worker.name}: loaded the compile cache {job.compile_cache}")
    pipe = load()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_compile_cache_once(job: BatchJob, worker: Worker) -> None:
    """After its first chunk, worker 0 of a run with --compile-cache and no cache file yet saves the artifacts."""
    if job.compile_cache is None or job.compile_cache.exists() or worker.index != 0 or not job.settings.compile:
        return
    from ..compile import save_compile_cache

    tmp = job.compile_cache.with_name(job.compile_cache.name + TMP + f"-{os.getpid()}")
    save_compile_cache(tmp)
    os.replace(tmp, job.compile_cache)
    log_stderr(f"worker {worker.name}: saved the compile cache {job.compile_cache}")


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
