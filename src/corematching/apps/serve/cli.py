"""`corematching serve`: an OpenAI-compatible HTTP server for a VLM under per-request sparsity.

    corematching serve                                    the bundled model, CoreMatching by default, 127.0.0.1:8000
    corematching serve --method dense --port 9000
    corematching serve --model llava-hf/llava-1.5-7b-hf --budget 0.25 --max-batch-size 16
    corematching serve --allowed-image-dir ./images       requests may name files under ./images
    corematching serve --host 0.0.0.0 --api-key KEY       on the network: clients send `Authorization: Bearer KEY`
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

API_KEY_VARIABLE = "COREMATCHING_API_KEY"
# Each batching's own admission wait (the options default to None, so that one given to the other batching is
# reported rather than ignored).
MAX_WAIT_MS = 20.0  # static: how long the oldest waiting request waits for batch mates
JOIN_WAIT_STEPS = 6  # continuous: decode steps an arrival may wait for others to share its prefill


def byte_count(text: str) -> int:
    """'1073741824', '512M', '2G', '64k' -> bytes."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a byte count (e.g. 1073741824, 512M, 2G), got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a byte count must be positive, got {text!r}")
    return value


def make_parser() -> argparse.ArgumentParser:
    from ..method_spec import add_method_arguments

    parser = argparse.ArgumentParser(prog="corematching serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="evqa-smollm2", help="evqa-smollm2, a hub id or a local path")
    parser.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: --model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests per batch (1: no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=None,
                        help="static batching: how long the oldest waiting request may wait for batch mates "
                             f"(default {MAX_WAIT_MS:g})")
    parser.add_argument("--batching", choices=["static", "continuous"], default="continuous",
                        help="continuous (default): requests join and leave the running batch at every decode step; "
                        "static: a batch runs until its longest request ends")
    parser.add_argument("--kv-cache-bytes", type=byte_count, default=None,
                        help="continuous batching: KV cache bytes the running requests may reserve (kept tokens "
                        "plus max_tokens, and sliced FFN weights); a request that can never fit gets 429")
    parser.add_argument("--join-wait-steps", type=int, default=None,
                        help="continuous batching: decode steps an arrival may wait while a batch runs, so that "
                             f"others share its prefill (default {JOIN_WAIT_STEPS}; 0: prefill each arrival at once)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting or running at most; one more gets 429")
    parser.add_argument("--max-images", type=int, default=1, help="images per request")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="prompt (images included) + max_tokens (default: the model's position limit)")
    parser.add_argument("--default-max-tokens", type=int, default=64)
    parser.add_argument("--default-temperature", type=float, default=0.0,
                        help="temperature of requests that give none (0: greedy, as the model's own config)")
    parser.add_argument("--allowed-image-dir", type=Path, default=None,
                        help="requests may name image files inside this directory (off by default)")
    # --prefix-cache*: the options' older names, still accepted
    parser.add_argument("--prompt-cache", "--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the pruned prefill of a repeated image + whole prompt (docs/serving.md)")
    parser.add_argument("--prompt-cache-size", "--prefix-cache-size", type=int, default=32,
                        help="prefills kept by --prompt-cache")
    parser.add_argument("--prompt-cache-bytes", "--prefix-cache-bytes", type=byte_count, default=2**30,
                        help="bytes of KV caches and logits kept by --prompt-cache (default 1G; e.g. 512M, 8G)")
    parser.add_argument("--max-body-bytes", type=byte_count, default=64 * 2**20,
                        help="largest request body (default 64M): counted as it arrives, chunked or not (413)")
    parser.add_argument("--body-timeout", type=float, default=60.0,
                        help="seconds a request body may take to arrive (408 after)")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="open connections at most; more get 503 (uvicorn's limit_concurrency; default: none)")
    parser.add_argument("--api-key", default=None,
                        help=f"require `Authorization: Bearer KEY` on every route but /health (401 otherwise); "
                             f"default: the {API_KEY_VARIABLE} environment variable, else no key")
    parser.add_argument("--allowed-hosts", default=None,
                        help="comma-separated host names the Host header may carry, against DNS rebinding (400 "
                             "otherwise; '*': any). Default: localhost, 127.0.0.1, [::1] when --host is a loopback "
                             "address, any otherwise")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--shutdown-timeout", type=float, default=60.0,
                        help="seconds accepted requests get to finish on shutdown")
    add_method_arguments(parser, "corematching")
    return parser


