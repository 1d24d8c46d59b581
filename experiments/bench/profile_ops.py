"""Where a training step's time goes on this device: each op of one baby-model layer (6L/6H/384, T256) at batch B,
compiled, forward and backward (vjp w.r.t. the input), best of a few runs.

    python experiments/bench/profile_ops.py [--batch 8]
"""
import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

import argparse
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from mlxgpt.fastmath import dropout, gelu_tanh, softmax
from mlxgpt.model import CausalSelfAttention, GPTConfig


def best_ms(fn, *args, reps: int = 5) -> float:
    mx.eval(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def forward_and_vjp(fn, *args) -> tuple[float, float]:
    vjp = mx.compile(lambda *xs: mx.vjp(fn, list(xs), [mx.ones_like(fn(*xs))])[1])
    return best_ms(mx.compile(fn), *args), best_ms(vjp, *args)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    B, T, C, H = parser.parse_args().batch, 256, 384, 6
    x, hidden = mx.random.normal((B, T, C)), mx.random.normal((B, T, 4 * C))
    q, k, v = (mx.random.normal((B, H, T, C // H)) for _ in range(3))
    w_fc, w_ln, b_ln = mx.random.normal((4 * C, C)) * 0.02, mx.ones((C,)), mx.zeros((C,))
    scores = mx.random.normal((B, H, T, T))
    attention = CausalSelfAttention(GPTConfig(block_size=T, n_layer=6, n_head=H, n_embd=C, dropout=0.0))
    ops = {
        "layer_norm": (lambda x: mx.fast.layer_norm(x, w_ln, b_ln, 1e-5), x),
        "attention (sdpa, causal)": (lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=C ** -0.5,
                                                                                           mask="causal"), q, k, v),
        "attention (mlxgpt explicit: fastmath softmax)": (partial(attention._explicit_attention, scale=C ** -0.5),
                                                          q, k, v),
        "mx.softmax (B, H, T, T)": (lambda s: mx.softmax(s, axis=-1), scores),
        "fastmath.softmax": (softmax, scores),
        "linear C -> 4C": (lambda x: x @ w_fc.T, x),
        "nn.gelu_approx (MLX)": (nn.gelu_approx, hidden),
        "gelu_tanh (mlxgpt)": (gelu_tanh, hidden),
        "dropout 0.2 (B, H, T, T), MLX bernoulli mask": (lambda s: mx.random.bernoulli(0.8, s.shape) * s / 0.8, scores),
        "fastmath.dropout 0.2 (hash mask)": (lambda s: dropout(s, 0.2), scores),
    }
    print(f"one layer's ops, B={B}, T={T}, C={C}, on {mx.default_device()}: best of 5, ms")
    print("| op | forward | backward (vjp w.r.t. the input) |\n|---|---:|---:|")
    for name, (fn, *args) in ops.items():
        fwd, both = forward_and_vjp(fn, *args)
        print(f"| {name} | {fwd:.1f} | {both:.1f} |")


if __name__ == "__main__":
    main()
