"""Sweeps: failed jobs are recorded and the others run, the sweep summary, the YAML grid, an optuna search."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mlxgpt.cli import multirun_flag_first
from mlxgpt.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=nano", "model.n_embd=32", "model.block_size=32", "trainer.batch_size=4", "trainer.max_iters=10",
        "trainer.eval_interval=5", "trainer.eval_iters=2", "trainer.log_interval=5",
        "callbacks.sample.max_new_tokens=8", "logger=none"]


def multirun(tmp: Path, *overrides: str, returncode: int = 0) -> subprocess.CompletedProcess:
    """A sweep of the TINY model; -m between its overrides, where Hydra alone would refuse it."""
    env = {**os.environ, "MLXGPT_DATA_DIR": str(tmp / "data")}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "-m", f"paths.log_dir={tmp}/logs",
                           "hydra.sweep.dir=logs/sweep", *overrides],
                          capture_output=True, text=True, cwd=tmp, env=env, timeout=300)
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def files(path: Path) -> dict[str, bytes]:
    """Every file under path but lock files (they name their latest holder) and job logs (each attempt appends)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name not in (".lock", "train.log")}


def result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory):
    """Three jobs: a good lr, an invalid one (rejected at start), one that diverges to NaN (fails mid-run)."""
    tmp = tmp_path_factory.mktemp("failing_sweep")
    proc = multirun(tmp, "optimizer.lr=3e-3,-1,1e4", "trainer.grad_clip=0", returncode=1)  # all ran, two failed
    assert proc.stderr.strip().splitlines()[-1] == "mlxgpt: 2 job(s) of the sweep failed: 1, 2"
    return tmp / "logs" / "sweep"


@pytest.mark.slow
def test_failed_jobs_are_recorded_and_the_others_run(failing_sweep):
    good, invalid, diverged = (result(failing_sweep / str(i)) for i in range(3))
    assert good["status"] == "ok" and good["iter"] == 10
    assert invalid["status"] == "failed" and "optimizer.lr" in invalid["error"]
    assert diverged["status"] == "failed" and "non-finite" in diverged["error"]
    # Each job of the shared process starts from the same seeded state: same initial weights, same eval batches.
    first_evals = [json.loads((failing_sweep / str(i) / "metrics.jsonl").read_text().splitlines()[0]) for i in (0, 2)]
    assert first_evals[0]["iter"] == 0 and first_evals[0]["val/loss"] == first_evals[1]["val/loss"]


@pytest.mark.slow
def test_summary_lists_every_job_marks_the_best_and_the_failures(failing_sweep):
    rows = list(csv.DictReader(open(failing_sweep / "summary.csv")))
    assert [(r["run"], r["status"], r["is_best"]) for r in rows] == [
        ("0", "ok", "True"), ("1", "failed", "False"), ("2", "failed", "False")]
    assert float(rows[0]["best_val_loss"]) == result(failing_sweep / "0")["best/val_loss"]
    assert rows[0]["overrides"] == "optimizer.lr=0.003" and rows[0]["optimizer.lr"] == "0.003"
    assert "non-finite" in rows[2]["error"] and float(rows[0]["tok_per_s"]) > 0
    md = (failing_sweep / "summary.md").read_text()
    assert "| 1 (best) | 0 | optimizer.lr=0.003 |" in md
    assert md.count("| failed: ") == 2 and "so far" not in md  # every job ran


@pytest.mark.slow
def test_a_sweep_into_a_used_directory_is_refused_and_a_changed_grid_does_not_continue_other_jobs(failing_sweep,
                                                                                                  tmp_path):
    shutil.copytree(failing_sweep.parents[1], tmp_path, dirs_exist_ok=True)  # logs/ and the prepared data
    sweep = tmp_path / "logs" / "sweep"
    before = files(sweep / "0")
    again = multirun(tmp_path, "optimizer.lr=3e-3,-1,1e4", "trainer.grad_clip=0", returncode=2)
    assert again.stderr.strip().splitlines()[-1].startswith("error: sweep directory logs/sweep already has jobs")
    assert files(sweep / "0") == before and "Traceback" not in again.stderr
    changed = multirun(tmp_path, "optimizer.lr=1e-3", "trainer.grad_clip=0", "trainer.resume=auto", returncode=1)
    assert "job directory" in changed.stderr and "was trained with optimizer.lr=0.003 (now 0.001)" in changed.stderr
    assert files(sweep / "0") == before  # neither continued nor relabelled: its records are those of lr=0.003


