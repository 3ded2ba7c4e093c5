"""`python -m rdlm.serve --checkpoint DIR`: an OpenAI-compatible server with continuous batching.

Any checkpoint `python -m rdlm.inference` reads (rdlm checkpoint, training run folder, HF huginn
directory). `--slots` requests decode together in one static cache of `--context` positions each;
prompts are prefilled `--chunk` tokens per step between decode steps. Per request, the body may set
`num_steps` (up to `--max-steps`), `exit_criterion`, `exit_threshold`, `continuous`, `init_scale`,
`top_k`, `min_p` beside OpenAI's fields. SIGTERM finishes requests in flight (up to
`--shutdown-timeout` seconds), then ends those left.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from rdlm.errors import ArgumentParser, cli
from rdlm.inference.cache import DECODE_BLOCK, STRATEGIES, cache_bytes
from rdlm.inference.checks import GenerateError, check_strategy
from rdlm.inference.cli import load_checkpoint
from rdlm.inference.criteria import CRITERIA
from rdlm.serve.app import Defaults, create_app
from rdlm.serve.engine import Engine, Plan
from rdlm.tokenizer import load_tokenizer

log = logging.getLogger("rdlm.serve")


def _positive(name: str, value: int, high: int | None = None) -> int:
    if value < 1 or (high is not None and value > high):
        raise GenerateError(f"{name}={value} is out of range; valid range is [1, {high if high else 'inf'}]")
    return value


@cli
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m rdlm.serve", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.dtype=bfloat16")
    parser.add_argument("--checkpoint", required=True, help="rdlm checkpoint, training run folder or HF directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: from --checkpoint)")
    parser.add_argument("--no-tokenizer", action="store_true", help="serve token ids only (a model without one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the model id (default: the checkpoint's folder)")
    parser.add_argument("--slots", type=int, default=16,
                        help="requests decoded together (a program is compiled for 1, 4, 16, ... busy slots up to "
                             "this, each with and without exit criteria)")
    parser.add_argument("--context", type=int, default=None, help="positions per slot (default: model.block_size)")
    parser.add_argument("--chunk", type=int, default=64, help="prompt tokens prefilled per engine step")
    parser.add_argument("--prefills", type=int, default=4, help="prompts prefilled per engine step")
    parser.add_argument("--tokens-per-step", type=int, default=4,
                        help="tokens decoded per slot between two looks of the host (stop strings, new requests)")
    parser.add_argument("--attention-block", type=int, default=DECODE_BLOCK,
                        help="cached positions attention reads at a time (only blocks below the longest slot are read)")
    parser.add_argument("--num-steps", type=int, default=32, help="default recurrences per token")
    parser.add_argument("--max-steps", type=int, default=None, help="largest num_steps a request may ask for "
                        "(default: --num-steps; the core cache holds this many steps per position)")
    parser.add_argument("--exit-criterion", choices=list(CRITERIA), default="none", help="default exit criterion")
    parser.add_argument("--exit-threshold", type=float, default=None, help="default: the official one")
    parser.add_argument("--cache-strategy", default="full", help=f"one of {', '.join(STRATEGIES)}")
    parser.add_argument("--continuous", action="store_true", help="default: warm-start each token's latent")
    parser.add_argument("--init-scale", type=float, default=1.0, help="default initial latent noise (0: zeros)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds SIGTERM waits for requests in flight")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    config, params = load_checkpoint(args.checkpoint, args.overrides)
    cfg = config.model
    tok = None
    if not args.no_tokenizer:
        tok = load_tokenizer(args.checkpoint, path=args.tokenizer, model_vocab_size=cfg.vocab_size,
                             fallback=config.data.tokenizer or None)
    context = _positive("--context", args.context or cfg.block_size, cfg.block_size)
    max_steps = _positive("--max-steps", args.max_steps or args.num_steps)
    _positive("--num-steps", args.num_steps, max_steps)
    _positive("--slots", args.slots)
    _positive("--max-queue", args.max_queue)
    check_strategy(args.cache_strategy, cfg)
    if args.request_timeout <= 0 or args.shutdown_timeout < 0:
        raise GenerateError("--request-timeout must be > 0 and --shutdown-timeout >= 0 seconds")
    if args.exit_threshold is not None and args.exit_criterion == "none":
        raise GenerateError("--exit-threshold was given without --exit-criterion")
    plan = Plan(slots=args.slots, context=context, chunk=_positive("--chunk", min(args.chunk, context), context),
                max_steps=max_steps, strategy=args.cache_strategy, prefills=_positive("--prefills", args.prefills),
                tokens=_positive("--tokens-per-step", args.tokens_per_step),
                block=_positive("--attention-block", args.attention_block))
    name = args.served_model_name or Path(args.checkpoint).resolve().name
    defaults = Defaults(num_steps=args.num_steps, exit_criterion=args.exit_criterion,
                        exit_threshold=args.exit_threshold, continuous=args.continuous, init_scale=args.init_scale,
                        timeout=args.request_timeout)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s", stream=sys.stderr)
    log.info("serving %s: %d slots x %d positions, chunk %d, up to %d recurrences per token; KV cache %.1f MiB; "
             "compiling %d step programs", name, plan.slots, plan.context, plan.chunk, plan.max_steps,
             cache_bytes(cfg, plan.slots, plan.context, plan.max_steps, plan.strategy) / 2**20, len(plan.programs()))
    app = create_app(Engine(params, cfg, tok, plan, max_queue=args.max_queue), tok, name, defaults)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
