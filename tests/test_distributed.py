"""Data parallel: 2 ranks (mlx.launch, ring backend over loopback) train exactly as 1 rank with the same global batch."""
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlxgpt import device

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=nano", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
        "trainer.batch_size=4", "trainer.eval_iters=2", "trainer.log_interval=1", "trainer.max_iters=6",
        "trainer.eval_interval=3", "callbacks.sample.max_new_tokens=0"]
LAUNCH = Path(sys.executable).parent / "mlx.launch"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(tmp_path: Path, run_name: str, args: list[str], ranks: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLXGPT_DATA_DIR": str(tmp_path / "data"), "OPENBLAS_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "train.py"), *TINY, *args, f"paths.log_dir={tmp_path}/logs",
               f"run_name={run_name}"]
    if ranks > 1:
        command = [str(LAUNCH), "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_port()), "--",
                   *command]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and "exited with code" not in output, output  # mlx.launch exits 0 when a rank fails
    return proc


def metrics(run_dir: Path) -> list[tuple]:
    return [(r["event"], r["iter"], r["train/loss"], r.get("val/loss"), r["tokens"])
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.skipif(not LAUNCH.exists(), reason="needs mlx.launch beside the Python interpreter")
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path):
    train(tmp_path, "one", ["logger=none", "trainer.gradient_accumulation_steps=2"])
    launched = train(tmp_path, "two", ["logger=wandb", "logger.mode=offline", "trainer.gradient_accumulation_steps=1"],
                     ranks=2)
    assert launched.stdout.count("mlxgpt: device") == 1 and launched.stdout.count("run_name: two") == 1  # rank 0's
    one, two = metrics(tmp_path / "logs/runs/one"), metrics(tmp_path / "logs/runs/two")
    assert [r[:2] for r in one] == [r[:2] for r in two] and len(two) == 9  # rank 0 alone wrote: no duplicates
    assert [r[4] for r in one] == [r[4] for r in two]  # global tokens per step: ranks x micro-batch x accumulation
    for a, b in zip(one, two):
        assert a[2] == pytest.approx(b[2], rel=1e-5) and (a[3] is None or a[3] == pytest.approx(b[3], rel=1e-5))
    assert one[-1][2] < one[1][2]  # it trained
    assert len(list((tmp_path / "logs/runs/two/wandb").glob("offline-run-*"))) == 1  # one W&B run (rank 0)
    assert sorted(os.listdir(tmp_path / "logs/runs")) == ["one", "two"]
    shutil.rmtree(tmp_path / "data")


def test_ranks_other_than_0_have_hydra_write_nothing():
    """Rank 0 alone writes the run dir; for the others Hydra's .hydra/ and job log file are switched off before it
    runs (their console stays)."""
    import logging

    from hydra import compose, initialize_config_dir
    from hydra.core.utils import configure_log

    from mlxgpt.config import register_configs
    from mlxgpt.rundir import write_nothing

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", TINY, return_hydra_config=True)
    assert cfg.hydra.output_subdir == ".hydra" and "file" in cfg.hydra.job_logging.handlers  # Hydra's defaults
    write_nothing(cfg)
    root, before = logging.getLogger(), list(logging.getLogger().handlers)
    try:
        configure_log(cfg.hydra.job_logging)  # what Hydra does next with it
        assert cfg.hydra.output_subdir is None
        assert [type(h).__name__ for h in root.handlers] == ["ConsoleHandler"]  # no file handler
        assert root.handlers[0].level == logging.WARNING  # rank 0 prints the config and progress, once
    finally:
        root.handlers = before


