"""``python -m jaxvla.serving --checkpoint=DIR`` (or ``python -m jaxvla.serve``): load a policy
checkpoint, compile it, serve it until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

from jaxvla import compilation_cache
from jaxvla.policy import Policy
from jaxvla.serving.server import DEFAULT_MAX_INSTRUCTION_CHARS, TOKEN_ENV, PolicyServer

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve a jaxvla policy checkpoint over websockets.")
    parser.add_argument("--checkpoint", required=True, help="policy checkpoint directory")
    parser.add_argument(
        "--tokenizer_checkpoint",
        default=None,
        help="the image tokenizer's checkpoint, overriding the one the checkpoint bundles "
        "(<workdir>/assets/tokenizer, found relative to it) and the path finetuning recorded (older "
        "checkpoints copied to another machine)",
    )
    parser.add_argument(
        "--text_tokenizer",
        default=None,
        help="a SentencePiece file overriding the checkpoint's text tokenizer (its bundled copy in "
        "<workdir>/assets/text_tokenizer, or the default of the mistral-common wheel)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help="shared secret clients send as 'Authorization: Bearer <token>' or openpi's "
        f"'Authorization: Api-Key <token>' (default: ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--max_instruction_chars",
        type=int,
        default=DEFAULT_MAX_INSTRUCTION_CHARS,
        help="longer instructions are refused before inference (default: %(default)s)",
    )
    parser.add_argument(
        "--text_cache_size",
        type=int,
        default=None,
        help="instructions whose prompt ids the policy keeps, LRU (default: 1024)",
    )
    parser.add_argument(
        "--compilation_cache",
        default=None,
        help="persistent XLA compilation cache directory, or 'off' (default: $JAXVLA_COMPILATION_CACHE, "
        "else ~/.cache/jaxvla/xla)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request's timing")
    args = parser.parse_args(argv)
    if args.max_instruction_chars < 1:
        parser.error(f"--max_instruction_chars={args.max_instruction_chars}: expected >= 1")
    if args.text_cache_size is not None and args.text_cache_size < 0:
        parser.error(f"--text_cache_size={args.text_cache_size}: expected >= 0 (0 disables the cache)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose:  # our per-request timings, not websockets' frame dumps
        logging.getLogger("jaxvla.serving").setLevel(logging.DEBUG)

    logger.info("compilation cache: %s", compilation_cache.enable(args.compilation_cache) or "off")

    logger.info("Loading policy from %s", args.checkpoint)
    policy = Policy.from_checkpoint(args.checkpoint, text_cache_size=args.text_cache_size,
                                    tokenizer_checkpoint=args.tokenizer_checkpoint, text_tokenizer=args.text_tokenizer)
    # Compile before the first client connects, so its first request is as fast as the rest.
    start = time.perf_counter()
    warmup = {key: np.zeros(shape, dtype) for key, (shape, dtype) in policy.observation_spec().items()}
    policy.act(warmup, "warm up")
    logger.info("Policy compiled in %.1f s", time.perf_counter() - start)
    server = PolicyServer(
        policy,
        host=args.host,
        port=args.port,
        token=args.token,
        max_instruction_chars=args.max_instruction_chars,
    )
    logger.info("Policy metadata: %s", server.metadata)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("Interrupted; server stopped")


if __name__ == "__main__":
    main()
