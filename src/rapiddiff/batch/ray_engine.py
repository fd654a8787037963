"""`rapiddiff generate --prompts FILE --engine ray --workers N`: the same chunks, run as Ray Data actors.

Each actor loads one pipeline (on one GPU when the cluster has GPUs: `num_gpus=1`) and runs `ChunkRunner.run_chunk`
on the chunks Ray hands it, so the files, manifest, seeds and resume are those of the torchrun engine; Ray adds load
balancing (a slow or lost actor's chunks go to the others) and task retries. `RAY_ADDRESS` selects a cluster; without
it a local Ray starts. Install with `pip install 'rapiddiff[ray]'`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from ..utils.ray_cluster import ray_session
from .run import BatchJob, ChunkRunner, Worker, merge_manifest, warm_pipeline

RETRIES = 3  # actor restarts and chunk retries before the job fails (a retried chunk is regenerated whole)


class ChunkActor:
    """One pipeline; called with a batch of chunk numbers, generates and commits them."""

    def __init__(self, job: BatchJob, args: argparse.Namespace, load_pipeline: Callable[..., Any], dtype: torch.dtype):
        import ray

        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU: it is cuda:0 here.
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.job = job
        pipe = warm_pipeline(lambda: load_pipeline(args, device, dtype), job, Worker())
        name = f"ray-{ray.get_runtime_context().get_actor_id()[:8]}"
        self.runner = ChunkRunner(pipe, job.settings, job.prompts, job.index, job.layout, name, job.fingerprint)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = []
        for chunk in batch["chunk"]:
            chunk = int(chunk)
            images.append(len(self.runner.run_chunk(chunk)))
        return {"chunk": list(batch["chunk"]), "images": images}


def run_ray(
    job: BatchJob,
    args: argparse.Namespace,
    load_pipeline: Callable[..., Any],
    dtype: torch.dtype,
    workers: int,
    log: Callable[[str], None],
) -> int:
    """Every pending chunk of the job through `workers` Ray actors, then the merged manifest; returns 0."""
    try:
        import ray.data  # noqa: F401
    except ModuleNotFoundError as e:
        raise ValueError(f"--engine ray needs Ray Data: pip install 'rapiddiff[ray]' ({e})") from None
    pending = job.pending(Worker())
    if pending:  # a local Ray: one CPU per actor and one for Ray Data's own tasks
        with ray_session(num_cpus=workers + 1, log_to_driver=False):
            run_chunks(job, args, load_pipeline, dtype, workers, pending, log)
    else:
        log("ray: nothing to do (every chunk is committed)")
    if merge_manifest(job.layout, job.index.num_chunks):
        log(f"ray: all {job.index.total_images} image(s) done: {job.layout.manifest}")
    return 0


def run_chunks(
    job: BatchJob,
    args: argparse.Namespace,
    load_pipeline: Callable[..., Any],
    dtype: torch.dtype,
    workers: int,
    pending: list[int],
    log: Callable[[str], None],
) -> None:
    """The pending chunks through a pool of `workers` ChunkActors; returns when all are committed."""
    import ray
    import ray.data

    gpus = ray.cluster_resources().get("GPU", 0) > 0
    ds = ray.data.from_items([{"chunk": c} for c in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(
        ChunkActor,
        fn_constructor_args=(job, args, load_pipeline, dtype),
        batch_size=1,
        concurrency=workers,
        num_gpus=1 if gpus else 0,
        num_cpus=1,
        max_restarts=RETRIES,
        max_task_retries=RETRIES,
    )
    for done, row in enumerate(ds.iter_rows(), start=1):
        log(f"ray: chunk {row['chunk']} committed ({done}/{len(pending)})")
