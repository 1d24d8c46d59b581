"""Weights & Biases: one W&B run per training run, grouped by sweep; W&B trouble never stops training."""
from __future__ import annotations

import contextlib
import json
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlxgpt.callbacks.base import Callback
from mlxgpt.callbacks.sample import RECORDS as SAMPLES
from mlxgpt.config import dotted, masked_container, shown_value
from mlxgpt.log import log
from mlxgpt.rundir import SAME_MATH_KEYS, own_checkpoint
from mlxgpt.wandb_file import read_records

RUN_ID_KEY = "wandb_run_id"  # in trainer.extra_state, so a resumed run continues the same W&B run
LOGGED_FILE = "logged.json"  # in the run dir's wandb/: the rows earlier attempts logged (see write_logged)
ROW_KEYS = {"train": "train/loss", "eval": "val/loss", "samples": "samples"}  # kind of row -> a key only it has
# Settings that leave a run's rows as they were: where it runs, how it computes its steps, the callbacks but those
# whose rows it logs (ROW_CALLBACKS). Others change the rows' values (lr; a longer trainer.max_iters decays the lr
# later) or their iterations (trainer.log_interval).
SAME_ROWS_KEYS = ("trainer.resume", "trainer.device", "logger.", "paths.", "hydra.", "callbacks.", *SAME_MATH_KEYS)
ROW_CALLBACKS = ("callbacks.evaluation.", "callbacks.sample.")
UNREACHABLE: list[str] = []  # why W&B could not be reached online by a job of this process (then the rest log offline)
OFFLINE = "logging offline; upload later with `wandb sync`"


