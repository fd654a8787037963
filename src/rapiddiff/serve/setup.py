"""How the served pipeline is made: one place for `rapiddiff serve` and for each of its Ray Serve replicas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import rapiddiff

from ..batch import checks
from ..compile import compile_pipeline
from ..configuration import read_json
from ..hub import resolve_file
from ..pipelines.loading import MODEL_INDEX

SERVED_CLASS = "StableDiffusionPipeline"


@dataclass(frozen=True)
class PipelineSetup:
    """The model to serve and the options that change the loaded pipeline. A value (it travels to Ray replicas):
    every process that serves builds its pipeline with `load`, so an option added here reaches all of them."""

    model: str  # a Diffusers-layout folder or a Hub id
    compile: bool = False  # rapiddiff.compile_pipeline

    def check(self) -> None:
        """What needs no weights (a Ray engine checks it before any replica starts): the model resolves (its
        model_index.json, from the Hub or its cache for an id) and names the pipeline class served. ValueError or
        OSError."""
        name = read_json(resolve_file(self.model, MODEL_INDEX)).get("_class_name")
        if name != SERVED_CLASS:
            raise ValueError(f"--model {self.model} loads as {name}; this server runs text-to-image Stable Diffusion "
                             f"checkpoints ({SERVED_CLASS})")  # fmt: skip

    def load(self) -> Any:
        """The pipeline, `check`ed, on this process's device (CUDA in float16 when there is one, else the CPU in
        float32), then `prepare`d. ValueError or OSError when the model cannot be served."""
        self.check()
        device = checks.resolve_device(None)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe = rapiddiff.DiffusionPipeline.from_pretrained(self.model, torch_dtype=dtype).to(device)
        return self.prepare(pipe)

    def prepare(self, pipe: Any) -> Any:
        """The options applied to a loaded pipeline, in order; the pipeline to serve. Each option that changes how
        the served pipeline runs (compiling, caching across steps) is a field of this class and is applied here."""
        pipe.set_progress_bar_config(disable=True)
        if self.compile:
            pipe = compile_pipeline(pipe)
        return pipe
