"""Preflight for single runs: config checks and run-directory safety before Hydra writes into the run dir."""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from mlxgpt.cli import fail
from mlxgpt.config import validate
from mlxgpt.errors import UserError


def refuse_used_run_dir(run_dir: Path) -> None:
    """UserError when `run_dir` already has checkpoints (resume it or pick a new run_name)."""
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        raise UserError(f"run directory {run_dir} already has checkpoints: continue it with trainer.resume=auto "
                        f"or start a new run with a different run_name")


class PreflightCheck(HydraCallback):
    """Validates the config and the run dir before Hydra writes `.hydra/` into it: a refused run changes nothing."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            validate(config)
            if config.trainer.resume is None and not config.trainer.eval_only:
                refuse_used_run_dir(Path(config.hydra.run.dir))
        except UserError as e:
            fail(str(e))  # Hydra turns a callback's exception into a warning and goes on: exit here