class WandbCallback(Callback):
    """Logs the config, metrics, samples and (optionally) checkpoints of a run on rank 0."""

    priority = 95  # after those that add tok_per_s / mfu / memory to logs, sample and checkpoint at the end

    def __init__(self, logger_cfg):
        self.cfg = logger_cfg
        self.run = None
        self._started = False
        self._sample_rows: list[list[Any]] = []
        self._logged: dict[str, int] = {}  # kind of history row (ROW_KEYS) -> the last iteration logged

    def needs_state(self, trainer, iteration: int) -> bool:
        return False  # its step events only log

    # ------------------------------------------------------------------ events
    # The run starts at the first event that reaches this callback: the evaluation at iteration 0 comes before
    # this callback's on_train_start.
    def on_train_start(self, trainer) -> None:
        self._ensure_run(trainer)

    def on_log(self, trainer, logs) -> None:
        self._ensure_run(trainer)
        self._guard(self._log, "train", logs)

    def on_eval_end(self, trainer, logs) -> None:
        self._ensure_run(trainer)
        # The eval's train-split estimate gets its own name: `train/loss` is the running training loss.
        self._guard(self._log, "eval", {("train/eval_loss" if k == "train/loss" else k): v for k, v in logs.items()})

    def on_sample(self, trainer, info) -> None:
        self._ensure_run(trainer)
        self._guard(self._log_samples, info)

    def on_checkpoint(self, trainer, info) -> None:
        self._ensure_run(trainer)
        if self.cfg.log_checkpoints:
            self._guard(self._log_checkpoint, info)

    def on_train_end(self, trainer, logs) -> None:
        self._finish(exit_code=0)

    def on_exception(self, trainer, exc) -> None:
        if self.run is not None:  # why the run ended, beside its exit code in W&B's run overview
            self._guard(self.run.summary.update, {"error": " ".join(f"{type(exc).__name__}: {exc}".split())})
        self._finish(exit_code=getattr(exc, "exit_code", 1))  # 130/143 for a stopped run

    # ------------------------------------------------------------------- work
    def _ensure_run(self, trainer) -> None:
        if not self._started and trainer.is_main and self.cfg.mode != "disabled":
            self._started = True
            self._guard(self._start, trainer)

    def _start(self, trainer) -> None:
        import wandb

        if wandb.run is not None:  # a run left open by earlier code in this process: never log into it
            wandb.run.finish()
        own = trainer.resumed and own_checkpoint(trainer.resume_from, trainer.run_dir)  # not a fork of another run
        run_id = trainer.extra_state.get(RUN_ID_KEY) if own else None
        name, group = job_name_and_group(trainer.run_dir)
        run = dict(project=self.cfg.project, entity=self.cfg.entity, dir=str(trainer.run_dir), id=run_id,
                   resume="allow" if run_id else None, group=self.cfg.group or group,
                   name=None if run_id else name,  # a resumed run keeps its name
                   job_type=self.cfg.job_type, tags=list(self.cfg.tags),
                   config={**group_choices(), **flat_config(trainer.cfg)})
        logged_file, settings = trainer.run_dir / "wandb" / LOGGED_FILE, row_settings(trainer.cfg)
        # read before wandb.init: an attempt started in the same second as the last one reuses its W&B directory
        self._logged = logged_rows(logged_file, run_id, settings) if run_id else {}
        mode = resolve_mode(self.cfg.mode)
        if mode == "online" and UNREACHABLE:  # a sweep's later jobs do not wait out the connection timeout again
            log.warning(f"mlxgpt: warning: W&B was unreachable for an earlier job ({UNREACHABLE[0]}): {OFFLINE}")
            mode = "offline"
        try:
            self.run = wandb.init(mode=mode, **run)
        except wandb.errors.CommError as e:  # no network, server down: keep the run on disk instead
            if mode != "online":
                raise
            UNREACHABLE.append(" ".join(str(e).split()))
            log.warning(f"mlxgpt: warning: W&B is unreachable ({UNREACHABLE[0]}): {OFFLINE}")
            self.run = wandb.init(mode="offline", **run)
        trainer.extra_state[RUN_ID_KEY] = self.run.id
        if run_id:  # an earlier attempt's error does not describe this one (W&B keeps a resumed run's summary)
            del self.run.summary["error"]
        if trainer.resumed:  # the samples table goes on from those of the earlier attempts
            self._sample_rows = earlier_samples(trainer.run_dir / SAMPLES)
        write_logged(logged_file, self.run, settings, self._logged)
        self.run.define_metric("iter")  # the x-axis of every chart; `tokens` is logged beside it as the other one
        self.run.define_metric("*", step_metric="iter")
        self.run.define_metric("val/loss", step_metric="iter", summary="min,last")  # best/val_loss: the running min

    def _log(self, kind: str, logs: dict[str, Any]) -> None:
        if self.run is not None and self._is_new(kind, logs["iter"]):
            self.run.log({k: v for k, v in logs.items() if v is not None})
            self._logged[kind] = logs["iter"]

    def _is_new(self, kind: str, iteration: int) -> bool:
        """Whether no earlier attempt of this W&B run logged the row: one that failed (or was killed) after its last
        checkpoint logged iterations that this one repeats (with the same values), and W&B cannot take rows back."""
        return iteration > self._logged.get(kind, -1)

    def _log_samples(self, info: dict[str, Any]) -> None:
        if self.run is None:
            return
        import wandb

        self._sample_rows += [[info["iter"], info["prompt"], text] for text in info["samples"]]
        if self._is_new("samples", info["iter"]):
            table = wandb.Table(columns=["iter", "prompt", "text"], data=self._sample_rows)  # all samples so far
            self.run.log({"iter": info["iter"], "samples": table})
            self._logged["samples"] = info["iter"]

    def _log_checkpoint(self, info: dict[str, Any]) -> None:
        if self.run is None:
            return
        import wandb

        artifact = wandb.Artifact(f"checkpoint-{self.run.id}", type="model",
                                  metadata={"iter": info["iter"], "is_best": info["is_best"]})
        artifact.add_dir(info["path"])  # copied to W&B's staging area: pruning the checkpoint later is safe
        aliases = ["latest", f"iter_{info['iter']}"] + (["best"] if info["is_best"] else [])
        self.run.log_artifact(artifact, aliases=aliases)

    def _finish(self, exit_code: int) -> None:
        """Always end the run, so the next job of a multirun (same process) starts its own."""
        run, self.run = self.run, None
        if run is not None:
            self._guard(run.finish, exit_code)

    def _guard(self, fn, *args) -> None:
        """Run a W&B call; on the first failure shut W&B down, warn once (one line), and let training go on."""
        try:
            fn(*args)
        except Exception as e:
            self._shut_down()
            reason = " ".join(f"{type(e).__name__}: {e}".split())  # wandb's messages span lines
            log.warning(f"mlxgpt: warning: W&B logging stopped ({reason}); training continues, metrics.jsonl is "
                        f"still written")

    def _shut_down(self) -> None:
        """End the run and W&B's service process, so that a broken W&B (its service killed) leaves no console
        capture and no exit hook behind (that hook's traceback at exit)."""
        run, self.run = self.run, None
        with contextlib.suppress(Exception):
            if run is not None:
                run.finish(exit_code=1)
        with contextlib.suppress(Exception):
            import wandb

            wandb.teardown()


