"""What a multirun will run, known before its first job: the values each key takes, how many jobs that makes, and
the config of its first job (composed as the sweeper will compose it)."""
from __future__ import annotations

import math

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig


def planned_overrides(config: DictConfig) -> dict[str, Override]:
    """Key -> its override: the sweeper's params (conf/sweep/, an Optuna search space), then the command line's; a
    key given twice keeps its place and takes the last value, as Hydra's sweepers do."""
    params = config.hydra.sweeper.get("params") or {}
    args = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    plan: dict[str, Override] = {}
    for override in OverridesParser.create().parse_overrides(args):
        plan[override.get_key_element()] = override
    return plan


def values(override: Override) -> list[str] | None:
    """The values an override gives its key, as override text (None for a range an Optuna search draws from)."""
    if not override.is_sweep_override():
        return [override.get_value_element_as_str()]
    return list(override.sweep_string_iterator()) if override.is_discrete_sweep() else None


def job_count(config: DictConfig) -> int:
    """The number of jobs: an Optuna search's trials, else the product of each key's number of values."""
    trials = config.hydra.sweeper.get("n_trials")
    if trials is not None:
        return trials
    return math.prod(len(values(o) or [None]) for o in planned_overrides(config).values())


def first_job_config(config: DictConfig) -> DictConfig:
    """The config of the sweep's first job: each swept key at its first value (a range: its lower bound)."""
    from hydra.core.global_hydra import GlobalHydra

    overrides = []
    for key, override in planned_overrides(config).items():
        given = values(override)
        overrides.append(f"{key}={given[0] if given else override.value().start}")
    return GlobalHydra.instance().config_loader().load_sweep_config(config, overrides)
