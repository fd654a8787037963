"""The FastAPI app: POST /v1/images/generations (OpenAI's Images API), GET /, /health, /ready, /metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import io
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .batcher import Batcher, ServeSettings, answer_in_loop, timeout_error
from .metrics import Metrics
from .schemas import ImageRequest, RequestError, ServedModel


def served_model(pipe: Any, name: str, max_batch_size: int) -> ServedModel:
    """The model's name and default size (the UNet's trained size times the VAE factor, as the pipelines default)."""
    size = pipe.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    factor = pipe.vae_scale_factor
    return ServedModel(name, width * factor, height * factor, max_batch_size)


def create_app(pipe: Any, model_name: str, settings: ServeSettings) -> FastAPI:
    """An app serving `pipe` (loaded, on its device) under `model_name`. Its lifespan starts and stops the worker."""
    model = served_model(pipe, model_name, settings.max_batch_size)
    batcher: Batcher

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.drain()
            await asyncio.to_thread(batcher.stop)  # what was accepted still runs

    app = FastAPI(title="rapiddiff", lifespan=lifespan)
    metrics = Metrics(lambda: batcher.queued_images)
    batcher = Batcher(pipe, settings, metrics)
    app.state.batcher, app.state.metrics, app.state.model = batcher, metrics, model

    def refuse(error: RequestError) -> JSONResponse:
        metrics.rejections.labels(error.reason).inc()
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        detail = first["msg"].removeprefix("Value error, ")
        message = f"{param}: {detail}" if param else detail
        if first["type"] == "extra_forbidden":
            allowed = ", ".join(ImageRequest.model_fields)
            message = f"unknown field {param!r}; allowed: {allowed}"
        elif first["type"] == "json_invalid" or param is None:  # loc: ("body", offset) or ("body",)
            param = None
            message = f"the body must be a JSON object with a 'prompt' ({detail})"
        return refuse(RequestError(422, message, param=param))

    @app.post("/v1/images/generations")
    async def generate(body: ImageRequest, request: Request) -> Response:
        arrival = time.monotonic()
        try:
            spec = model.resolve(body)
            loop = asyncio.get_running_loop()
            answer: asyncio.Future = loop.create_future()
            job = batcher.submit(spec, settings.request_timeout, answer_in_loop(loop, answer))
        except RequestError as error:
            return refuse(error)
        disconnected = asyncio.ensure_future(_disconnect(request))
        try:
            finished, _ = await asyncio.wait(
                {answer, disconnected}, timeout=job.deadline - time.monotonic(), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            disconnected.cancel()
        if answer not in finished:
            batcher.cancel(job)  # not started: dropped; running: its images are discarded
            answer.cancel()
            if disconnected in finished:
                metrics.rejections.labels("client_disconnected").inc()
                return Response(status_code=499)  # nobody reads it
            return refuse(timeout_error(settings.request_timeout))
        try:
            images = answer.result()
        except RequestError as error:
            return refuse(error)
        data = await asyncio.to_thread(_encode, images, spec.seeds)
        metrics.latency.observe(time.monotonic() - arrival)
        return JSONResponse({"created": int(time.time()), "data": data})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model.name, "queued_images": batcher.queued_images}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = batcher.ready
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
        return page.replace("{{MODEL}}", html.escape(model.name)).replace(
            "{{SIZE}}", f"{model.default_width}x{model.default_height}"
        )

    return app


async def _disconnect(request: Request) -> None:
    """Returns when the client goes away (the body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _encode(images: list[Any], seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    data = []
    for image, seed in zip(images, seeds):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii"), "seed": seed})
    return data
