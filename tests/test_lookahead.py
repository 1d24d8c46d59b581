"""The trainer queues update i+1 before the callbacks of step i run, except where a callback needs the state then:
training, evaluations and checkpoints are exactly those of a loop that waits for every step."""
import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

import statistics
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlxgpt import checkpoint
from mlxgpt.bench import compose
from mlxgpt.callbacks.base import Callback
from mlxgpt.task import build_trainer

CONF = Path(__file__).resolve().parents[1] / "conf"


class WeightsSpy(Callback):
    """Records the loss and a sum of the model's weights at every step end; `waits` says whether it needs the state
    there (True: the trainer finishes each step first)."""

    def __init__(self, waits: bool):
        self.waits, self.losses, self.weights = waits, [], []

    def needs_state(self, trainer, iteration: int) -> bool:
        return self.waits

    def on_step_end(self, trainer, logs) -> None:
        self.losses.append(logs["train/loss"])
        self.weights.append(sum(mx.sum(p).item() for _, p in tree_flatten(trainer.model.parameters())))


def fit(run_dir: Path, spy: Callback, overrides: list[str]):
    cfg = compose(CONF, ["model=nano", "model.n_embd=32", "trainer.batch_size=4", "trainer.block_size=16",
                         "trainer.max_iters=7", "trainer.eval_interval=3", "trainer.eval_iters=2",
                         "trainer.log_interval=2", "callbacks.sample.max_new_tokens=0", "logger=none", *overrides])
    run_dir.mkdir()
    trainer = build_trainer(cfg, run_dir, extra_callbacks=(spy,))
    summary = trainer.fit()
    return trainer, summary


@pytest.mark.parametrize("streams", [1, 2])
def test_the_next_update_runs_during_the_callbacks_and_training_is_unchanged(tmp_path, monkeypatch, streams):
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    overrides = [f"trainer.cpu_streams={streams}"]
    waiting, _ = fit(tmp_path / "waiting", waiting_spy := WeightsSpy(waits=True), overrides)
    ahead, summary = fit(tmp_path / "ahead", ahead_spy := WeightsSpy(waits=False), overrides)

    assert ahead_spy.losses == waiting_spy.losses  # the weights below show that the steps train
    timings = {"dt_s", "tok_per_s", "mfu", "memory_gb"}
    assert {k: v for k, v in summary.items() if k not in timings} == {  # the same evaluations (3, 6, 7) and logs
        k: v for k, v in waiting.summary.items() if k not in timings}
    # At an evaluation (3, 6) and the last step (7) callbacks see their own step's weights; at every other step the
    # next update has already been applied when a callback that said it does not need the state looks anyway.
    expected = [waiting_spy.weights[i if i + 1 in (3, 6, 7) else i + 1] for i in range(7)]
    assert ahead_spy.weights == expected and ahead_spy.weights != waiting_spy.weights
    weights = []
    for run in ("waiting", "ahead"):  # the checkpoints, written after evaluations, hold the same weights
        ckpt = checkpoint.latest(tmp_path / run / "checkpoints")
        state = checkpoint.read_state(ckpt)
        assert state["iter"] == 7
        weights.append(checkpoint.load_arrays(ckpt, "model.safetensors", state))
    assert all(mx.array_equal(weights[0][k], weights[1][k]).item() for k in weights[0])


def test_a_callback_that_does_not_declare_gets_every_step_finished_first(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))

    class Legacy(WeightsSpy):  # overrides on_step_end, not needs_state: the safe default
        needs_state = Callback.needs_state

    fit(tmp_path / "legacy", legacy := Legacy(waits=False), [])
    fit(tmp_path / "waiting", waiting := WeightsSpy(waits=True), [])
    assert legacy.weights == waiting.weights


class SlowEvery(Callback):
    """Sleeps `seconds` at every `every`-th step end, where it needs the state (so nothing is queued meanwhile);
    records each log's seconds per update."""

    def __init__(self, every: int, seconds: float):
        self.every, self.seconds, self.dt = every, seconds, []

    def needs_state(self, trainer, iteration: int) -> bool:
        return iteration % self.every == 0

    def on_log(self, trainer, logs) -> None:
        self.dt.append(logs["dt_s"])

    def on_step_end(self, trainer, logs) -> None:
        if logs["iter"] % self.every == 0:
            time.sleep(self.seconds)


def test_logged_step_time_leaves_out_callbacks_run_with_the_device_idle(tmp_path, monkeypatch):
    """Seconds per update (so tokens/s and MFU) count training only, each update once: evaluation-like pauses are
    left out, and the update before a pause (queued while the one before it ended) is not logged as nearly free."""
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    fit(tmp_path / "run", slow := SlowEvery(every=4, seconds=0.5), [
        "trainer.max_iters=24", "trainer.log_interval=1", "trainer.eval_interval=100",
        "model.n_layer=4", "model.n_embd=64", "trainer.batch_size=8", "trainer.block_size=64"])
    typical = statistics.median(slow.dt)
    assert max(slow.dt) < 0.25  # the 0.5 s pauses are not training time
    assert min(slow.dt) > typical / 3, slow.dt


class AppliedLearningRate(Callback):
    """Records, at every step end, the logged lr and the lr the optimizer applied in that step."""

    def __init__(self):
        self.logged, self.applied = [], []

    def on_step_end(self, trainer, logs) -> None:
        self.logged.append(logs["lr"])
        self.applied.append(trainer.optimizer.learning_rate.item())


def test_a_skipped_update_logs_the_applied_learning_rate_and_does_not_advance_the_schedule(tmp_path, monkeypatch):
    """on_nan=skip: the update of iteration 3 gets a non-finite gradient norm and is skipped; the logged lr is the one
    each update applied, and the schedule goes on from where the applied updates left it."""
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    cfg = compose(CONF, ["model=nano", "model.n_embd=32", "trainer.batch_size=4", "trainer.block_size=16",
                         "trainer.max_iters=5", "trainer.log_interval=1", "trainer.on_nan=skip",
                         "schedule.warmup_iters=10", "callbacks.sample.max_new_tokens=0", "logger=none"])
    (tmp_path / "run").mkdir()
    trainer = build_trainer(cfg, tmp_path / "run", extra_callbacks=(spy := AppliedLearningRate(),))
    reduce, calls = trainer._reduce, iter(range(5))

    def reduce_with_a_bad_gradient(acc):
        g, norm = reduce(acc)
        return g, norm * mx.nan if next(calls) == 2 else norm

    trainer._reduce = reduce_with_a_bad_gradient
    trainer.fit()
    warmup = [cfg.optimizer.lr * (k + 1) / (10 + 1) for k in range(4)]  # the schedule at the applied updates 0..3
    assert spy.logged == spy.applied == pytest.approx([warmup[0], warmup[1], warmup[1], warmup[2], warmup[3]])
