"""Batch generation from a prompt file: fixed chunks, one generator per image, atomic commits, resume.

Layout of the output folder DIR:

    DIR/run.json                      the run's settings (`fingerprint`), written with the first commit; a rerun with
                                      other settings is refused (or, with --overwrite, starts the folder afresh)
    DIR/.locks/                       the run's advisory locks (`lock.py`): a second run into the folder is refused
    DIR/images/NNNNNN/NNNNNNNNN.png   image number n (global, in prompt-file order), 1000 to a subfolder
    DIR/parts/CCCCCCCC.jsonl          chunk c's manifest lines; its existence commits the chunk
    DIR/manifest.jsonl                all parts merged, sorted by image number (written when every chunk is committed)

Images are numbered globally (line order, then image index within the line) and cut into chunks of `batch_size`; chunk
c goes to worker c mod W. Every image has its own generator (the line's seed + k, or --seed + n), and every chunk runs
as a batch of exactly `batch_size` (the last one padded, the padding discarded), so an image's pixels do not depend on
the number of workers or on what was already done. A chunk is written image by image (temporary name, then rename) and
committed by renaming its manifest part into place: a crash leaves uncommitted chunks, which a rerun regenerates whole.
Temporary names carry the writer's pid (`NAME.tmp-PID`); a failed write removes its own, and the next run removes
those of the chunks it takes (a chunk is only ever written by the worker holding its lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
from ..utils.file_hash import file_digests
from . import checks
from .files import TMP, atomic_write, save_synced, writing
from .lock import RunLock, setup_lock
from .prompts import ChunkIndex, Defaults, ImageTask, iter_chunk, scan_prompt_file

RUN_FILE = "run.json"
MANIFEST = "manifest.jsonl"
PARTS = "parts"
IMAGES = "images"
IMAGES_PER_FOLDER = 1000
FORMAT = 2  # 2: model files by content hash (1: by size)


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
    deepcache: str | None = None  # INTERVAL:BRANCH (DeepCache), None: off
    defaults: Defaults = field(init=False)

    def __post_init__(self) -> None:
        self.defaults = Defaults(self.negative_prompt, self.num_images, self.steps, self.guidance, self.seed)

    def fingerprint(self, index: ChunkIndex) -> dict[str, Any]:
        settings = {k: v for k, v in asdict(self).items() if k not in ("defaults", "model")}
        if self.deepcache is None:  # without DeepCache, run.json does not name it (runs written without it resume)
            del settings["deepcache"]
        return {
            "format": FORMAT,
            "settings": settings,
            "model": model_fingerprint(self.model),
            "prompts": {"sha256": index.sha256, "lines": index.num_lines, "images": index.total_images},
            "versions": {"rapiddiff": __version__, "torch": torch.__version__},
        }


def model_fingerprint(model: str) -> dict[str, Any]:
    """The checkpoint's files by content (blake2b of each whole file, cached by path, size and mtime: a weight file
    changed in place, even to the same size, is a different model); a hub id as is."""
    root = Path(os.path.expanduser(model))
    if not root.is_dir():
        return {"id": model}
    paths = sorted(
        p for p in root.rglob("*") if p.is_file() and not any(q.startswith(".") for q in p.relative_to(root).parts)
    )
    digests = file_digests(paths)
    return {"files": {p.relative_to(root).as_posix(): digests[p] for p in paths}}


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


def read_run_file(path: Path) -> dict[str, Any]:
    """run.json as written by `write_run_file`; ValueError naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a run file (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); corrupt?") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), dict):
        raise ValueError(f"{path}: not a run file (no 'prompts' section)")
    for section, key in (("prompts", "images"), ("settings", "batch_size")):
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {section}.{key} must be a positive integer, got {value!r}; corrupt?")
    return data


def check_run_file(layout: Layout, fingerprint: dict[str, Any], overwrite: bool = False) -> None:
    """Refuse a folder holding a run with other settings (a mix of settings is never resumed); with `overwrite`,
    clear that run's results instead. Called under the setup lock; run.json itself is written with the first commit
    (`write_run_file`), once the pipeline has accepted the settings."""
    if not layout.run_file.exists():
        return
    try:
        old = read_run_file(layout.run_file)
        problem = None
        old = {k: old.get(k) for k in fingerprint}
        if old != fingerprint:
            problem = f"holds a run with other settings ({'; '.join(_differences(old, fingerprint)[:6])})"
    except ValueError as e:
        problem = f"holds a run whose settings cannot be read ({e})"
    if problem is None:
        return
    if not overwrite:
        raise ValueError(
            f"{layout.root} {problem}: rerun with the same settings to resume it, use another --output folder, or "
            "pass --overwrite to discard that run's images"
        )
    clear_run(layout)


def clear_run(layout: Layout) -> None:
    """--overwrite: remove an earlier run's settings, commits, manifest and images (nothing else in the folder)."""
    for path in (layout.run_file, layout.manifest):
        path.unlink(missing_ok=True)
    for folder in (layout.parts, layout.root / IMAGES):
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            raise OSError(f"--overwrite: could not remove {folder}")


