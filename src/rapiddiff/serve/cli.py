"""`rapiddiff serve --model PATH_OR_ID`: the HTTP image service (docs/serve.md).

rapiddiff serve --model ./sd15
rapiddiff serve --model runwayml/stable-diffusion-v1-5 --compile --max-batch-size 8 --batch-wait-ms 20 --port 8000
rapiddiff serve --model ./sd15 --engine ray --replicas 4 --host 0.0.0.0     # Ray Serve: one replica per GPU

POST /v1/images/generations (OpenAI's Images API, b64_json), GET / (a small page), /health, /ready, /metrics.
SIGTERM: /ready turns 503, new requests get 503, accepted requests finish, then the process exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from typing import Any

ENGINES = ("uvicorn", "ray")
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
    parser.add_argument("--engine", choices=ENGINES, default="uvicorn",
                        help="uvicorn: one server in this process (default); ray: a Ray Serve deployment of "
                             "--replicas copies of it (pip install 'rapiddiff[ray]')")  # fmt: skip
    parser.add_argument("--replicas", type=positive_int, default=1,
                        help="--engine ray: the number of replicas, each one process with one pipeline (one GPU)")  # fmt: skip
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
    if args.engine != "ray" and args.replicas != 1:
        print(f"rapiddiff serve: error: --replicas {args.replicas} is for --engine ray; one uvicorn server runs one "
              "pipeline", file=sys.stderr)  # fmt: skip
        return 2
    import uvicorn

    from .app import create_app
    from .batcher import ServeSettings
    from .server import DrainingServer
    from .setup import PipelineSetup

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    setup = PipelineSetup(args.model, compile=args.compile)
    settings = ServeSettings(
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        pad_to_compiled=args.compile,
    )
    if args.engine == "ray":
        try:
            from .ray_engine import run_ray

            setup.check()  # here, not after Ray has retried each replica
        except ImportError as e:  # Ray, or one of Ray Serve's own dependencies
            print(f"rapiddiff serve: error: --engine ray needs Ray Serve: pip install 'rapiddiff[ray]' ({e})",
                  file=sys.stderr)  # fmt: skip
            return 2
        except (ValueError, OSError) as e:
            print(f"rapiddiff serve: error: {e}", file=sys.stderr)
            return 2
        return run_ray(setup, settings, args.replicas, args.host, args.port)
    try:
        pipe = setup.load()
    except (ValueError, OSError) as e:
        print(f"rapiddiff serve: error: {e}", file=sys.stderr)
        return 2
    app = create_app(pipe, args.model, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.request_timeout)
    DrainingServer(config, app.state.batcher).run()
    return 0
