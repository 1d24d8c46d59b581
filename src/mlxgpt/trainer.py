"""The training loop: one compiled step (model, optimizer and random state as inputs/outputs; on a CPU optionally its
batch in parts on concurrent streams), queued one update ahead of the callbacks where they allow it."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlxgpt import blas, checkpoint
from mlxgpt.callbacks.base import Callback
from mlxgpt.config import masked_container
from mlxgpt.device import on_cpu
from mlxgpt.errors import UserError
from mlxgpt.interrupt import Interrupted, StopSignals, StoppedAfterTraining
from mlxgpt.log import log
from mlxgpt.rundir import changed_settings

EVAL_SPLITS = ("train", "val")


class NonFiniteLoss(UserError):
    """The loss or gradient norm became NaN/inf."""


class Trainer:
    """Owns the model, optimizer and data for one run; callbacks observe it through events."""

    def __init__(self, cfg, model: nn.Module, data, optimizer: optim.Optimizer, run_dir: Path,
                 callbacks: list[Callback], tokenizer, resume_from: Path | None = None):
        self.cfg, self.model, self.data, self.optimizer = cfg, model, data, optimizer
        self.run_dir = Path(run_dir)
        self.callbacks = sorted(callbacks, key=lambda c: c.priority)
        self.tokenizer = tokenizer
        t = cfg.trainer
        self.seed, self.max_iters = t.seed, t.max_iters
        self.batch_size, self.accum = t.batch_size, t.gradient_accumulation_steps
        self.block_size = t.block_size or cfg.model.block_size
        self.group = mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        self.is_main = self.rank == 0
        self.tokens_per_iter = self.world * self.accum * self.batch_size * self.block_size
        self.streams = t.cpu_streams if on_cpu() else 1
        if on_cpu():  # with 1 stream: OpenBLAS on all cores again, whatever an earlier trainer here had set
            blas.share_threads(self.streams)
        elif t.cpu_streams > 1 and self.is_main:
            log.warning(f"mlxgpt: trainer.cpu_streams={t.cpu_streams} applies on the CPU only; this run uses the GPU")
        self.iter, self.tokens_seen = 0, 0
        self.best_val_loss = math.inf
        self.log_loss_sum, self.log_steps = 0.0, 0  # the train losses since the last log (saved: resume logs the same)
        self.extra_state: dict[str, Any] = {}  # callbacks' resumable state (e.g. the W&B run id)
        self.summary: dict[str, Any] = {"num_params": model.num_params()}  # and the latest value of every logged metric
        self.should_stop = False
        self.eval_pending = False  # a signal stopped the evaluation of this iteration: a continued run does it first
        self._signals: StopSignals | None = None  # while fit() runs: the stop requests (SIGINT, SIGTERM)
        self.resume_from = resume_from
        self.optimizer.init(self.model.trainable_parameters())
        if resume_from is not None:
            self._restore(resume_from)
        self._build_steps(compiled=t.compile)

    # ----------------------------------------------------------------- state
    @property
    def resumed(self) -> bool:
        """Whether this run continues from a checkpoint (of its own, or another run's)."""
        return self.resume_from is not None

    def state_dict(self) -> dict:
        """What a checkpoint's state.json holds besides the arrays."""
        return {"iter": self.iter, "tokens_seen": self.tokens_seen,
                "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
                "seed": self.seed, "world": self.world, "log_window": [self.log_loss_sum, self.log_steps],
                "eval_pending": self.eval_pending,
                "model_config": asdict(self.model.config), "data": self.data.directory.name,
                "tokenizer": self.tokenizer.to_meta(), "extra": self.extra_state,
                "config": masked_container(self.cfg)}

    def _restore(self, ckpt: Path) -> None:
        state = checkpoint.read_state(ckpt)
        checkpoint.check_model(ckpt, state, asdict(self.model.config))
        checkpoint.check_tokenizer(ckpt, state, self.tokenizer.to_meta())
        load_weights(self.model, checkpoint.load_arrays(ckpt, "model.safetensors", state), ckpt)
        self._load_optimizer_state(ckpt, state)
        self.iter, self.tokens_seen = state["iter"], state["tokens_seen"]
        self.best_val_loss = state["best_val_loss"] if state["best_val_loss"] is not None else math.inf
        self.log_loss_sum, self.log_steps = state.get("log_window", [0.0, 0])
        self.extra_state = state.get("extra", {})
        self.eval_pending = state.get("eval_pending", False)
        mx.eval(self.model.parameters(), self.optimizer.state)
        if self.is_main:
            self._warn_changed_settings(ckpt, state)
            self._warn_other_world(ckpt, state)

    def _warn_changed_settings(self, ckpt: Path, state: dict) -> None:
        """Warn when the run continues with settings its checkpoint was not trained with (lr, seed, batch...)."""
        changed = [] if self.cfg.trainer.eval_only else changed_settings(state["config"], self.cfg)
        data = self.data.directory.name  # the prepared data's name and key: the source's digest, the split, tokenizer
        if state.get("data", data) != data and not self.cfg.trainer.eval_only and not any(
                c.startswith("data.") for c in changed):  # same data settings: the text itself changed
            changed.append(f"the data's text (prepared as {data}, was {state['data']})")
        if changed:
            log.warning(f"mlxgpt: warning: continuing {ckpt} with settings it was not trained with: "
                        f"{', '.join(changed)}; the run's config now records these")

    def _load_optimizer_state(self, ckpt: Path, state: dict) -> None:
        """The checkpoint's optimizer state; UserError unless it has this optimizer's arrays (names and shapes)."""
        arrays = checkpoint.load_arrays(ckpt, "optimizer.safetensors", state)
        if {k: v.shape for k, v in arrays.items()} != {k: v.shape for k, v in tree_flatten(self.optimizer.state)}:
            was, now = (f"optimizer={c['name']} with weight_decay={c['weight_decay']}"
                        for c in (state["config"]["optimizer"], self.cfg.optimizer))
            raise UserError(f"the optimizer state in {ckpt} ({was}) does not fit this run's {now}: continue with the "
                            f"checkpoint's optimizer settings, or start a new run from its weights with init_from={ckpt}")
        self.optimizer.state = tree_unflatten(list(arrays.items()))

    def _warn_other_world(self, ckpt: Path, state: dict) -> None:
        """Warn when a checkpoint saved by another number of processes continues with another global batch."""
        world = state.get("world", self.world)  # older checkpoints do not say
        if world == self.world:
            return
        t, per_accum = state["config"]["trainer"], self.world * self.batch_size
        before = world * t["batch_size"] * t["gradient_accumulation_steps"]
        if before == per_accum * self.accum:
            return
        accum = before // per_accum
        keep = f", or keep it: trainer.gradient_accumulation_steps={accum}" if accum * per_accum == before else ""
        log.warning(f"mlxgpt: warning: {ckpt} was trained on {world} process(es) with a global batch of {before} "
                    f"sequences; this run has {self.world} ({self.world} x {self.batch_size} x {self.accum} = "
                    f"{per_accum * self.accum}): it will not train as the run would have; launch it on {world} "
                    f"process(es) as before{keep}")

    # ------------------------------------------------------------------ steps
    def _build_steps(self, compiled: bool) -> None:
        model, optimizer, t = self.model, self.optimizer, self.cfg.trainer
        model.grad_checkpoint = t.grad_checkpoint
        loss = model.loss if t.dtype == "float32" else mixed_precision_loss(model, getattr(mx, t.dtype))
        loss_and_grad = nn.value_and_grad(model, loss)
        state = [model.state, optimizer.state, mx.random.state]
        wrap = partial(mx.compile, inputs=state, outputs=state) if compiled else (lambda f: f)

        def reduce(g):  # the mean over micro-steps and ranks, clipped; and its norm before clipping
            if self.accum > 1:
                g = tree_map(lambda a: a / self.accum, g)
            if self.world > 1:
                g = nn.average_gradients(g, group=self.group)
            if t.grad_clip > 0:
                return optim.clip_grad_norm(g, t.grad_clip)
            return g, mx.sqrt(sum(mx.sum(a.astype(mx.float32) ** 2) for _, a in tree_flatten(g)))

        def update(g):
            optimizer.update(model, g)

        def reduce_and_update(g):
            g, norm = reduce(g)
            update(g)
            return norm

        if self.streams > 1:  # the batch's parts run concurrently, each its own compiled function; then as below
            grads = StreamSplit(loss_and_grad, self.streams, wrap)
            add = mx.compile(partial(tree_map, mx.add)) if compiled else partial(tree_map, mx.add)
            apply = wrap(reduce_and_update)

            def accumulate(x, y, acc):
                loss, g = grads(x, y)
                return loss, add(acc, g)

            def fused(x, y):
                loss, g = grads(x, y)
                return self._mean_over_ranks(loss), apply(g)

            self._grads, self._accumulate, self._fused = grads, accumulate, fused
        else:
            def accumulate(x, y, acc):
                loss, g = loss_and_grad(x, y)
                return loss, tree_map(mx.add, acc, g)

            def fused(x, y):
                loss, g = loss_and_grad(x, y)
                return self._mean_over_ranks(loss), reduce_and_update(g)

            self._grads, self._accumulate, self._fused = map(wrap, (loss_and_grad, accumulate, fused))
        self._reduce, self._update = wrap(reduce), wrap(update)
        self._eval_loss = mx.compile(loss, inputs=model.state) if compiled else loss
        # The fused step updates before the host can look at the gradients; `skip` needs to look first.
        self._use_fused = self.accum == 1 and t.on_nan == "stop"

    def batch(self, split: str, key: tuple[int, ...]) -> tuple[mx.array, mx.array]:
        x, y = self.data.get_batch(split, self.batch_size, self.block_size, key)
        return mx.array(x), mx.array(y)

    def _mean_over_ranks(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group) / self.world if self.world > 1 else x

    def _micro_batch(self, k: int, iteration: int) -> tuple[mx.array, mx.array]:
        """Micro-step k of this rank at `iteration`: its batch and dropout seed depend on (seed, iteration, global
        micro-step) only, so N ranks x A micro-steps draw what 1 rank x N*A micro-steps draws."""
        micro = self.rank * self.accum + k
        mx.random.seed(((self.seed * 1_000_003 + iteration) * 1_000_003 + micro) % 2**63)
        return self.batch("train", (self.seed, iteration, micro))

    def train_step(self) -> tuple[float, float]:
        """One optimizer update over `accum` micro-batches per rank, finished: its loss and gradient norm."""
        loss, norm, _ = self._finish(self._start(self.iter))
        return loss, norm

    def _start(self, iteration: int) -> StartedStep:
        """Start the update of `iteration`. The fused step is only queued (its results are read by `_finish`); the
        accumulating one runs here, each micro-step evaluated (bounded memory), and reads its norm before updating."""
        started = time.perf_counter()
        if self._use_fused:
            loss, norm = self._fused(*self._micro_batch(0, iteration))
            lr = self.optimizer.learning_rate  # the schedule's value this update used
            mx.async_eval(loss, norm, lr, self.model.state, self.optimizer.state)
            return StartedStep(iteration, started, loss, norm, lr)
        loss, acc = self._grads(*self._micro_batch(0, iteration))
        total = loss
        mx.eval(total, acc)
        for k in range(1, self.accum):
            loss, acc = self._accumulate(*self._micro_batch(k, iteration), acc)
            total = total + loss
            mx.eval(total, acc)
        mean_loss = self._mean_over_ranks(total).item() / self.accum
        if not math.isfinite(mean_loss):
            return StartedStep(iteration, started, mean_loss, math.nan, self.optimizer.learning_rate.item())
        g, norm = self._reduce(acc)
        mx.eval(g, norm)
        if math.isfinite(norm.item()):  # a non-finite gradient never reaches the weights (nor the schedule's step)
            self._update(g)
            mx.eval(self.model.state, self.optimizer.state)
        return StartedStep(iteration, started, mean_loss, norm.item(), self.optimizer.learning_rate.item())

    def _finish(self, step: StartedStep) -> tuple[float, float, float]:
        """Wait for a started update; its loss, gradient norm and learning rate (checked for non-finite values)."""
        loss, norm, lr = (v.item() if isinstance(v, mx.array) else v for v in (step.loss, step.norm, step.lr))
        return *self._checked(loss, norm), lr

    def _may_start_ahead(self, done: int) -> bool:
        """Whether update `done` may start before the callbacks of the one that ends with iter == `done` run: only
        the fused step, and only where no callback looks at the state then (the same answer on every rank)."""
        return (self._use_fused and done < self.max_iters and not self.should_stop
                and not any(cb.needs_state(self, done) for cb in self.callbacks))

    def _checked(self, loss: float, norm: float) -> tuple[float, float]:
        if math.isfinite(loss) and math.isfinite(norm):
            return loss, norm
        if self.cfg.trainer.on_nan == "skip":  # never on the fused step (_build_steps)
            if self.is_main:
                log.warning(f"mlxgpt: skipped iteration {self.iter}: non-finite loss/gradient ({loss}, {norm})")
            return loss, norm
        raise self._diverged(f"the loss/gradient norm ({loss}, {norm})")

    def _diverged(self, what: str) -> NonFiniteLoss:
        """The error for a non-finite value: where it happened, what is kept, what to try."""
        t, lr = self.cfg.trainer, self.cfg.optimizer.lr
        last = checkpoint.latest(self.run_dir / "checkpoints")
        kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written yet"
        tries = [f"optimizer.lr={lr / 10:g} (now {lr:g})"] + (["trainer.grad_clip=1.0"] if t.grad_clip <= 0 else [])
        tries += ["trainer.on_nan=skip (skips such steps)"] if t.on_nan == "stop" else []
        return NonFiniteLoss(f"{what} became non-finite at iteration {self.iter}; {kept}; try {', '.join(tries)}"
                             + (" and continue with trainer.resume=auto" if last else ""))

    def evaluate(self) -> dict[str, float]:
        """Mean loss over `eval_iters` fixed batches per split (the same batches at every evaluation, shared out
        among the ranks)."""
        self.model.eval()
        out = {}
        for split_id, split in enumerate(EVAL_SPLITS):
            total = mx.array(0.0)
            for k in range(self.rank, self.cfg.trainer.eval_iters, self.world):
                total = total + self._eval_loss(*self.batch(split, (self.seed, split_id, k, 1)))
                mx.eval(total)
                if self.world == 1:  # the ranks' batch counts differ: they agree once per split (below)
                    self._stop_during_evaluation()
            if self.world > 1:
                total = mx.distributed.all_sum(total, group=self.group)
                self._stop_during_evaluation()
            out[f"{split}/loss"] = total.item() / self.cfg.trainer.eval_iters
        self.model.train()
        return out

    def _stop_during_evaluation(self) -> None:
        """A stop asked during an evaluation ends the run at once; the checkpoint saved then marks the evaluation as
        pending, and the continued run does it before its first step (so its records are an uninterrupted run's)."""
        signum = self._signals is not None and self._signals.requested(self.group)
        if signum:
            self.eval_pending = True
            raise Interrupted(signum, self.iter)

    # ------------------------------------------------------------------- loop
    def emit(self, event: str, payload: Any = None) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self) if payload is None else getattr(cb, event)(self, payload)

    def record_eval(self, losses: dict[str, float]) -> dict[str, Any]:
        """Update the best val loss, emit on_eval_end, return its payload (no callback sees a non-finite loss)."""
        if not all(map(math.isfinite, losses.values())):
            raise self._diverged(f"the evaluation loss {losses}")
        self.best_val_loss = min(self.best_val_loss, losses["val/loss"])
        logs = {"iter": self.iter, "tokens": self.tokens_seen, **losses, "best/val_loss": self.best_val_loss}
        self.summary.update(logs)
        self.emit("on_eval_end", logs)
        return logs

    def fit(self) -> dict[str, Any]:
        """Train until max_iters (or a callback sets should_stop); returns the summary."""
        t = self.cfg.trainer
        self.model.train()
        with StopSignals() as signals:  # SIGINT/SIGTERM: finish the step, then stop via Interrupted (callbacks save)
            self._signals = signals
            try:
                self.emit("on_train_start")
                if self.eval_pending:
                    self.eval_pending = False
                    self.record_eval(self.evaluate())
                clock, last_done = TrainingClock(), time.perf_counter()
                step, stop_signal = None, None
                while step is not None or (self.iter < self.max_iters and not self.should_stop):
                    step = step or clock.started(self._start(self.iter))
                    # The next update is queued before this one's results are read, so the device works on it
                    # while the host runs the callbacks; not where a callback needs the state or a stop was asked.
                    done = step.iteration + 1
                    ahead = clock.started(self._start(done)) if not stop_signal and self._may_start_ahead(done) else None
                    loss, norm, lr = self._finish(step)
                    now = time.perf_counter()
                    dt, last_done = now - max(step.started, last_done), now
                    self.iter += 1
                    self.tokens_seen += self.tokens_per_iter
                    self.log_loss_sum, self.log_steps = self.log_loss_sum + loss, self.log_steps + 1
                    step_logs = {"iter": self.iter, "tokens": self.tokens_seen, "train/loss": loss, "lr": lr,
                                 "grad_norm": norm, "dt_s": dt}
                    callbacks_start = time.perf_counter()
                    if self.iter % t.log_interval == 0 or self.iter == self.max_iters:
                        logs = {**step_logs, "train/loss": self.log_loss_sum / self.log_steps, "dt_s": clock.per_step()}
                        self.log_loss_sum, self.log_steps = 0.0, 0
                        self.emit("on_log", logs)  # before on_step_end: a checkpoint it writes has this logged
                        self.summary.update(logs)
                    self.emit("on_step_end", step_logs)
                    if ahead is None:  # the device was idle meanwhile (evaluation, checkpoints): not training time
                        clock.idle += time.perf_counter() - callbacks_start
                    stop_signal = stop_signal or signals.requested(self.group)
                    finished = self.iter >= self.max_iters or self.should_stop  # then the stop waits for the end
                    if stop_signal and ahead is None and not finished:
                        raise Interrupted(stop_signal, self.iter)
                    step = ahead
                self.emit("on_train_end", dict(self.summary))
                stop_signal = signals.requested(self.group)  # asked during the last step or the end: a complete run
            except BaseException as exc:
                self.emit("on_exception", exc)
                raise
            finally:
                self._signals = None
        if stop_signal:
            raise StoppedAfterTraining(stop_signal, self.summary)
        return self.summary

    def stop_requested(self) -> int | None:
        """The signal this process was asked to stop on in fit (no collective: the ranks agree at the step's end)."""
        return self._signals.signum if self._signals is not None else None


