"""compare.py on real run directories: the table sorted by best val loss, the curves and the heatmap."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxgpt.compare import load_runs, varying_keys

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=nano", "model.n_embd=32", "model.block_size=32", "trainer.batch_size=4", "trainer.max_iters=10",
        "trainer.eval_interval=5", "trainer.eval_iters=2", "trainer.log_interval=5",
        "callbacks.sample.max_new_tokens=8", "logger=none"]  # compare needs no W&B data
PNG = b"\x89PNG\r\n\x1a\n"


def python(script: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLXGPT_DATA_DIR": str(cwd / "data")}
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """A 2x2 multirun (lr x depth) without W&B; returns its sweep dir."""
    tmp = tmp_path_factory.mktemp("compare_grid")
    python("train.py", "-m", *TINY, f"paths.log_dir={tmp}/logs", "hydra.sweep.dir=logs/grid",
           "optimizer.lr=1e-3,1e-2", "model.n_layer=1,2", cwd=tmp)
    return tmp / "logs" / "grid"


def lowest_val_loss_run(sweep_dir: Path) -> str:
    best = {}
    for metrics in sweep_dir.glob("*/metrics.jsonl"):
        evals = [r["val/loss"] for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "eval"]
        best[metrics.parent.name] = min(evals)
    return min(best, key=best.get)


@pytest.mark.slow
def test_compare_writes_a_sorted_table_curves_and_a_heatmap(grid, tmp_path):
    out = tmp_path / "cmp"
    proc = python("compare.py", str(grid), "--out", str(out), cwd=tmp_path)
    assert "(best)" in proc.stdout
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses)
    assert rows[0]["run"] == lowest_val_loss_run(grid) and rows[0]["is_best"] == "True"
    assert {(r["optimizer.lr"], r["model.n_layer"]) for r in rows} == {
        ("0.001", "1"), ("0.001", "2"), ("0.01", "1"), ("0.01", "2")}
    md = (out / "table.md").read_text().splitlines()
    assert md[2].startswith(f"| 1 (best) | {rows[0]['run']} |")
    for png in ("val_loss.png", "heatmap.png"):
        assert (out / png).read_bytes().startswith(PNG)


@pytest.mark.slow
def test_compare_takes_run_dirs_and_draws_no_heatmap_for_one_parameter(grid, tmp_path):
    run_dirs = [d for d in sorted(grid.iterdir()) if (d / ".hydra").is_dir()]
    same_depth = [d for d in run_dirs if "model.n_layer=1" in (d / ".hydra/overrides.yaml").read_text()]
    python("compare.py", *map(str, same_depth), cwd=tmp_path)
    out = grid / "compare"  # default: <common parent>/compare
    assert (out / "table.md").is_file() and (out / "val_loss.png").is_file() and not (out / "heatmap.png").exists()
    assert varying_keys(load_runs(same_depth)) == ["optimizer.lr"]


def test_compare_without_runs_is_a_one_line_user_error(tmp_path):
    proc = python("compare.py", str(tmp_path), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no run directories") and proc.stderr.count("\n") == 1
