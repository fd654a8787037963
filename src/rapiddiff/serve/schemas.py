"""The body of POST /v1/images/generations: OpenAI's Images API fields plus the diffusion settings.

Every check runs before a request is queued. Field types and fixed ranges are the schema (422 when broken); what
depends on the served model and the server's settings (`ServedModel.resolve`) is a 400. Both name the field.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..batch.checks import MAX_SEED
from ..cli_generate import SCHEDULER_ALIASES

RESPONSE_FORMATS = ("b64_json",)
MAX_SIDE = 2048  # pixels: beyond this one request would hold the worker for minutes
MAX_STEPS = 200
MAX_GUIDANCE = 50.0
MAX_PROMPT_CHARS = 4000
SCHEDULERS = (*SCHEDULER_ALIASES, *SCHEDULER_ALIASES.values())


class ImageRequest(BaseModel):
    """The request body. Unknown fields are an error (nothing is silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(default=1, ge=1)
    size: str | None = Field(default=None, description="'WIDTHxHEIGHT'; default: the model's trained size")
    response_format: str = "b64_json"
    model: str | None = None
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int = Field(default=30, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, description="image k of the request gets seed + k")
    scheduler: str | None = None

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = SCHEDULER_ALIASES.get(value.lower(), value)
        if name not in SCHEDULER_ALIASES.values():
            raise ValueError(f"unknown scheduler {value!r}; allowed: {', '.join(SCHEDULERS)}")
        return name


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (OpenAI's order) -> (width, height); each a multiple of 8 (the pipelines' rule) in [8, MAX_SIDE]."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"size {text!r} must be 'WIDTHxHEIGHT', e.g. '512x512'")
    width, height = int(parts[0]), int(parts[1])
    for name, value in (("width", width), ("height", height)):
        if value % 8 or not 8 <= value <= MAX_SIDE:
            raise ValueError(f"size {text!r}: {name} {value} must be a multiple of 8 in [8, {MAX_SIDE}]")
    return width, height


class BatchKey(NamedTuple):
    """The settings one pipeline call shares: requests with equal keys may run as one batch."""

    height: int
    width: int
    steps: int
    guidance_scale: float  # one scalar per call; also decides guidance on/off (the UNet's batch doubles)
    scheduler: str | None  # a scheduler class name; None: the checkpoint's


@dataclass(frozen=True)
class ImageSpec:
    """A checked request with its defaults filled in: what the batcher needs to generate its images."""

    key: BatchKey
    prompt: str
    negative_prompt: str | None
    seeds: tuple[int, ...]  # one per image


class RequestError(Exception):
    """A request the server refuses: the HTTP status, the field (if one is at fault), the message, a metric reason."""

    def __init__(self, status: int, message: str, *, param: str | None = None, reason: str = "invalid_request",
                 retry_after: int | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.reason, self.retry_after = (
            status,
            message,
            param,
            reason,
            retry_after,
        )

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 and self.status != 429 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.reason}}


@dataclass(frozen=True)
class ServedModel:
    """What the server serves: the model's name (the --model value), its default size, the largest batch."""

    name: str
    default_width: int
    default_height: int
    max_batch_size: int

    def resolve(self, request: ImageRequest) -> ImageSpec:
        """The request checked against this server (400 naming the field), with defaults and seeds filled in."""
        if request.model is not None and request.model != self.name:
            raise RequestError(
                400, f"model {request.model!r} is not served here; allowed: {self.name!r}", param="model"
            )
        if request.response_format not in RESPONSE_FORMATS:
            hint = " (this server returns images inline, it stores none)" if request.response_format == "url" else ""
            raise RequestError(400, f"response_format {request.response_format!r} is not supported{hint}; allowed: "
                               f"{', '.join(map(repr, RESPONSE_FORMATS))}", param="response_format")  # fmt: skip
        if request.n > self.max_batch_size:
            raise RequestError(400, f"n={request.n}: this server generates at most {self.max_batch_size} image(s) per "
                               f"request (--max-batch-size); allowed: 1..{self.max_batch_size}", param="n")  # fmt: skip
        if request.seed is not None and request.seed > MAX_SEED - request.n:
            raise RequestError(400, f"seed {request.seed} must be in [0, {MAX_SEED - request.n}] for n={request.n} "
                               "(image k gets seed + k; torch generators take 64-bit seeds)", param="seed")  # fmt: skip
        if request.size is None:
            width, height = self.default_width, self.default_height
        else:
            width, height = parse_size(request.size)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        key = BatchKey(height, width, request.num_inference_steps, float(request.guidance_scale), request.scheduler)
        seeds = tuple(seed + k for k in range(request.n))
        return ImageSpec(key, request.prompt, request.negative_prompt, seeds)