class TrainingClock:
    """Seconds per update over a log window: its wall time, less callbacks run with nothing queued (evaluation,
    checkpoints), over the updates started in it (a queued update's time is spent where it starts: MLX runs only a
    bounded number of kernels ahead, so queuing the next update waits for most of it)."""

    def __init__(self):
        self.since, self.idle, self.starts, self.carried, self.last = time.perf_counter(), 0.0, 0, 0.0, None

    def started(self, step: StartedStep) -> StartedStep:
        self.starts += 1
        return step

    def per_step(self) -> float:
        """This window's seconds per update; a window that started none (only after the first) carries its time into
        the next and repeats the last figure."""
        now = time.perf_counter()
        elapsed = now - self.since - self.idle + self.carried
        if self.starts:
            self.last, self.carried = elapsed / self.starts, 0.0
        else:
            self.carried = elapsed
        self.since, self.idle, self.starts = now, 0.0, 0
        return self.last


@dataclass
class StartedStep:
    """An update begun by the trainer: its results, arrays still being computed (fused step) or numbers."""

    iteration: int
    started: float
    loss: mx.array | float
    norm: mx.array | float
    lr: mx.array | float


class StreamSplit:
    """Loss and gradients of a batch as the mean over n equal parts computed concurrently, each on its own CPU stream
    (MLX runs each stream's kernels on a thread of its own): the element-wise work no longer waits on one core."""

    def __init__(self, loss_and_grad, n: int, compile_part):
        self.n = n
        self.streams = [mx.default_stream(mx.cpu)] + [mx.new_stream(mx.cpu) for _ in range(n - 1)]
        self.parts = [compile_part(partial(loss_and_grad)) for _ in range(n)]  # one trace per stream
        self.mean = mx.compile(self._mean)

    def _mean(self, losses: list, grads: list) -> tuple:
        return sum(losses[1:], losses[0]) / self.n, tree_map(lambda *g: sum(g[1:], g[0]) / self.n, *grads)

    def __call__(self, x: mx.array, y: mx.array) -> tuple[mx.array, Any]:
        size = x.shape[0] // self.n
        results = []
        for i, (stream, part) in enumerate(zip(self.streams, self.parts)):
            with mx.stream(stream):
                results.append(part(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]))
        losses, grads = zip(*results)
        return self.mean(list(losses), list(grads))


def mixed_precision_loss(model: nn.Module, dtype: mx.Dtype):
    """model.loss computed with `dtype` copies of the float32 (master) weights; the gradients come back float32 and
    the optimizer updates the float32 weights. The model computes logits' softmax and the loss in float32."""

    def loss(x: mx.array, y: mx.array) -> mx.array:
        master = model.trainable_parameters()
        model.update(tree_map(lambda p: p.astype(dtype), master))
        try:
            return model.loss(x, y)
        finally:
            model.update(master)

    return loss


def load_weights(model: nn.Module, weights: dict[str, mx.array], source: Path | str) -> None:
    """Load a complete set of weights; a missing, extra or misshapen tensor is a UserError."""
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        detail = " ".join(str(e).split())  # MLX lists the tensors one per line
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        raise UserError(f"weights in {source} do not fit this model ({detail}); check the model= settings") from None
