"""A/B of the CPU fast path in a full compiled training step, one change at a time. Each variant runs in its own
process (the malloc setting is per process) and the processes take turns stepping, so all see the same machine load.

    python experiments/bench/cpu_path_ab.py --model cpu --batch 12 --steps 40
    python experiments/bench/cpu_path_ab.py --model baby --batch 32 --steps 6 --variants gelu,softmax,malloc

`mlx` is MLX's own math (nn.gelu_approx, mx.softmax, nn.losses.cross_entropy, bernoulli dropout masks) with glibc's
default malloc; the changes are `gelu` (fastmath.gelu_tanh), `softmax` (fastmath softmax and cross-entropy), `malloc`
(freed memory kept, mlxgpt.malloc), `dropout` (fastmath.dropout's hash mask; baby only, the CPU config has none) and
`streams` (the batch as two halves computed at once on two CPU streams, one OpenBLAS thread each: trainer.cpu_streams=2).
Variants are cumulative in the order given: each adds its change to those listed before it.
Attention is the explicit one in every variant (MLX's CPU fused kernel is the same matmuls and softmax).
Models: `cpu` = nanoGPT README's CPU config (4L/4H/128, T64), `baby` = shakespeare_char (6L/6H/384, T256,
dropout 0.2), both bias=False and vocab 65 as nanoGPT's.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

VARIANTS = ("mlx", "gelu", "softmax", "malloc", "dropout", "streams")  # the baseline, then the changes
MODELS = {"cpu": dict(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
          "baby": dict(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2)}


def worker(changes: list[str], model_name: str, batch: int) -> None:
    """Build a step with these changes, warm it up, then answer each stdin line `n` with the times of n steps."""
    import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core; applies MLXGPT_MALLOC)
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlxgpt import blas, model as gpt
    from mlxgpt.trainer import StreamSplit

    if "gelu" not in changes:  # the model looks these names up at trace time
        gpt.gelu_tanh = nn.gelu_approx
    if "softmax" not in changes:
        gpt.softmax = partial(mx.softmax, axis=-1)
        gpt.cross_entropy = nn.losses.cross_entropy
    if "dropout" not in changes:
        gpt.dropout = lambda x, p, key=None: (mx.random.bernoulli(1 - p, x.shape, key=key) * x) / (1 - p)  # nn.Dropout
    mx.random.seed(0)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=65, bias=False, **MODELS[model_name]))
    optimizer = optim.AdamW(1e-3, betas=[0.9, 0.99], weight_decay=0.1, bias_correction=True)
    optimizer.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, model.loss)
    state = [model.state, optimizer.state, mx.random.state]
    compile_ = partial(mx.compile, inputs=state, outputs=state)

    def update(grads):
        optimizer.update(model, optim.clip_grad_norm(grads, 1.0)[0])

    if "streams" in changes:  # two halves of the batch at once, as trainer.cpu_streams=2
        blas.share_threads(2)
        split, update = StreamSplit(loss_and_grad, 2, compile_), compile_(update)

        def step(x, y):
            loss, grads = split(x, y)
            update(grads)
            return loss
    else:
        @compile_
        def step(x, y):
            loss, grads = loss_and_grad(x, y)
            update(grads)
            return loss

    x, y = (mx.random.randint(0, 65, (batch, model.config.block_size)) for _ in range(2))
    for _ in range(2):
        mx.eval(step(x, y), state)
    print("ready", flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            mx.eval(step(x, y), state)
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="cpu")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--round", type=int, default=5, help="steps per turn")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, in the order to add them")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the changes of one variant, comma-separated
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker.split(","), args.model, args.batch)
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS) or len(set(variants)) < len(variants):
        parser.error(f"--variants: distinct names from {', '.join(VARIANTS)}")
    procs = {}
    for i, v in enumerate(variants):
        changes = [c for c in variants[: i + 1] if c != "mlx"]
        env = dict(os.environ, MLXGPT_MALLOC="keep" if "malloc" in changes else "default")
        procs[v] = subprocess.Popen([sys.executable, __file__, "--worker", ",".join(changes), "--model", args.model,
                                     "--batch", str(args.batch)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, env=env)
        assert procs[v].stdout.readline().strip() == "ready"  # warm up one at a time
    times = {v: [] for v in variants}
    while len(times[variants[0]]) < args.steps:
        for v, proc in procs.items():
            proc.stdin.write(f"{min(args.round, args.steps - len(times[v]))}\n")
            proc.stdin.flush()
            times[v] += json.loads(proc.stdout.readline())
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    tokens = args.batch * MODELS[args.model]["block_size"]
    print(f"{args.model} model, B={args.batch}, median of {args.steps} steps per variant, turns of {args.round}; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print(f"| variant (cumulative) | ms/step | tokens/s | vs previous | vs {variants[0]} |\n|---|---:|---:|---:|---:|")
    medians = {v: statistics.median(ts) for v, ts in times.items()}
    for i, (v, m) in enumerate(medians.items()):
        previous = f"{medians[variants[i - 1]] / m:.2f}x" if i else ""
        first = f"{medians[variants[0]] / m:.2f}x" if i else ""
        print(f"| {'+ ' if i else ''}{v} | {1000 * m:.1f} | {tokens / m:,.0f} | {previous} | {first} |")


if __name__ == "__main__":
    main()