@pytest.mark.slow
def test_a_job_that_cannot_fit_in_memory_fails_like_an_invalid_value_and_the_others_run(tmp_path):
    proc = multirun(tmp_path, "trainer.batch_size=4,100000000", "trainer.max_iters=5", returncode=1)
    assert proc.stderr.strip().splitlines()[-1] == "mlxgpt: 1 job(s) of the sweep failed: 1"
    assert "error: job failed: the batch does not fit in memory: a micro-batch of 100000000 x 32" in proc.stderr
    assert "Traceback" not in proc.stderr and "may not fit" not in proc.stderr  # the other job: not even a warning
    sweep = tmp_path / "logs" / "sweep"
    good, absurd = result(sweep / "0"), result(sweep / "1")
    assert good["status"] == "ok" and good["iter"] == 5
    assert absurd["status"] == "failed" and "does not fit in memory" in absurd["error"]
    assert not (sweep / "1" / "checkpoints").exists() and not (sweep / "1" / "metrics.jsonl").exists()


@pytest.mark.parametrize("sweep, setting, error", [
    ("optimizer.lr=1e-3,3e-3", "trainer.batch_size=-1", "error: invalid trainer.batch_size=-1: must be >= 1"),
    ("hparams_search=lr_depth_optuna", "init_from=missing", "error: checkpoint missing does not exist"),
    ("hydra/launcher=submitit_local optimizer.lr=1e-3,3e-3", "+trainer.max_iter=5",
     "error: unknown config key 'trainer.max_iter' (added with +)"),
    ("optimizer.lr=1e-3,3e-3 data=text", "data.path=missing.txt", "error: data.path=missing.txt matches no file")])
def test_a_setting_every_job_shares_that_is_wrong_refuses_the_sweep_before_any_job(tmp_path, sweep, setting, error):
    proc = multirun(tmp_path, *sweep.split(), setting, returncode=2)
    assert proc.stderr.strip().splitlines()[-1].startswith(error) and "job failed" not in proc.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("sweep, error", [
    ("optimizer.lr=3e-3,abc", "error: invalid value for 'optimizer.lr': Value 'abc' of type 'str'"),
    ("hydra/launcher=submitit_local model=nano,nope", "error: no option 'nope' in config group 'model'"),
    ("optimizer.lr=interval(1e-4,1e-3)", "error: interval(...) is a range to search, which a grid sweep cannot")])
def test_a_sweep_that_hydra_refuses_before_any_job_leaves_nothing_and_keeps_what_its_directory_held(tmp_path, sweep,
                                                                                                       error):
    proc = multirun(tmp_path, *sweep.split(), returncode=2)  # Hydra rejects a value once the sweep dir is made
    assert proc.stderr.strip().splitlines()[-1].startswith(error) and "Traceback" not in proc.stderr
    assert not (tmp_path / "logs").exists()
    used = tmp_path / "logs" / "sweep"
    used.mkdir(parents=True)
    (used / "multirun.yaml").write_text("an earlier sweep's\n")
    (used / "notes.txt").write_text("kept\n")
    multirun(tmp_path, *sweep.split(), returncode=2)
    assert files(used) == {"multirun.yaml": b"an earlier sweep's\n", "notes.txt": b"kept\n"}


def test_a_setting_that_only_some_jobs_refuse_fails_those_jobs_alone(tmp_path):
    every = multirun(tmp_path, "optimizer.lr=1e-3,3e-3", "data.path=missing.txt", returncode=2)
    assert every.stderr.strip().splitlines()[-1].startswith("error: data.path=missing.txt is not read by data=pydoc")
    proc = multirun(tmp_path, "data=text,pydoc", "data.path=missing.txt", returncode=1)  # pydoc reads no data.path
    assert "error: job failed: data.path=missing.txt matches no file" in proc.stderr
    assert "error: job failed: data.path=missing.txt is not read by data=pydoc" in proc.stderr
    assert {r["run"] for r in csv.DictReader(open(tmp_path / "logs" / "sweep" / "summary.csv"))} == {"0", "1"}


def test_a_sweep_says_how_many_jobs_it_runs_and_which_sweep_a_later_override_replaces(tmp_path):
    proc = multirun(tmp_path, "optimizer.lr=1e-3,3e-3", "model.n_layer=1,2", "optimizer.lr=1e-2",
                    "trainer.max_iters=1", "trainer.eval_interval=1")
    assert "mlxgpt: sweep of 2 jobs (model.n_layer: 2 values) into logs/sweep\n" in proc.stdout
    assert "mlxgpt: sweep of 2 jobs (0 failed) summarised in " in proc.stdout
    assert ("mlxgpt: warning: optimizer.lr=1e-3,3e-3 is not swept: a later override of its key replaces it; give each "
            "key once") in proc.stderr
    assert sorted(p.name for p in (tmp_path / "logs" / "sweep").glob("[0-9]*")) == ["0", "1"]