def earlier_samples(path: Path) -> list[list[Any]]:
    """Rows (iter, prompt, text) of a resumed run's samples.jsonl, which holds those up to the resumed iteration."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short by a kill
            record = json.loads(line)
            rows.append([record["iter"], record["prompt"], record["text"]])
    return rows


def row_settings(cfg) -> dict[str, Any]:
    """The settings that decide the rows a run logs (all but SAME_ROWS_KEYS, ROW_CALLBACKS included)."""
    return {k: v for k, v in dotted(masked_container(cfg)).items()
            if not k.startswith(SAME_ROWS_KEYS) or k.startswith(ROW_CALLBACKS)}


def logged_rows(path: Path, run_id: str, settings: dict[str, Any]) -> dict[str, int]:
    """The last iteration of each kind of row that earlier attempts logged to W&B run `run_id` with these `settings`:
    those before the last attempt, and those in its W&B run file (none for rows logged with other settings: this run's
    rows differ from them)."""
    try:
        logged = json.loads(path.read_text())
        if logged["run_id"] != run_id or logged["settings"] != settings:
            return {}
        rows, last = dict(logged["rows"]), rows_in_run_file(path.parent / logged["run_file"])
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or not ours
        return {}
    return {kind: max(rows.get(kind, -1), last.get(kind, -1)) for kind in rows.keys() | last.keys()}


def write_logged(path: Path, run, settings: dict[str, Any], rows: dict[str, int]) -> None:
    """logged.json as an attempt starts: the rows earlier attempts logged with these settings, and the W&B run file
    that holds this attempt's own. Written whole: a kill leaves the old file or the new."""
    run_file = os.path.relpath(run.settings.sync_file, path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"run_id": run.id, "settings": settings, "rows": rows, "run_file": run_file}))
    os.replace(tmp, path)


def rows_in_run_file(path: Path) -> dict[str, int]:
    """The last iteration of each kind of row in a W&B run file: what W&B really holds of an attempt. One killed, or
    whose W&B died, lost the rows W&B had not yet written (it writes its file every 15 s): those are logged again."""
    rows: dict[str, int] = {}
    # No file (W&B never wrote one), a damaged one, or one of a W&B whose format this does not know: from there on,
    # again (duplicate rows rather than none)
    with contextlib.suppress(OSError, ValueError, ImportError, AttributeError):
        for record in read_records(path):
            if record.WhichOneof("record_type") == "history":
                values = {item.key or "".join(item.nested_key[:1]): item.value_json for item in record.history.item}
                for kind in (kind for kind, key in ROW_KEYS.items() if key in values and "iter" in values):
                    rows[kind] = max(rows.get(kind, -1), json.loads(values["iter"]))
    return rows


def api_key_configured() -> bool:
    """True when W&B has credentials without asking: WANDB_API_KEY, or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """auto: WANDB_MODE if set, else online when logged in, offline otherwise. Never a login prompt."""
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if api_key_configured() else "offline")
    if mode == "online" and not api_key_configured():
        log.warning("mlxgpt: warning: W&B is set to online but no API key is configured (`wandb login` or "
                    "WANDB_API_KEY): logging offline; upload later with `wandb sync`")
        return "offline"
    return mode


def flat_config(cfg) -> dict[str, Any]:
    """The resolved config as one level of dotted keys (`optimizer.lr`): the names Hydra overrides use.

    wandb stores nested dicts as nested values (only the web UI flattens them); flat keys are the same
    everywhere: the UI's columns, the API's `run.config`, offline files, and `key=value` on the command line.
    Values of keys that look like credentials are masked.
    """
    return dotted(masked_container(cfg))


def group_choices() -> dict[str, str]:
    """The option of each config group the run used (`model: nano`, `experiment: shakespeare_char`), keyed as
    `group=option` overrides name them: W&B can group and filter runs by them as compare does. None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {group: option for group, option in choices.items() if option is not None and group.split("/")[0] != "hydra"}


def job_name_and_group(run_dir: Path) -> tuple[str, str]:
    """Name: the job's swept overrides with short keys (`lr=3e-4,n_layer=6`, floats to 4 significant digits); for a
    single run, its run_name when given, else all its overrides. Group: the multirun's sweep directory name (shared by
    its jobs), or the run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mlxgpt.rundir import swept_keys

    if not HydraConfig.initialized():
        return run_dir.name, run_dir.name
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    skip = set(hc.job.config.override_dirname.exclude_keys) | {"sweep", "hparams_search"}
    swept = swept_keys(hc) if multirun else set()
    pairs = []
    for override in hc.overrides.task:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "run_name" and not multirun:
            return value, run_dir.name
        if key in swept or not swept and key not in skip and not key.startswith(("paths.", "hydra.")):
            pairs.append((key, shown_value(value)))
    short = [key.rsplit(".", 1)[-1] for key, _ in pairs]
    name = ",".join(f"{s if short.count(s) == 1 else key}={value}" for (key, value), s in zip(pairs, short))
    return name or run_dir.name, Path(hc.sweep.dir).name if multirun else run_dir.name
