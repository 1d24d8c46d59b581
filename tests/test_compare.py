"""compare.py on real run directories: the table sorted by best val loss, the curves and the heatmap."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlxgpt.compare import find_run_dirs, is_continuous, load_runs, varying_keys
from mlxgpt.config import shown_value
from mlxgpt.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=nano", "model.n_embd=32", "model.block_size=32", "trainer.batch_size=4", "trainer.max_iters=10",
        "trainer.eval_interval=5", "trainer.eval_iters=2", "trainer.log_interval=5",
        "callbacks.sample.max_new_tokens=8", "logger=none"]  # compare needs no W&B data
PNG = b"\x89PNG\r\n\x1a\n"
UNRESOLVABLE = "${oc.env:MLXGPT_COMPARE_GROUP}"  # set for the run only: compare cannot resolve it


def python(script: str, *args: str, cwd: Path, check: bool = True, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLXGPT_DATA_DIR": str(cwd / "data"), **env_vars}
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def sweep(tmp_path_factory, name: str, *overrides: str) -> Path:
    """`train.py -m <overrides>` into logs/<name> of a fresh directory; returns that sweep dir."""
    tmp = tmp_path_factory.mktemp(f"compare_{name}")
    python("train.py", "-m", *TINY, f"paths.log_dir={tmp}/logs", f"hydra.sweep.dir=logs/{name}", *overrides, cwd=tmp)
    return tmp / "logs" / name


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """A 2x2 multirun (lr x depth) without W&B; returns its sweep dir."""
    return sweep(tmp_path_factory, "grid", "optimizer.lr=1e-3,1e-2", "model.n_layer=1,2")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Runs from separate commands, as compared across sweeps: logs/runs/named (run_name=named, model.n_layer=1),
    logs/deep/0 (model.n_layer=2, lr left at its default 6e-4), logs/slow/0 (optimizer.lr=1e-4, model.n_layer=1; the
    sweep writes it 0.0001), logs/given (the same, written 1e-4 as given), logs/env (logger.group=UNRESOLVABLE) and
    logs/constant (schedule=constant) and logs/evaluated (trainer.eval_only=true of logs/given); returns the dir
    holding logs/."""
    tmp = tmp_path_factory.mktemp("compare_mixed")
    for args in (["run_name=named", "model.n_layer=1"], ["-m", "hydra.sweep.dir=logs/deep", "model.n_layer=2"],
                 ["-m", "hydra.sweep.dir=logs/slow", "optimizer.lr=1e-4", "model.n_layer=1"],
                 ["hydra.run.dir=logs/given", "optimizer.lr=1e-4", "model.n_layer=1"],
                 ["hydra.run.dir=logs/env", f"logger.group={UNRESOLVABLE}"],
                 ["hydra.run.dir=logs/constant", "schedule=constant"],
                 ["hydra.run.dir=logs/evaluated", f"init_from={tmp}/logs/given", "model.n_layer=1", "trainer.eval_only=true"]):
        multirun = args[:1] == ["-m"]
        python("train.py", *args[:multirun], *TINY, f"paths.log_dir={tmp}/logs", *args[multirun:], cwd=tmp,
               MLXGPT_COMPARE_GROUP="group")
    return tmp


@pytest.fixture(scope="module")
def search(tmp_path_factory) -> Path:
    """A 6-trial Optuna search (lr from a range, depth from 2, 4, 6); returns its sweep dir."""
    return sweep(tmp_path_factory, "search", "hparams_search=lr_depth_optuna", "hydra.sweeper.n_trials=6")


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
    assert "| best val loss | at iter |" in md[0] and "| params | train time |" in md[0]
    for r in rows:  # what picks a run besides its loss: when it was best, its size, its cost
        evals = [e for e in map(json.loads, (grid / r["run"] / "metrics.jsonl").read_text().splitlines())
                 if e["event"] == "eval"]
        assert int(r["best_iter"]) == min(evals, key=lambda e: e["val/loss"])["iter"]
        state = json.loads((grid / r["run"] / "checkpoints/last/state.json").read_text())
        assert int(r["num_params"]) == GPT(GPTConfig(**state["model_config"])).num_params()
        assert 0 < float(r["train_seconds"]) < 60
    assert {r["num_params"] for r in rows if r["model.n_layer"] == "1"} != {r["num_params"] for r in rows
                                                                          if r["model.n_layer"] == "2"}
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