def write_run_file(layout: Layout, fingerprint: dict[str, Any]) -> None:
    """Under the setup lock, at a worker's first commit: write run.json, or check that it holds these settings (a run
    with other settings that started meanwhile wins; this one is refused before it writes an image)."""
    with setup_lock(layout.root):
        check_run_file(layout, fingerprint)
        if not layout.run_file.exists():
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
                 worker: str, fingerprint: dict[str, Any] | None = None):  # fmt: skip
        self.pipe, self.settings, self.prompts, self.index, self.layout = pipe, settings, prompts, index, layout
        # Written (or checked) as run.json before this runner's first image: None when the caller wrote it already.
        self.fingerprint = fingerprint
        # Timestamps (time.time()) in the worker field feed `rapiddiff bench scale`: ready = pipeline loaded.
        self.worker = {"name": worker, "host": socket.gethostname(), "pid": os.getpid(), "ready": time.time()}
        self.committed_here = 0

    def run_chunk(self, chunk: int) -> list[dict[str, Any]]:
        """Generate chunk `chunk`, write its images, commit it; returns its manifest records."""
        start = time.time()
        tasks = iter_chunk(self.prompts, self.index, chunk, self.settings.defaults)
        remove_stray_temporaries(self.layout, [t.n for t in tasks], chunk)
        images = self.generate(tasks)
        if self.fingerprint is not None:  # the pipeline accepted every setting: now the folder is this run's
            write_run_file(self.layout, self.fingerprint)
            self.fingerprint = None
        records = []
        for task, image in zip(tasks, images):
            path = self.layout.image(task.n)
            path.parent.mkdir(parents=True, exist_ok=True)
            with writing(path) as tmp:
                save_synced(image, tmp, "PNG")
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
    """Write DIR/manifest.jsonl from the parts if every chunk is committed; True if written. Under the setup lock:
    a manifest temporary found there is a leftover of a failed merge."""
    committed = layout.committed()
    if any(c not in committed for c in range(num_chunks)):
        return False
    with setup_lock(layout.root):
        for stray in layout.root.glob(f"{MANIFEST}{TMP}-*"):
            stray.unlink(missing_ok=True)
        with writing(layout.manifest) as tmp, open(tmp, "wb") as out:
            for c in range(num_chunks):
                out.write(layout.part(c).read_bytes())
    return True


def remove_stray_temporaries(layout: Layout, chunk_images: Iterable[int], chunk: int | None = None) -> None:
    """Temporaries a killed or failed run left for these images and chunk `chunk`'s part, whichever process wrote
    them: the chunk is regenerated whole by the one worker holding its lock, so they are garbage."""
    for n in chunk_images:
        path = layout.image(n)
        for stray in path.parent.glob(f"{path.name}{TMP}*"):
            stray.unlink(missing_ok=True)
    if chunk is not None:
        part = layout.part(chunk)
        for stray in part.parent.glob(f"{part.name}{TMP}*"):
            stray.unlink(missing_ok=True)


@dataclass
class BatchJob:
    """A validated run: settings, prompt index, output layout. `prepare` does every check before any model loads."""

    settings: BatchSettings
    prompts: Path
    index: ChunkIndex
    layout: Layout
    compile_cache: Path | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    # this process's worker lock on the folder (not sent to Ray actors: they work for the driver that holds it)
    lock: RunLock | None = field(default=None, repr=False, compare=False)

    @classmethod
    def prepare(cls, settings: BatchSettings, prompts: Path, output: Path, compile_cache: Path | None,
                worker: Worker | None = None, overwrite: bool = False) -> BatchJob:  # fmt: skip
        """Every check that needs no model (nothing written), then the folder's lock and its settings check."""
        checks.check_output_folder(output)
        if compile_cache is not None:
            checks.check_output_file(compile_cache, "--compile-cache")
        index = scan_prompt_file(prompts, settings.batch_size, settings.defaults)
        checks.check_request_memory(settings, index)
        fingerprint = settings.fingerprint(index)
        layout = Layout(output)
        worker = worker or Worker()
        lock = RunLock(output, worker.index, worker.count, worker.name)
        lock.acquire()
        try:
            with setup_lock(output, worker.name):
                check_run_file(layout, fingerprint, overwrite)
        except BaseException:
            lock.release()
            raise
        return cls(settings, prompts, index, layout, compile_cache, fingerprint, lock)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "lock": None}

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

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
            runner = ChunkRunner(pipe, job.settings, job.prompts, job.index, job.layout, worker.name, job.fingerprint)
            for done, chunk in enumerate(pending):
                if stop.set:
                    log(f"worker {worker.name}: SIGTERM: stopped after {done} chunk(s); rerun the command to resume")
                    return 143
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

    with writing(job.compile_cache) as tmp:
        save_compile_cache(tmp)
    log_stderr(f"worker {worker.name}: saved the compile cache {job.compile_cache}")


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
