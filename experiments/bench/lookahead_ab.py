"""A/B of the loop's queued update (step 9 of README.md): Trainer.fit as train.py builds it, once with a callback
that needs the state at every step (the loop then waits for each step before its callbacks) and once with one that
does not; the two take turns in one process. Reported: the mean step over each run's steady stretch, median of runs.

    python experiments/bench/lookahead_ab.py --runs 5 --steps 120
    python experiments/bench/lookahead_ab.py --runs 3 --steps 30 model=baby trainer.batch_size=8 trainer.cpu_streams=1
"""
import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from mlxgpt.callbacks.base import Callback
from mlxgpt.config import register_configs, validate
from mlxgpt.task import build_trainer

CONF = Path(__file__).resolve().parents[2] / "conf"
CPU_CONFIG = ["model=nano", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64",
              "model.bias=false", "model.dropout=0.0", "trainer.batch_size=12", "trainer.cpu_streams=2"]
QUIET = ["trainer.eval_iters=1", "callbacks.evaluation.at_start=false", "callbacks.sample.max_new_tokens=0",
         "logger=none"]


class StepClock(Callback):
    """Times each step end; `waits` is its answer to needs_state (True: the loop finishes every step first)."""

    def __init__(self, waits: bool):
        self.waits, self.times = waits, []

    def needs_state(self, trainer, iteration: int) -> bool:
        return self.waits

    def on_step_end(self, trainer, logs) -> None:
        self.times.append(time.perf_counter())


def mean_step(waits: bool, steps: int, overrides: list[str]) -> float:
    """Seconds per step between the 20th step end and the one before the last (the final evaluation excluded)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", CPU_CONFIG + QUIET + [f"trainer.max_iters={steps}",
                                                      f"trainer.eval_interval={steps + 1}"] + overrides)
    validate(cfg)
    clock = StepClock(waits)
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        build_trainer(cfg, Path(run_dir), extra_callbacks=(clock,)).fit()
    first = min(20, steps // 4)
    return (clock.times[-2] - clock.times[first]) / (len(clock.times) - 2 - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of each variant, taking turns")
    parser.add_argument("--steps", type=int, default=120, help="training iterations per run")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after nanoGPT's CPU config")
    args = parser.parse_args()
    register_configs()
    times = {"waits for each step": [], "queues the next update": []}
    for _ in range(args.runs):
        for waits, name in ((True, "waits for each step"), (False, "queues the next update")):
            times[name].append(mean_step(waits, args.steps, args.overrides))
    print(f"| loop | ms/step (median of {args.runs} runs) | each run |\n|---|---:|---|")
    for name, ts in times.items():
        print(f"| {name} | {1e3 * statistics.median(ts):.1f} | {', '.join(f'{1e3 * t:.1f}' for t in ts)} |")
    waiting, ahead = (statistics.median(ts) for ts in times.values())
    print(f"\nqueued / waiting: **{waiting / ahead:.3f}x** tokens/s")


if __name__ == "__main__":
    main()
