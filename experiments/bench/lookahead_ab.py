"""A/B of the loop's queued update (step 9 of README.md): Trainer.fit as train.py builds it on bench.py's cpu preset
(nanoGPT's CPU config, two CPU streams), once with a callback that needs the state at every step (the loop then
waits for each step before its callbacks) and once with one that does not; the two take turns in one process.
Reported: the mean step over each run's steady stretch, median of runs.

    python experiments/bench/lookahead_ab.py --runs 5 --steps 120
    python experiments/bench/lookahead_ab.py --runs 5 --steps 120 trainer.cpu_streams=1
"""
import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

from mlxgpt.bench import PRESETS, QUIET_RUN, compose
from mlxgpt.callbacks.base import Callback
from mlxgpt.task import build_trainer

CONF = Path(__file__).resolve().parents[2] / "conf"


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
    schedule = [f"trainer.max_iters={steps}", f"trainer.eval_interval={steps + 1}"]
    cfg = compose(CONF, PRESETS["cpu"] + QUIET_RUN + schedule + overrides)
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
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after bench.py's cpu preset")
    args = parser.parse_args()
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