def test_a_huge_grid_is_announced_before_hydra_composes_its_jobs(tmp_path):
    command = [sys.executable, str(ROOT / "train.py"), "-m", *TINY, f"paths.log_dir={tmp_path}/logs",
               "hydra.sweep.dir=logs/sweep", "trainer.seed=range(0,100)", "model.n_layer=range(1,31)"]
    with subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        lines = iter(proc.stderr.readline, "")
        warning = next(line for line in lines if "warning" in line or "error" in line)
        proc.send_signal(signal.SIGINT)  # the user's Ctrl-C: no job started
        assert proc.wait(timeout=60) == 130
        assert "mlxgpt: sweep of 3,000 jobs (trainer.seed: 100 values x model.n_layer: 30) into" in proc.stdout.read()
    assert warning.startswith("mlxgpt: warning: 3,000 jobs: Hydra checks each job's config before the first starts")
    assert not (tmp_path / "logs").exists()  # no job ran: nothing to continue


@pytest.mark.skipif(shutil.which("srun") is not None, reason="Slurm is installed here: the sweep would be submitted")
def test_a_slurm_sweep_without_slurm_is_one_line_and_writes_nothing(tmp_path):
    proc = multirun(tmp_path, "hydra/launcher=slurm", "hydra.launcher.partition=p", "optimizer.lr=3e-4,6e-4",
                    returncode=2)
    assert proc.stderr.strip().splitlines() == [
        "error: hydra/launcher=slurm needs Slurm (no srun on PATH): start the sweep on the cluster, or try it on this "
        "machine with hydra/launcher=submitit_local"]
    assert not (tmp_path / "logs").exists()


def test_the_multirun_flag_anywhere_is_moved_before_the_overrides():
    assert multirun_flag_first(["a=1", "-m", "b=1,2"]) == ["-m", "a=1", "b=1,2"]
    assert multirun_flag_first(["a=1", "b=1,2", "--multirun"]) == ["--multirun", "a=1", "b=1,2"]
    assert multirun_flag_first(["run_name=-m", "b=--multirun"]) == ["run_name=-m", "b=--multirun"]


def test_yaml_sweep_declares_the_lr_depth_grid():
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["sweep=lr_depth"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert [len(str(params[k]).split(",")) for k in ("optimizer.lr", "model.n_layer")] == [3, 3]


@pytest.mark.slow
def test_optuna_search_runs_its_trials_and_reports_the_best(tmp_path):
    multirun(tmp_path, "hparams_search=lr_depth_optuna", "hydra.sweeper.n_trials=2")
    sweep_dir = tmp_path / "logs" / "sweep"
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    values = [result(sweep_dir / str(i))["best/val_loss"] for i in range(2)]
    assert not (sweep_dir / "2").exists()
    assert best.best_value == min(values)
    assert set(best.best_params) == {"optimizer.lr", "model.n_layer"}
    assert 1e-4 <= best.best_params["optimizer.lr"] <= 3e-3
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))  # sorted by best val loss
    assert sorted(r["run"] for r in rows) == ["0", "1"] and {r["status"] for r in rows} == {"ok"}
    assert (float(rows[0]["best_val_loss"]), rows[0]["is_best"], rows[1]["is_best"]) == (best.best_value, "True",
                                                                                         "False")


@pytest.mark.slow
def test_a_sweep_stopped_by_ctrl_c_before_training_is_interrupted_says_how_to_continue_and_has_a_summary(tmp_path):
    env = {**os.environ, "MLXGPT_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/ctrl_c_in_setup.py"), "1", str(ROOT / "train.py"), "-m",
                           *TINY, f"paths.log_dir={tmp_path}/logs", "hydra.sweep.dir=logs/sweep",
                           "optimizer.lr=1e-3,2e-3,3e-3"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("mlxgpt: stopped by SIGINT before training started; no checkpoint saved; continue with:")
    assert message.endswith("hydra.sweep.dir=logs/sweep trainer.resume=auto")
    sweep = tmp_path / "logs" / "sweep"
    assert result(sweep / "1") == {"status": "interrupted", "iter": None} and not (sweep / "2").exists()
    assert "Traceback" not in (sweep / "1" / "train.log").read_text()
    rows = list(csv.DictReader(open(sweep / "summary.csv")))  # the jobs so far, though the multirun never ended
    assert [(r["run"], r["status"], r["is_best"]) for r in rows] == [("0", "ok", "True"), ("1", "interrupted", "False")]
    assert (sweep / "summary.md").read_text().endswith(
        "\n2 of the sweep's 3 jobs so far: the others have not started\n")


@pytest.mark.parametrize("launcher, refused", [("basic", True), ("slurm", False)])
def test_a_sweep_is_refused_for_missing_files_only_where_its_jobs_run_on_this_machine(launcher, refused):
    """A Slurm node may see files (data, init_from) that the machine submitting the sweep does not."""
    from mlxgpt import rundir

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "init_from=missing", "data=text",
                                           "data.path=missing.txt"], return_hydra_config=True)
        try:
            rundir.refuse_sweep_wide_error(cfg)
        except rundir.UserError as e:
            assert refused and "data.path=missing.txt matches no file" in str(e)
        else:
            assert not refused
