"""Read an offline W&B run file (`run-<id>.wandb`) back: its config, run info, history, summary."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxgpt.wandb_file import read_records


def _key(item) -> str:
    """A history/summary item's key; nested keys (e.g. a table's `samples`, `nrows`) join with '.'."""
    return item.key or ".".join(item.nested_key)


@dataclass
class OfflineRun:
    """What one offline run file says about its run."""

    run_id: str = ""
    project: str = ""
    group: str = ""
    name: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    summary_removed: list[str] = field(default_factory=list)  # keys this file deletes from the run's summary
    metrics: dict[str, Any] = field(default_factory=dict)  # define_metric: name -> its MetricRecord
    artifacts: list[Any] = field(default_factory=list)  # ArtifactRecords (type, name, aliases, manifest)
    exit_code: int | None = None

    def values(self, key: str) -> list[Any]:
        """A metric's logged values, in order."""
        return [row[key] for row in self.history if key in row]


def read_run(path: str | Path) -> OfflineRun:
    """Fold the records of a run file into an OfflineRun."""
    run = OfflineRun()
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.group = r.run_id, r.project, r.run_group
            run.name, run.job_type, run.tags = r.display_name, r.job_type, list(r.tags)
            _update_config(run.config, r.config)
        elif kind == "config":
            _update_config(run.config, record.config)
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
            for item in record.summary.remove:
                run.summary.pop(_key(item), None)
                run.summary_removed.append(_key(item))
        elif kind == "metric":
            run.metrics[record.metric.name or record.metric.glob_name] = record.metric
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def _update_config(config: dict, record) -> None:
    for item in record.update:
        if _key(item) != "_wandb":
            config[_key(item)] = json.loads(item.value_json)
    for item in record.remove:
        config.pop(_key(item), None)


def find_run_files(root: str | Path) -> list[Path]:
    """The run files under a directory (the real `*-run-*` dirs, not the `latest-run` link)."""
    return sorted(p for p in Path(root).rglob("run-*.wandb") if "latest-run" not in p.parts)