def test_a_sweep_runs_as_submitit_jobs(tmp_path):
    """hydra/launcher=submitit_local: the code path of hydra/launcher=slurm (conf/hydra/launcher/slurm.yaml) without
    a cluster: each sweep point is a submitted job in its own process."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    env = {**os.environ, "MLXGPT_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
                           "hydra.launcher.timeout_min=5", *TINY, "logger=none", "trainer.max_iters=3",
                           "trainer.seed=1,2", f"hydra.sweep.dir={sweep}"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((sweep / str(job) / "result.json").read_text()) for job in (0, 1)]
    assert [r["status"] for r in results] == ["ok", "ok"] and results[0]["train/loss"] != results[1]["train/loss"]
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # submitit ran them as jobs



@pytest.mark.skipif(not LAUNCH.exists(), reason="needs mlx.launch beside the Python interpreter")
def test_a_stopped_two_rank_run_says_to_relaunch_it_and_one_rank_resuming_it_warns_unless_the_batch_is_kept(tmp_path):
    run_dir = tmp_path / "logs/runs/two"
    proc = subprocess.Popen([str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port()), "--",
                             sys.executable, str(ROOT / "train.py"), *TINY, "logger=none", "trainer.max_iters=100000",
                             f"paths.log_dir={tmp_path}/logs", "run_name=two"], cwd=tmp_path, start_new_session=True,
                            env={**os.environ, "MLXGPT_DATA_DIR": str(tmp_path / "data"), "OPENBLAS_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def logged() -> str:
        return (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""

    deadline = time.monotonic() + 120
    while "iter 1: loss" not in logged():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: every rank, and mlx.launch (which drops their output)
    proc.communicate(timeout=120)
    assert "; continue with, under mlx.launch on 2 processes as before: python " in logged()
    warning = "was trained on 2 process(es) with a global batch of 8 sequences; this run has 1 (1 x 4 x 1 = 4)"
    stopped_at = json.loads((run_dir / "result.json").read_text())["iter"]
    halved = train(tmp_path, "two", ["logger=none", f"trainer.max_iters={stopped_at + 1}", "trainer.resume=auto"])
    assert warning in halved.stderr and "trainer.gradient_accumulation_steps=2" in halved.stderr
    kept = train(tmp_path, "two", ["logger=none", f"trainer.max_iters={stopped_at + 2}", "trainer.resume=auto",
                                   "trainer.gradient_accumulation_steps=2"])
    assert "global batch" not in kept.stderr


def stop_submitted_job(sweep: subprocess.Popen, job: Path) -> list[str]:
    """SIGTERM a submitted job once it trains, as Slurm does at a time limit; the command its train.log says continues
    the sweep. Ends the sweep's process (submitit would wait 15 s for the stopped job's result)."""
    def wait_for(text: str) -> str:
        deadline = time.monotonic() + 120
        while text not in ((job / "train.log").read_text() if (job / "train.log").exists() else ""):
            assert sweep.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        return (job / "train.log").read_text()

    wait_for("iter 1: loss")
    os.kill(int((job / ".lock").read_text().split()[1]), signal.SIGTERM)  # the lock names the job's pid
    command = wait_for("continue with: ").split("continue with: ")[1].split()
    sweep.terminate()
    sweep.wait(timeout=60)
    return command


def test_a_submitit_job_stopped_by_slurm_says_how_to_continue_the_sweep_with_train_py(tmp_path):
    """SIGTERM (Slurm's preemption or time limit) to a job that submitit runs through its own entry point: the command
    in its log continues the sweep with train.py."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    job = tmp_path / "sweep" / "0"
    env = {**os.environ, "MLXGPT_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
                             "hydra.launcher.timeout_min=5", *TINY, "logger=none", "trainer.max_iters=100000",
                             "trainer.seed=1", f"hydra.sweep.dir={job.parent}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env)
    command = stop_submitted_job(proc, job)
    assert command[:3] == ["python", str(ROOT / "train.py"), "-m"] and command[-1] == "trainer.resume=auto"


def test_a_submitted_job_that_ended_without_a_result_is_one_line_naming_its_last_message(capsys, monkeypatch):
    """The sweep's process once submitit gives up waiting for a stopped job's result (after 15 s): submitit's own
    error, worded as submitit words it, ends the sweep with one line instead of a traceback."""
    utils = pytest.importorskip("submitit.core.utils")
    from mlxgpt.cli import run_hydra
    from mlxgpt.config import Config

    stopped = "mlxgpt: stopped by SIGTERM at iteration 6; latest checkpoint c; continue with: python train.py -m x"
    error = utils.UncompletedJobError("\n".join([
        "Job 21184 (task: 0) with path /s/.submitit/21184/21184_0_result.pkl",
        "has not produced any output (state: FINISHED)", "Error stream produced:", "-" * 40, "train: 6/100", stopped]))

    def main():
        raise error

    monkeypatch.setattr(sys, "argv", ["train.py", "-m"])
    with pytest.raises(SystemExit) as exit_:
        run_hydra(main, Config)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (f"mlxgpt: Job 21184 (task: 0) ended without a result (state FINISHED); its last "
                                       f"message: {stopped}\n")


def test_a_submitit_trial_of_an_optuna_search_stopped_by_slurm_says_how_to_continue_the_search(tmp_path):
    """Optuna writes no multirun.yaml of its own: the search's command line still reaches its submitted trials."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    job = tmp_path / "search" / "0"
    env = {**os.environ, "MLXGPT_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
                             "hparams_search=lr_depth_optuna", "hydra.sweeper.n_trials=1", *TINY, "logger=none",
                             "trainer.max_iters=100000", f"hydra.sweep.dir={job.parent}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env)
    command = stop_submitted_job(proc, job)
    assert command[:6] == ["python", str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
                           "hydra.sweeper.n_trials=1", "hparams_search=lr_depth_optuna"]
    assert command[-2:] == [f"hydra.sweep.dir={job.parent}", "trainer.resume=auto"]


@pytest.mark.skipif(not LAUNCH.exists() or sys.platform != "linux", reason="needs mlx.launch (and Linux's rlimit)")
def test_two_ranks_on_one_machine_each_check_their_model_against_half_its_memory(tmp_path):
    """A model whose weights, gradients and AdamW state take 3/4 of the RAM fits one process, not two: refused in one
    line per rank before anything is written (the ranks once each counted the whole RAM, and went on to swap)."""
    params_per_layer = 12 * 32 * 32 + 13 * 32  # TINY's n_embd=32
    n_layer = int(0.75 * device.memory_bytes(mx.cpu) / 16 / params_per_layer)  # 16 bytes per parameter
    proc = subprocess.run([str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port()), "--",
                           sys.executable, str(ROOT / "train.py"), *TINY, f"model.n_layer={n_layer}", "logger=none",
                           f"paths.log_dir={tmp_path}/logs"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)))
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("error: the model does not fit")]
    assert len(refusals) == 2 and "GB / 2 (the ranks on this machine share it); use a smaller model" in refusals[0]
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == [], proc.stderr[-3000:]


@pytest.mark.skipif(not LAUNCH.exists(), reason="needs mlx.launch beside the Python interpreter")
def test_a_signal_to_one_rank_while_the_ranks_agree_on_stopping_stops_both_at_the_same_iteration(tmp_path):
    """The signal arrives on rank 0 alone while it waits for rank 1 in the stop agreement after iteration 1 (the third:
    the first evaluation's splits had two): rank 0 must answer as it told rank 1 (no stop yet), so both stop at the next
    one, after iteration 3 (update 3 was already under way). Rank 0 once stopped alone there, and the ranks hung. Rank 1
    then waits for rank 0's records (mlx.launch ends the other ranks when one exits: rank 0 was killed writing them)."""
    env = {**os.environ, "MLXGPT_DATA_DIR": str(tmp_path / "data"), "OPENBLAS_NUM_THREADS": "1"}
    stopped = subprocess.run([str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port()), "--",
                              sys.executable, str(ROOT / "tests/slow_rank0_records.py"), "3",
                              str(ROOT / "train.py"), *TINY, "logger=none", "trainer.max_iters=100000",
                              "trainer.eval_interval=1000", f"paths.log_dir={tmp_path}/logs", "run_name=two"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    two = tmp_path / "logs/runs/two"
    assert json.loads((two / "result.json").read_text()) == {"status": "interrupted", "iter": 3}, stopped.stderr
    assert "rank 0 exited with code 143" in stopped.stderr and "rank 1 exited with code 143" in stopped.stderr
    assert "; continue with, under mlx.launch on 2 processes as before: python " in (two / "train.log").read_text()
    train(tmp_path, "two", ["logger=none", "trainer.max_iters=6", "trainer.eval_interval=1000",
                            "trainer.resume=auto"], ranks=2)
    assert [r[:2] for r in metrics(two)][-4:] == [("train", 4), ("train", 5), ("train", 6), ("eval", 6)]


@pytest.mark.skipif(not LAUNCH.exists(), reason="needs mlx.launch beside the Python interpreter")
def test_two_ranks_whose_loss_diverges_both_fail_after_rank_0_recorded_it(tmp_path):
    """Every rank finds the (all-reduced) loss non-finite at the same iteration; rank 1, which writes nothing, waits for
    rank 0's records (mlx.launch ends the other ranks when one exits: rank 0 was killed writing them)."""
    env = {**os.environ, "MLXGPT_DATA_DIR": str(tmp_path / "data"), "OPENBLAS_NUM_THREADS": "1"}
    failed = subprocess.run([str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port()), "--",
                             sys.executable, str(ROOT / "tests/slow_rank0_records.py"), str(ROOT / "train.py"), *TINY,
                             "logger=none", "optimizer.lr=1e30", "schedule=constant", f"paths.log_dir={tmp_path}/logs",
                             "run_name=two"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    result = json.loads((tmp_path / "logs/runs/two/result.json").read_text())
    assert result["status"] == "failed" and "became non-finite at iteration" in result["error"], failed.stderr
    assert "rank 0 exited with code 2" in failed.stderr and "rank 1 exited with code 2" in failed.stderr


@pytest.mark.skipif(not LAUNCH.exists(), reason="needs mlx.launch beside the Python interpreter")
def test_two_ranks_stopped_during_an_evaluation_continue_with_it_as_one_rank_would(tmp_path):
    train(tmp_path, "one", ["logger=none", "trainer.gradient_accumulation_steps=2"])
    env = {**os.environ, "MLXGPT_DATA_DIR": str(tmp_path / "data"), "OPENBLAS_NUM_THREADS": "1"}
    stopped = subprocess.run([str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port()), "--",
                              sys.executable, str(ROOT / "tests/ctrl_c_in_evaluation.py"), "3", str(ROOT / "train.py"),
                              *TINY, "logger=none", f"paths.log_dir={tmp_path}/logs", "run_name=two"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    two = tmp_path / "logs/runs/two"
    assert json.loads((two / "result.json").read_text()) == {"status": "interrupted", "iter": 3}, stopped.stderr
    assert [r[:2] for r in metrics(two)] == [("eval", 0), ("train", 1), ("train", 2), ("train", 3)]  # cut short
    train(tmp_path, "two", ["logger=none", "trainer.resume=auto"], ranks=2)
    one = metrics(tmp_path / "logs/runs/one")
    assert [r[:2] for r in metrics(two)] == [r[:2] for r in one]
    for a, b in zip(one, metrics(two)):
        assert a[2] == pytest.approx(b[2], rel=1e-5) and (a[3] is None or a[3] == pytest.approx(b[3], rel=1e-5))
