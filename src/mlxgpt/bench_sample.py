"""Greedy sampling speed with and without the KV cache (`make bench-sample`); the tokens must agree."""
from __future__ import annotations

import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

import argparse
import time

import mlx.core as mx

from mlxgpt.cli import fail
from mlxgpt.errors import UserError
from mlxgpt.model import GPT, GPTConfig


def timed_greedy(model: GPT, prompt: mx.array, n_tokens: int, use_cache: bool) -> tuple[list[int], float]:
    """Greedily generated tokens and the seconds they took."""
    start = time.perf_counter()
    tokens = list(model.generate(prompt, n_tokens, temperature=0, use_cache=use_cache))
    return tokens, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-layer", type=int, default=6, help="default: the baby model (6/6/384, block 256)")
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=384)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=65, help="65: shakespeare_char")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for key, value in vars(args).items():
        minimum = {"seed": 0, "vocab_size": 2}.get(key, 1)
        if value < minimum:
            fail(f"--{key.replace('_', '-')} {value}: must be >= {minimum}; give a larger number")

    mx.random.seed(args.seed)
    config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    try:
        model = GPT(config)
    except UserError as e:  # a model shape that cannot be built (n_embd not divisible by n_head)
        fail(str(e))
    model.eval()
    mx.eval(model.parameters())
    prompt = mx.random.randint(0, config.vocab_size, (1, args.prompt_tokens))
    for use_cache in (True, False):  # warm-up: first-call kernel builds
        timed_greedy(model, prompt, 2, use_cache)
    cached, cached_s = timed_greedy(model, prompt, args.tokens, use_cache=True)
    uncached, uncached_s = timed_greedy(model, prompt, args.tokens, use_cache=False)
    assert cached == uncached, "greedy tokens differ with and without the KV cache"

    print(f"greedy sampling on {mx.default_device()}: {args.n_layer}L/{args.n_head}H/{args.n_embd}C, "
          f"block {args.block_size}, vocab {args.vocab_size}, prompt {args.prompt_tokens}, {args.tokens} new tokens")
    print("| KV cache | seconds | tokens/s |\n|---|---|---|")
    for name, seconds in (("on", cached_s), ("off", uncached_s)):
        print(f"| {name} | {seconds:.2f} | {args.tokens / seconds:.1f} |")
    print(f"speed-up: {uncached_s / cached_s:.2f}x (identical tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
