"""The Hydra task: config -> data -> model -> trainer -> callbacks -> run directory (returns the best val loss)."""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path

import mlx.core as mx
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mlxgpt import checkpoint, device
from mlxgpt.callbacks.base import Callback
from mlxgpt.callbacks.early_stopping import stopped_early
from mlxgpt.cli import EXIT_USER_ERROR, report_failed_jobs, shown_path
from mlxgpt.config import masked_container, validate
from mlxgpt.data import load_data
from mlxgpt.errors import UserError, disk_error
from mlxgpt.interrupt import Interrupted, StoppedAfterTraining, exit_together, sigterm_stops
from mlxgpt.log import FILE_ONLY, log
from mlxgpt.memory import check_fits
from mlxgpt.model import GPT, GPTConfig
from mlxgpt.optim import build_optimizer, build_schedule
from mlxgpt.pretrained import (GPT2_SIZES, exported_char_vocabulary, is_hf_dir, is_pretrained, load_pretrained,
                               pretrained_tokenizer_meta)
from mlxgpt.rundir import (check_same_job, check_start, holds_lock, is_main_process, lock_run_dir,
                           resume_command, settle_records, unlock_run_dir)
from mlxgpt.sweep import write_summary
from mlxgpt.trainer import NonFiniteLoss, Trainer, load_weights



class AlreadyFinished(Exception):
    """A continued run that has no iteration left (a finished job of a continued sweep)."""

    def __init__(self, message: str, best_val_loss: float):
        super().__init__(message)
        self.best_val_loss = best_val_loss