def build(args: argparse.Namespace):
    """The FastAPI app for parsed arguments (loads the model)."""
    import torch

    import corematching as cm

    from ...models import adapter_for
    from ..method_spec import from_args
    from .app import create_app
    from .guard import allowed_hosts_for
    from .prompt_cache import PromptCache
    from .protocol import Limits
    from .request_methods import check_for_model
    from .worker import ModelWorker

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_images < 0 or args.default_max_tokens < 1:
        raise ValueError("--max-images must be >= 0 and --default-max-tokens >= 1")
    if args.allowed_image_dir is not None and not args.allowed_image_dir.is_dir():
        raise FileNotFoundError(f"--allowed-image-dir is not a directory: {args.allowed_image_dir}")
    if args.prompt_cache_size < 1:
        raise ValueError("--prompt-cache-size must be >= 1")
    if args.body_timeout <= 0 or (args.max_connections is not None and args.max_connections < 1):
        raise ValueError("--body-timeout must be > 0 and --max-connections >= 1")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_VARIABLE) or None
    if api_key is not None and not api_key.strip():
        raise ValueError("--api-key is empty")
    ignored = "--max-wait-ms" if args.batching == "continuous" and args.max_wait_ms is not None else \
        "--join-wait-steps" if args.batching == "static" and args.join_wait_steps is not None else None
    if ignored:  # given, but the other batching's option: say so rather than ignore it silently
        logging.getLogger("corematching.apps.serve").warning(
            "%s does not apply to --batching %s; it is ignored (continuous batching: --join-wait-steps; static "
            "batching: --max-wait-ms)", ignored, args.batching)
    max_wait_ms = MAX_WAIT_MS if args.max_wait_ms is None else args.max_wait_ms
    join_wait_steps = JOIN_WAIT_STEPS if args.join_wait_steps is None else args.join_wait_steps
    allowed_hosts = allowed_hosts_for(args.allowed_hosts, args.host)
    method = from_args(args)
    if method.needs_calibration():  # TEAL: thresholds come from representative prompts, which a server lacks
        raise ValueError(
            f"--method {args.method} needs calibration on representative prompts (session.calibrate) before it can "
            "decode, and the server has none; serve a calibrated method instance from Python, or choose another"
        )
    model, processor = cm.load_model(args.model, device=args.device)
    num_layers = adapter_for(model).num_layers
    check_for_model(method, num_layers)
    text_config = model.config.get_text_config()
    max_model_len = args.max_model_len or getattr(text_config, "max_position_embeddings", None) or 4096
    limits = Limits(
        model_name=args.served_model_name or args.model,
        max_model_len=max_model_len,
        max_images=args.max_images,
        default_max_tokens=args.default_max_tokens,
        default_temperature=args.default_temperature,
        allowed_image_dir=args.allowed_image_dir,
        default_method=method,
        num_layers=num_layers,
    )
    prompt_cache = PromptCache(args.prompt_cache_size, args.prompt_cache_bytes) if args.prompt_cache else None
    worker = ModelWorker(model, processor, prompt_cache)
    return create_app(worker, limits, max_batch_size=args.max_batch_size, max_wait_s=max_wait_ms / 1000,
                      max_pending=args.max_queue, shutdown_timeout_s=args.shutdown_timeout,
                      max_body_bytes=args.max_body_bytes, api_key=api_key, allowed_hosts=allowed_hosts,
                      body_timeout_s=args.body_timeout, batching=args.batching,
                      kv_budget_bytes=args.kv_cache_bytes, join_wait_steps=join_wait_steps)


def main(argv: list[str]) -> int:
    import sys

    import uvicorn

    from ...errors import UnsupportedModelError
    from .guard import is_loopback

    args = make_parser().parse_args(argv)
    try:
        app = build(args)
    except (FileNotFoundError, ValueError, TypeError, UnsupportedModelError) as error:
        print(f"corematching serve: error: {error}", file=sys.stderr)
        return 2
    print(f"corematching serve: {args.model} on http://{args.host}:{args.port}/", flush=True)
    if not is_loopback(args.host) and args.api_key is None and not os.environ.get(API_KEY_VARIABLE):
        print("corematching serve: warning: listening beyond loopback without --api-key: anyone who reaches this "
              "port can use the model", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=int(args.shutdown_timeout), limit_concurrency=args.max_connections)
    return 0
