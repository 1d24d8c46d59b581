"""A/B of the GELU formulation in a full compiled training step: MLX's nn.gelu_approx (scalar tanh on the CPU) vs
mlxgpt's gelu_tanh (rational tanh, one vectorized kernel each way). The two steps alternate, so both see the same load.

    python experiments/bench/gelu_ab.py [--batch 8] [--steps 6]      (baby model: 6L/6H/384, T256)
"""
import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

import argparse
import statistics
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlxgpt import model as gpt


def make_step(batch: int):
    mx.random.seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384))
    optimizer = optim.AdamW(1e-3, bias_correction=True)
    optimizer.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, model.loss)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, g = loss_and_grad(x, y)
        optimizer.update(model, optim.clip_grad_norm(g, 1.0)[0])
        return loss

    x, y = (mx.random.randint(0, 65, (batch, 256)) for _ in range(2))
    return lambda: mx.eval(step(x, y), model.state, optimizer.state)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    ours = gpt.gelu_tanh
    gpt.gelu_tanh = nn.gelu_approx  # the MLP looks the activation up at trace time: this step traces MLX's
    reference = make_step(args.batch)
    reference()
    gpt.gelu_tanh = ours
    rational = make_step(args.batch)
    rational()
    times = {"nn.gelu_approx": [], "gelu_tanh (rational)": []}
    for _ in range(args.steps):
        for name, step in zip(times, (reference, rational)):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    print(f"baby model, B={args.batch}, T=256, median of {args.steps} alternating steps")
    for name, ts in times.items():
        print(f"| {name} | {1000 * statistics.median(ts):.0f} ms/step | {args.batch * 256 / statistics.median(ts):.0f} tok/s |")
    speedup = statistics.median(times["nn.gelu_approx"]) / statistics.median(times["gelu_tanh (rational)"])
    print(f"speed-up: {speedup:.2f}x")


if __name__ == "__main__":
    main()
