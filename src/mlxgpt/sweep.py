"""A sweep's plan announced at its start (how many jobs), and its summary.md + summary.csv in its sweep dir (every job,
its status, the best marked): updated as each job ends, and reported at the end of the multirun."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mlxgpt import sweep_plan
from mlxgpt.cli import report_failed_jobs
from mlxgpt.compare import Run, best_run, describe, load_runs, varying_keys, write_table
from mlxgpt.errors import UserError
from mlxgpt.rundir import settle_sweep

MANY_JOBS = 1000  # a grid's jobs whose configs Hydra composes before the first starts (~0.1 s each): minutes


class SweepSummary(Callback):
    """Registered in conf/hydra/default.yaml (`hydra.callbacks`); runs for every sweeper (basic grid, optuna)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        for override in sweep_plan.dropped_sweeps(config):
            print(f"mlxgpt: warning: {override} is not swept: a later override of its key replaces it; give each key "
                  f"once", file=sys.stderr)
        jobs = sweep_plan.job_count(config)
        if jobs:  # else a range for the basic sweeper, which refuses it
            print(f"mlxgpt: sweep of {sweep_plan.describe(config)} into {config.hydra.sweep.dir}", flush=True)
        if jobs > MANY_JOBS and not sweep_plan.is_search(config):
            print(f"mlxgpt: warning: {jobs:,} jobs: Hydra checks each job's config before the first "
                  f"starts, which takes minutes; Ctrl-C and narrow the sweep if you meant fewer", file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        settle_sweep(sweep_dir)
        runs = write_summary(sweep_dir)
        if runs is None:  # no job got as far as writing its run dir
            print(f"mlxgpt: no sweep summary written: no job directory in {sweep_dir}")
            report_failed_jobs(["all"])
            return
        failed = [r for r in runs if r.status != "ok"]
        best = best_run(runs)
        print(f"mlxgpt: sweep of {sweep_plan.count_jobs(len(runs))} ({len(failed)} failed) summarised in {sweep_dir / 'summary.md'} and "
              f"{sweep_dir / 'summary.csv'}")
        if best is not None:
            print(f"mlxgpt: best job {best.name}: {describe(best, varying_keys(runs))}, "
                  f"best val loss {best.best_val_loss:.4f}")
        else:
            print("mlxgpt: no job finished, so there is no best job (whatever a sweeper printed as best)")
        report_failed_jobs([r.name for r in failed])


def write_summary(sweep_dir: Path) -> list[Run] | None:
    """summary.md + summary.csv of the sweep's jobs so far (also written as each job ends); None when it has none."""
    try:
        runs = load_runs([sweep_dir])
    except UserError:
        return None
    planned = sweep_plan.job_count(OmegaConf.load(sweep_dir / "multirun.yaml"))
    unstarted = f"{len(runs)} of the sweep's {planned} jobs so far: the others have not started"
    write_table(runs, sweep_dir, "summary", unstarted if len(runs) < planned else "")
    return runs
