"""`rapiddiff serve --model PATH_OR_ID`: the HTTP image service (docs/serve.md).

rapiddiff serve --model ./sd15
rapiddiff serve --model runwayml/stable-diffusion-v1-5 --compile --max-batch-size 8 --batch-wait-ms 20 --port 8000

POST /v1/images/generations (OpenAI's Images API, b64_json), GET / (a small page), /health, /ready, /metrics.
SIGTERM: /ready turns 503, new requests get 503, accepted requests finish, then the process exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from typing import Any

DEFAULTS = {"max_batch_size": 4, "batch_wait_ms": 10.0, "max_queue": 64, "request_timeout": 300.0}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from ..batch.checks import positive_int
    from ..cli import add_model_argument, subcommand_parser

    parser = subcommand_parser(subparsers, "serve", "serve a model over HTTP", __doc__)
    add_model_argument(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the models; batches are padded to powers of two (few shapes to compile)")  # fmt: skip
    parser.add_argument("--max-batch-size", type=positive_int, default=DEFAULTS["max_batch_size"],
                        help=f"most images per pipeline call, and per request (default {DEFAULTS['max_batch_size']})")  # fmt: skip
    parser.add_argument("--batch-wait-ms", type=_non_negative, default=DEFAULTS["batch_wait_ms"],
                        help="how long a batch waits for more matching requests before it runs "
                             f"(default {DEFAULTS['batch_wait_ms']:g})")  # fmt: skip
    parser.add_argument("--max-queue", type=positive_int, default=DEFAULTS["max_queue"],
                        help=f"images waiting beyond this are refused with 429 (default {DEFAULTS['max_queue']})")  # fmt: skip
    parser.add_argument("--request-timeout", type=_positive, default=DEFAULTS["request_timeout"],
                        help="seconds from arrival to answer; later is a 504, and queued work is skipped "
                             f"(default {DEFAULTS['request_timeout']:g})")  # fmt: skip
    parser.set_defaults(func=run)
    return parser


def _non_negative(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    missing = [name for name in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"rapiddiff serve: error: needs {', '.join(missing)}: pip install 'rapiddiff[serve]'", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"rapiddiff serve: error: --port {args.port} must be in [1, 65535]", file=sys.stderr)
        return 2
    import torch
    import uvicorn

    import rapiddiff

    from ..batch import checks
    from ..compile import compile_pipeline
    from .app import create_app
    from .batcher import ServeSettings
    from .server import DrainingServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServeSettings(
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        pad_to_compiled=args.compile,
    )
    try:
        device = checks.resolve_device(None)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe = rapiddiff.DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
        if type(pipe) is not rapiddiff.StableDiffusionPipeline:
            raise ValueError(f"--model {args.model} loads as {type(pipe).__name__}; this server runs text-to-image "
                             "Stable Diffusion checkpoints (StableDiffusionPipeline)")  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"rapiddiff serve: error: {e}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(disable=True)
    if args.compile:
        pipe = compile_pipeline(pipe)
    app = create_app(pipe, args.model, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.request_timeout)
    DrainingServer(config, app.state.batcher).run()
    return 0