def files(directory: Path) -> dict[str, bytes | None]:
    """Every path below `directory` with its bytes (None for a directory): to prove that nothing was written there."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in directory.rglob("*")}


def fake_run(directory: Path) -> Path:
    """A run directory as compare sees one: a config and one evaluation."""
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "config.yaml").write_text("run_name: x\n")
    (directory / "metrics.jsonl").write_text(json.dumps({"event": "eval", "iter": 0, "val/loss": 3.0}) + "\n")
    return directory


@pytest.mark.slow
def test_comparing_one_run_writes_beside_it_and_leaves_the_run_directory_as_it_was(mixed, tmp_path):
    run = tmp_path / "logs" / "runs" / "named"
    shutil.copytree(mixed / "logs/runs/named", run, symlinks=True)
    before = files(run)
    proc = python("compare.py", str(run), cwd=tmp_path)
    assert files(run) == before
    out = tmp_path / "logs" / "runs" / "compare"  # as for several runs of logs/runs
    assert proc.stdout.endswith(f"wrote {out}/table.md, {out}/table.csv, {out}/val_loss.png\n"), proc.stdout[-500:]


@pytest.mark.parametrize("args, error", [
    (["logs/a", "--out", "logs/a/cmp"], "--out logs/a/cmp is inside the run directory logs/a"),
    (["logs/a", "--out", "logs/compare"], "--out logs/compare is a run directory"),
    (["logs/a"], "the default output directory logs/compare is a run directory")])  # a run named compare
def test_compare_refuses_to_write_into_a_run_directory(tmp_path, args, error):
    runs = [fake_run(tmp_path / "logs" / name) for name in ("a", "compare")]
    before = [files(run) for run in runs]
    proc = python("compare.py", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr == (f"error: {error} (a run's record, which compare leaves as it was); "
                                                    f"pick another --out\n"), proc.stderr
    assert [files(run) for run in runs] == before


def test_compare_without_runs_is_a_one_line_user_error(tmp_path):
    proc = python("compare.py", str(tmp_path), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no run directories") and proc.stderr.count("\n") == 1
    make = subprocess.run(["make", "-s", "-C", str(ROOT), "compare"], capture_output=True, text=True, timeout=60)
    assert make.returncode == 2 and make.stderr.startswith("error: no runs given; make compare RUNS=")


@pytest.mark.slow
def test_compare_a_named_run_with_a_sweep_job(mixed, tmp_path):
    """run_name (set in one, ${now:...} in the other) is where a run is kept, not a parameter."""
    runs = [mixed / "logs/runs/named", mixed / "logs/deep/0"]
    python("compare.py", *map(str, runs), "--out", str(tmp_path), cwd=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "table.csv")))
    assert sorted(r["model.n_layer"] for r in rows) == ["1", "2"]
    assert "run_name" not in rows[0] and varying_keys(load_runs(runs)) == ["model.n_layer"]


@pytest.mark.slow
def test_compare_shows_a_value_it_cannot_resolve_as_written(mixed, tmp_path):
    python("compare.py", str(mixed / "logs/env"), "--out", str(tmp_path), cwd=tmp_path)
    assert next(csv.DictReader(open(tmp_path / "table.csv")))["logger.group"] == UNRESOLVABLE


@pytest.mark.slow
def test_compare_shows_a_default_value_and_draws_its_heatmap(mixed, tmp_path):
    """logs/deep/0 left lr at its default: the table and the heatmap take it from the run's config."""
    python("compare.py", str(mixed / "logs/deep/0"), str(mixed / "logs/slow/0"), "--out", str(tmp_path), cwd=tmp_path)
    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "table.csv"))}
    assert (rows["deep/0"]["optimizer.lr"], rows["slow/0"]["optimizer.lr"]) == ("0.0006", "0.0001")
    assert "| deep/0 | model.n_layer=2,optimizer.lr=0.0006 |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "heatmap.png").read_bytes().startswith(PNG)


@pytest.mark.slow
def test_compare_shows_the_default_option_of_a_config_group(mixed, tmp_path):
    """logs/env kept the default schedule (cosine), logs/constant chose schedule=constant."""
    python("compare.py", str(mixed / "logs/env"), str(mixed / "logs/constant"), "--out", str(tmp_path), cwd=tmp_path)
    rows = {r["run"]: r["schedule"] for r in csv.DictReader(open(tmp_path / "table.csv"))}
    assert rows == {"env": "cosine", "constant": "constant"}
    assert "| env | schedule=cosine," in (tmp_path / "table.md").read_text()


@pytest.mark.slow
def test_compare_shows_the_val_loss_of_an_eval_only_run(mixed):
    evaluated = load_runs([mixed / "logs/evaluated"])[0]
    result = json.loads((mixed / "logs/evaluated/result.json").read_text())
    assert evaluated.best_val_loss == result["val/loss"] and evaluated.status == "ok"


@pytest.mark.slow
def test_common_settings_include_those_only_some_runs_override(mixed, tmp_path):
    """logs/deep/0 sets model.n_layer=2, logs/constant keeps nano's 2: common to both, though listed first."""
    python("compare.py", str(mixed / "logs/constant"), str(mixed / "logs/deep/0"), "--out", str(tmp_path), cwd=tmp_path)
    common = (tmp_path / "table.md").read_text().split("Common to all runs: ")[1]
    assert "model.n_layer=2" in common and "schedule" not in common


