"""What a multirun will run, known before its first job: the values each key takes, how many jobs that makes, and
the config of its first job (composed as the sweeper will compose it)."""
from __future__ import annotations

import math

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig


def planned_overrides(config: DictConfig) -> dict[str, Override]:
    """Key -> its override: the sweeper's params (conf/sweep/, an Optuna search space), then the command line's; a
    key given twice keeps its place and takes the last value, as Hydra's sweepers do."""
    params = config.hydra.sweeper.get("params") or {}
    args = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    plan: dict[str, Override] = {}
    for override in _parse(args):
        plan[override.get_key_element()] = override
    return plan


def values(override: Override) -> list[str] | None:
    """The values an override gives its key, as override text (None for a range an Optuna search draws from)."""
    if not override.is_sweep_override():
        return [override.get_value_element_as_str()]
    return list(override.sweep_string_iterator()) if override.is_discrete_sweep() else None


def swept_counts(config: DictConfig) -> dict[str, int]:
    """Each swept key's number of values (0 for a range that an Optuna search draws from)."""
    return {key: len(values(o) or []) for key, o in planned_overrides(config).items() if o.is_sweep_override()}


def is_search(config: DictConfig) -> bool:
    """Whether the sweeper searches (Optuna: a number of trials) rather than runs a grid."""
    return config.hydra.sweeper.get("n_trials") is not None


def job_count(config: DictConfig) -> int:
    """The number of jobs: an Optuna search's trials, else the product of each swept key's number of values."""
    return config.hydra.sweeper.n_trials if is_search(config) else math.prod(swept_counts(config).values())


def describe(config: DictConfig) -> str:
    """`6 jobs (optimizer.lr: 3 values x model.n_layer: 2)`, or `12 trials` of an Optuna search."""
    jobs = job_count(config)
    if is_search(config):
        return f"{jobs:,} trials"
    counts = swept_counts(config).items()
    swept = " x ".join(f"{key}: {n}" + (" values" if i == 0 else "") for i, (key, n) in enumerate(counts))
    return count_jobs(jobs) + (f" ({swept})" if swept else "")


def count_jobs(n: int) -> str:
    """`1 job`, `6 jobs`, `1,200 jobs`."""
    return f"{n:,} job{'s' * (n != 1)}"


def dropped_sweeps(config: DictConfig) -> list[str]:
    """The command line's sweeps (`optimizer.lr=1e-3,3e-3`) whose key a later override gives again: the later wins, as
    in Hydra's sweepers, so these values are never run."""
    overrides = _parse(list(config.hydra.overrides.task))
    keys = [o.get_key_element() for o in overrides]
    return [o.input_line for i, o in enumerate(overrides)
            if o.is_sweep_override() and o.get_key_element() in keys[i + 1:]]


def _parse(args: list[str]) -> list[Override]:
    """Overrides parsed as the sweepers parse them (a group's glob(...) lists the group's options)."""
    hydra = GlobalHydra.instance()
    loader = hydra.config_loader() if hydra.is_initialized() else None
    return OverridesParser.create(config_loader=loader).parse_overrides(args)


def first_job_config(config: DictConfig) -> DictConfig:
    """The config of the sweep's first job: each swept key at its first value (a range: its lower bound)."""
    overrides = []
    for key, override in planned_overrides(config).items():
        given = values(override)
        overrides.append(f"{key}={given[0] if given else override.value().start}")
    return GlobalHydra.instance().config_loader().load_sweep_config(config, overrides)