def train(cfg: DictConfig) -> float:
    """Run one job. In a multirun a failing job is recorded (result.json) and the sweep goes on."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        if is_main_process():
            lock_run_dir(run_dir)  # a single run holds it since PreflightCheck; a multirun job takes it here
        with sigterm_stops():  # the training loop has its own terms (StopSignals)
            summary = _train(cfg, run_dir, multirun)
    except AlreadyFinished as e:  # nothing done: the run's records stay as they were
        log.info(f"mlxgpt: {e}")
        if holds_lock(run_dir):
            settle_records(run_dir, failed=True)
        return e.best_val_loss
    except StoppedAfterTraining as e:  # the run is complete; the process stops as asked
        _record_success(cfg, run_dir, multirun, e.summary)
        if is_main_process():
            log.warning(f"mlxgpt: {e}")
        exit_together(e.exit_code)
    except (Interrupted, KeyboardInterrupt) as stop:  # Ctrl-C or SIGTERM outside the loop (data, model): stopped too
        e = stop if isinstance(stop, Interrupted) else Interrupted(signal.SIGINT, None)
        _write_failure(run_dir, {"status": "interrupted", "iter": e.iteration})
        if is_main_process():
            saved, start = checkpoint.latest(run_dir / "checkpoints"), cfg.trainer.resume
            world = mx.distributed.init().size()
            launch = f", under mlx.launch on {world} processes as before" if world > 1 else ""
            resume = "auto" if saved or start in (None, "auto") else start  # else: another run's checkpoint
            log.warning(f"mlxgpt: {e}; {f'latest checkpoint {saved}' if saved else 'no checkpoint saved'}; continue "
                        f"with{launch}: {resume_command(cfg.run_name, multirun, resume)}")
        if e.iteration is not None:  # stopped in the training loop, where the ranks agreed to
            exit_together(e.exit_code)
        sys.exit(e.exit_code)
    except BaseException as exc:
        e = disk_error(exc) or exc
        _write_failure(run_dir, {"status": "failed", "error": f"{type(e).__name__}: {e}"})
        if multirun and isinstance(e, Exception):
            report_failed_jobs([run_dir.name])  # the sweep goes on, and exits 1 at its end
            log.error(f"error: job failed: {e}" if isinstance(e, UserError) else traceback.format_exc().rstrip())
            return math.inf  # optuna rejects NaN; the basic sweeper ignores the value
        if isinstance(e, UserError):
            log.error(f"error: {e}")  # one line (Hydra would add its own report)
            if isinstance(e, NonFiniteLoss):  # every rank found the (all-reduced) loss non-finite at this iteration
                exit_together(EXIT_USER_ERROR)
            sys.exit(EXIT_USER_ERROR)
        log.error(traceback.format_exc().rstrip(), extra=FILE_ONLY)  # the console gets it from Python
        raise
    else:
        _record_success(cfg, run_dir, multirun, summary)
        return summary.get("best/val_loss", math.nan)
    finally:
        unlock_run_dir(run_dir)
        if multirun and is_main_process():  # the sweep's summary so far: there is one even if the sweep is stopped
            with contextlib.suppress(OSError):
                write_summary(Path(HydraConfig.get().sweep.dir))
        gc.collect()  # a multirun's jobs share this process: free this job's arrays (cycles hold the model)...
        mx.clear_cache()  # ...and give MLX's buffer cache back before the next job


def _record_success(cfg: DictConfig, run_dir: Path, multirun: bool, summary: dict) -> None:
    """The records of a job that ran to its end (rank 0: the other ranks of a distributed run write nothing)."""
    if is_main_process():
        settle_records(run_dir, failed=False)
        _write_result(run_dir, {"status": "ok", **summary})
        if not multirun and not cfg.trainer.eval_only:  # a sweep ends with its best job instead
            log.info(_done_line(run_dir, summary))


def _train(cfg: DictConfig, run_dir: Path, multirun: bool) -> dict:
    validate(cfg)
    if multirun:  # run_name (a timestamp) names no directory in a sweep: the job's directory names it
        cfg.run_name = f"{run_dir.parent.name}/{run_dir.name}"
    mx.reset_peak_memory()  # memory_gb is per job, also in a multirun
    t = cfg.trainer
    resume_from = check_start(t, run_dir, cfg.init_from)  # again for multirun jobs (PreflightCheck: single runs)
    if multirun and resume_from is not None:
        check_same_job(run_dir, list(HydraConfig.get().overrides.task))
    if resume_from is not None and not t.eval_only:
        state = checkpoint.read_state(resume_from)
        done = _finished(cfg, state)
        if done:
            raise AlreadyFinished(f"{run_dir} {done}", math.inf if state.get("best_val_loss") is None
                                  else state["best_val_loss"])
    if t.resume == "auto" and not t.eval_only and is_main_process():
        log.info("mlxgpt: trainer.resume=auto: " + (f"continuing from {resume_from}" if resume_from else
                                                     f"no checkpoint in {run_dir}, starting a new run"))
    trainer = build_trainer(cfg, run_dir, resume_from)
    if t.eval_only:
        losses = trainer.evaluate()
        log.info(f"mlxgpt: eval only: train loss {losses['train/loss']:.4f}, val loss {losses['val/loss']:.4f}")
        return {**losses, "best/val_loss": losses["val/loss"], "iter": trainer.iter}
    return trainer.fit()


def _done_line(run_dir: Path, summary: dict) -> str:
    """The last line of a finished run: how far it went, and the command that samples from it."""
    best = summary.get("best/val_loss")
    loss = f", best val loss {best:.4f}" if best is not None and math.isfinite(best) else ""
    return (f"mlxgpt: done: {summary['iter']} iterations{loss}; sample from it: python sample.py "
            f"checkpoint={shlex.quote(shown_path(run_dir))}")


def _finished(cfg: DictConfig, state: dict) -> str | None:
    """Why the run a checkpoint continues has nothing left to train under cfg (None when it has)."""
    if state["iter"] >= cfg.trainer.max_iters and not state.get("eval_pending"):
        return (f"already trained {state['iter']} iterations (trainer.max_iters={cfg.trainer.max_iters}): nothing "
                f"to do; raise trainer.max_iters to continue it")
    stopping = cfg.callbacks.get("early_stopping")
    if stopping is not None and stopped_early(state, stopping.patience):
        return (f"stopped early at iteration {state['iter']} (callbacks.early_stopping.patience={stopping.patience}): "
                f"nothing to do; raise callbacks.early_stopping.patience to continue it")
    return None


def build_trainer(cfg: DictConfig, run_dir: Path, resume_from: Path | None = None,
                  extra_callbacks: tuple[Callback, ...] = ()) -> Trainer:
    """Device, data, model, optimizer, callbacks and trainer of a run, as train.py builds them (bench.py too)."""
    t = cfg.trainer
    dev = device.select_device(t.device)
    log.info(f"mlxgpt: device {device.describe()}; run dir {run_dir}")
    if dev == mx.cpu and t.dtype != "float32":
        log.warning(f"mlxgpt: trainer.dtype={t.dtype} is slow on the CPU (no BLAS for half precision): training in "
                    f"float32")
        t.dtype = "float32"  # the run records what it computes in
    may_not_fit = check_fits(cfg)  # refused here too: a sweep's jobs (PreflightCheck checks single runs)
    if may_not_fit:
        log.warning(may_not_fit)
    _use_init_char_vocabulary(cfg)
    log.info(OmegaConf.to_yaml(masked_container(cfg)).rstrip())
    callbacks = [_instantiate(name, c) for name, c in cfg.callbacks.items()] + list(extra_callbacks)  # before data

    data = load_data(cfg.data)
    block_size = t.block_size or cfg.model.block_size
    mx.random.seed(t.seed)  # the initial weights are a function of the seed
    model = _build_model(cfg, data.tokenizer)
    log.info(f"mlxgpt: model {cfg.model.name}: {model.num_params() / 1e6:.2f}M parameters; "
             f"{data.num_tokens('train'):,} train / {data.num_tokens('val'):,} val tokens; context {block_size}")

    schedule = build_schedule(cfg.schedule, cfg.optimizer.lr, t.max_iters)
    if cfg.schedule.warmup_iters >= t.max_iters and not t.eval_only:
        log.warning(f"mlxgpt: warning: schedule.warmup_iters={cfg.schedule.warmup_iters} >= trainer.max_iters="
                    f"{t.max_iters}: the learning rate never reaches optimizer.lr={cfg.optimizer.lr:g} (lower "
                    f"schedule.warmup_iters)")
    optimizer = build_optimizer(cfg.optimizer, schedule)
    if cfg.logger.name == "wandb":
        from mlxgpt.callbacks.wandb import WandbCallback

        callbacks.append(WandbCallback(cfg.logger))
    return Trainer(cfg, model, data, optimizer, run_dir, callbacks, data.tokenizer, resume_from)


def _build_model(cfg: DictConfig, tokenizer) -> GPT:
    m, data_vocab = cfg.model, tokenizer.vocab_size
    vocab = m.vocab_size or (_pad(data_vocab) if data_vocab > 1000 else data_vocab)
    if vocab < data_vocab:
        raise UserError(f"model.vocab_size={vocab} is smaller than the tokenizer's {data_vocab}; use model.vocab_size=null")
    config = GPTConfig(block_size=m.block_size, vocab_size=vocab, n_layer=m.n_layer, n_head=m.n_head,
                       n_embd=m.n_embd, dropout=m.dropout, bias=m.bias)
    if is_pretrained(cfg.init_from):
        saved = pretrained_tokenizer_meta(cfg.init_from)
        checkpoint.check_tokenizer(cfg.init_from, {"tokenizer": saved}, tokenizer.to_meta())
        pre_config, weights = load_pretrained(cfg.init_from, config)
        model = GPT(pre_config)
        load_weights(model, weights, cfg.init_from)
        model.set_dtype(mx.float32)  # the master weights, whatever the checkpoint's dtype (trainer.dtype computes)
        return model
    model = GPT(config)
    if cfg.init_from:
        ckpt = checkpoint.resolve_best(cfg.init_from)
        state = checkpoint.read_state(ckpt)
        checkpoint.check_model(ckpt, state, cfg.model)
        checkpoint.check_tokenizer(ckpt, state, tokenizer.to_meta())
        load_weights(model, checkpoint.load_arrays(ckpt, "model.safetensors", state), ckpt)
        log.info(f"mlxgpt: initialised from {ckpt}")
    return model


def _use_init_char_vocabulary(cfg: DictConfig) -> None:
    """Fine-tuning a char-level model (a checkpoint, or its export): tokenize the data with its characters
    (data.chars), so ids keep their meaning."""
    if not cfg.init_from or cfg.init_from in GPT2_SIZES or cfg.data.tokenizer != "char" or cfg.data.chars is not None:
        return
    if is_hf_dir(cfg.init_from):
        source, chars = cfg.init_from, exported_char_vocabulary(cfg.init_from)
    else:
        source = checkpoint.resolve_best(cfg.init_from)
        saved = checkpoint.read_state(source).get("tokenizer") or {}
        chars = saved["chars"] if saved.get("name") == "char" else None
    if chars:
        cfg.data.chars = chars
        log.info(f"mlxgpt: tokenizing the data with the {len(chars)}-character vocabulary of {source}")


def _pad(vocab: int, multiple: int = 64) -> int:
    """GPT-2's 50257 -> 50304 (as nanoGPT): a multiple of 64 is faster for the lm head matmul."""
    return (vocab + multiple - 1) // multiple * multiple


def _instantiate(name: str, node: DictConfig):
    try:
        return instantiate(node)
    except Exception as e:  # bad callback options surface as TypeError deep inside instantiate
        cause = " ".join(str(e.__cause__ or e).split())  # one line (an import error spans several)
        raise UserError(f"callbacks.{name}: {cause}; check its options (`--cfg job` shows them)") from None


def _write_failure(run_dir: Path, result: dict) -> None:
    """result.json of a job that did not finish: only into a run dir this process holds, and not where the attempt
    saved no checkpoint over an earlier one (its records are put back instead); a full disk is no error."""
    if holds_lock(run_dir):
        with contextlib.suppress(OSError):
            if not settle_records(run_dir, failed=True):
                _write_result(run_dir, result)


def _write_result(run_dir: Path, result: dict) -> None:
    """`result.json`: the job's status and final metrics, read by the sweep summary and compare."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, run_dir / "result.json")