@pytest.mark.slow
def test_the_same_value_written_two_ways_does_not_vary(mixed):
    runs = load_runs([mixed / "logs/slow/0", mixed / "logs/given"])
    assert sorted(r.overrides["optimizer.lr"] for r in runs) == ["0.0001", "1e-4"]
    assert varying_keys(runs) == []


@pytest.mark.slow
def test_a_search_is_drawn_as_a_scatter_and_tabled_with_short_values(search, grid, tmp_path):
    runs = load_runs([search])
    assert varying_keys(runs) == ["optimizer.lr", "model.n_layer"]
    assert is_continuous(runs, "optimizer.lr") and not is_continuous(runs, "model.n_layer")
    assert not is_continuous(load_runs([grid]), "optimizer.lr")  # 2 values, each in 2 runs: a grid
    for lr in (r.value("optimizer.lr") for r in runs):  # 0.00024380478036384822 -> 0.0002438
        label = shown_value(lr)
        assert len(label.replace(".", "").lstrip("0").split("e")[0]) <= 4 and float(label) == pytest.approx(lr, 5e-4)
    python("compare.py", str(search), "--out", str(tmp_path), cwd=tmp_path)
    assert (tmp_path / "heatmap.png").read_bytes().startswith(PNG)
    table = (tmp_path / "table.md").read_text()
    rows = list(csv.DictReader(open(tmp_path / "table.csv")))
    for run, row in zip(sorted(runs, key=lambda r: r.name), sorted(rows, key=lambda r: r["run"])):
        lr, given = run.value("optimizer.lr"), run.overrides["optimizer.lr"]
        assert float(row["optimizer.lr"]) == lr and row["overrides"].startswith(f"optimizer.lr={given},")  # whole
        assert f"| {run.name} | optimizer.lr={lr:.4g},model.n_layer=" in table and repr(lr) not in table


def test_copies_of_records_in_hidden_folders_are_not_runs(tmp_path):
    for run in ("sweep/0", "sweep/0/.previous_attempt"):  # a continued job's kept records
        (tmp_path / run / ".hydra").mkdir(parents=True)
        (tmp_path / run / ".hydra" / "config.yaml").write_text("run_name: x\n")
    assert find_run_dirs([tmp_path / "sweep"]) == [tmp_path / "sweep" / "0"]


def test_an_out_dir_that_cannot_be_created_is_a_one_line_user_error(tmp_path):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("run_name: run\n")
    (tmp_path / "file").write_text("")
    proc = python("compare.py", "run", "--out", "file/compare", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr == ("error: cannot create --out file/compare (Not a directory); pick "
                                                    "a writable directory\n"), proc.stderr


@pytest.mark.slow
def test_a_reader_that_stops_early_ends_compare_quietly(grid, tmp_path):
    """`compare.py <sweep> | head`: no BrokenPipeError traceback when the reader closes the pipe."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "compare.py"), str(grid), "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before compare prints anything
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and stderr == "" and (tmp_path / "table.md").is_file()


@pytest.mark.slow
def test_runs_that_never_evaluated_are_compared_without_warnings(tmp_path):
    sweep = python("train.py", "-m", *TINY, f"paths.log_dir={tmp_path}/logs", "hydra.sweep.dir=logs/failed",
                   "optimizer.lr=nan,inf", cwd=tmp_path, check=False)  # the jobs fail before their first evaluation
    assert sweep.returncode == 1
    proc = python("compare.py", "logs/failed", "--out", "out", cwd=tmp_path)
    assert proc.stderr == "" and "| 1 | 0 | " in proc.stdout and "| 2 | 1 | " in proc.stdout
    assert (tmp_path / "out" / "val_loss.png").read_bytes().startswith(PNG)


@pytest.mark.slow
def test_the_curves_legend_is_whole_however_long_its_labels(mixed, tmp_path):
    """Runs from separate commands differ in many settings: their long labels were cut off at the image's right edge,
    with matplotlib's 'Tight layout not applied' warning on stderr."""
    import matplotlib.image

    proc = python("compare.py", str(mixed / "logs"), "--out", str(tmp_path), cwd=tmp_path)
    assert proc.stderr == ""
    image = matplotlib.image.imread(tmp_path / "val_loss.png")
    assert (image[:, -3:, :3] == 1).all()  # white margin: nothing drawn across the right edge
    assert image.shape[1] < 2000  # labels wrapped, not one long line each


def test_every_curve_of_many_runs_has_a_style_of_its_own(grid, search, mixed, tmp_path, monkeypatch):
    """More runs than matplotlib's 10 colours: the 11th curve was drawn exactly as the 1st (the best)."""
    import matplotlib.pyplot as plt

    from mlxgpt.compare import plot_val_curves

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    runs = load_runs([grid, search, mixed / "logs"])
    plot_val_curves(runs, tmp_path / "val_loss.png")
    lines = figures[0].axes[0].get_lines()
    assert len(lines) > 10
    assert len({(line.get_color(), line.get_marker()) for line in lines}) == len(lines)
    assert all(float(tick).is_integer() for tick in figures[0].axes[0].get_xticks())  # iterations, not 2.5
