"""Reliability: nothing is lost under signals, kill -9 (also in the middle of a checkpoint write), non-finite losses, a
full disk, two runs on one directory, and bad input. End to end in real subprocesses on tiny models: after every fault
`trainer.resume=auto` must reproduce the uninterrupted run's loss sequence exactly."""
import hashlib
import json
import os
import pickle
import re
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlx.utils import tree_flatten
from omegaconf import OmegaConf

from mlxgpt import checkpoint, rundir
from mlxgpt.callbacks import CheckpointCallback
from mlxgpt.config import register_configs
from mlxgpt.data import load_data
from mlxgpt.data.sources import read_text
from mlxgpt.errors import UserError
from mlxgpt.model import GPT, GPTConfig
from mlxgpt.optim import build_optimizer, build_schedule
from mlxgpt.pretrained import export_hf
from mlxgpt.task import _build_model
from mlxgpt.trainer import NonFiniteLoss, Trainer

ROOT = Path(__file__).resolve().parents[1]
ITERS = 60
# decay_iters is fixed so that a run stopped early (max_iters=20) is a true prefix of the ITERS-long one
TINY = ["model=nano", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
        "model.dropout=0.1", "trainer.batch_size=4", "trainer.eval_iters=2", "trainer.eval_interval=10",
        "trainer.log_interval=5", "schedule.warmup_iters=10", f"schedule.decay_iters={ITERS}", "logger=none",
        "callbacks.sample.max_new_tokens=0"]
CHECKPOINT_FILES_LIMIT = 200_000  # bytes per file: TINY's model.safetensors (~120 kB) fits, optimizer (~240 kB) not


# ----------------------------------------------------------------------------------------------------- helpers
def env(work: Path, **extra) -> dict:
    return {**os.environ, "MLXGPT_DATA_DIR": str(work / "data"), **extra}


def train_command(work: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *TINY, f"paths.log_dir={work}/logs", f"run_name={name}", *extra]


def train(work: Path, name: str, *extra: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_command(work, name, *extra), capture_output=True, text=True, cwd=work,
                          env=kw.pop("env", env(work)), timeout=300, **kw)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def start(work: Path, name: str, *extra: str, **kw) -> subprocess.Popen:
    """A training run in the background; stderr goes to <work>/<name>.err (a pipe nobody reads could fill up)."""
    err = open(work / f"{name}.err", "a")
    return subprocess.Popen(train_command(work, name, *extra), cwd=work, env=kw.pop("env", env(work)),
                            stdout=subprocess.DEVNULL, stderr=err, **kw)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the moment to interrupt it"
        assert time.time() < deadline, "timed out"
        time.sleep(0.001)


def run_dir(work: Path, name: str) -> Path:
    return work / "logs" / "runs" / name


def losses(path: Path) -> list[tuple]:
    """The logged loss sequence: (event, iter, train loss, val loss) of every record."""
    records = map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
    return [(r["event"], r["iter"], r["train/loss"], r.get("val/loss")) for r in records]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path (symlinks as their targets) but the lock file (it names its latest holder) and the job
    log (each attempt appends to it): to prove that nothing was written."""
    return {str(p.relative_to(path)): os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
            for p in sorted(path.rglob("*"))
            if (p.is_symlink() or p.is_file()) and p.name not in (".lock", "train.log")}


def copy_run(work: Path, source: Path, name: str) -> Path:
    target = run_dir(work, name)
    shutil.copytree(source, target, symlinks=True)
    return target


def flip_a_data_byte(path: Path) -> None:
    """Change one bit in the middle of a safetensors file's array data (past its header): the size stays the same."""
    data = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    data[(8 + header_size + len(data)) // 2] ^= 0x01
    path.write_bytes(data)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def assert_one_line_error(proc, needle: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("error: ") and needle in lines[-1], proc.stderr[-2000:]
    assert not any(ln.startswith("error: ") for ln in lines[:-1])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def reference(work) -> list[tuple]:
    """The uninterrupted run's loss sequence."""
    train(work, "reference", f"trainer.max_iters={ITERS}")
    return losses(run_dir(work, "reference"))


@pytest.fixture(scope="module")
def base(work) -> Path:
    """The same run stopped after 20 iterations (checkpoints at 10 and 20): copies of it meet the faults below."""
    train(work, "base", "trainer.max_iters=20")
    return run_dir(work, "base")


# ------------------------------------------------------------------------------------------------------ signals
@pytest.mark.slow
def test_sigint_finishes_the_step_saves_and_the_printed_command_resumes_identically(work, reference):
    proc = start(work, "sigint", f"trainer.max_iters={ITERS}")
    ckpts = run_dir(work, "sigint") / "checkpoints"
    wait_until(lambda: (ckpts / "iter_0000010").is_dir(), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = (work / "sigint.err").read_text()
    assert "SIGINT received: stopping after this step" in err and "Traceback" not in err
    m = re.fullmatch(r"mlxgpt: stopped by SIGINT at iteration (\d+); latest checkpoint (\S+); continue with: (.+)",
                     last_line(err))
    assert m, err[-2000:]
    stopped = int(m[1])
    assert 10 <= stopped < ITERS and Path(m[2]) == checkpoint.latest(ckpts) == (ckpts / f"iter_{stopped:07d}").resolve()
    assert json.loads((ckpts.parent / "result.json").read_text()) == {"status": "interrupted", "iter": stopped}

    command = shlex.split(m[3])
    assert command[0] == "python" and command[-2:] == ["run_name=sigint", "trainer.resume=auto"]
    resumed = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=work, env=env(work),
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(ckpts.parent) == reference  # also when it stopped between two log lines
    assert "settings it was not trained with" not in resumed.stderr


@pytest.mark.slow
def test_a_stop_as_the_run_ends_cuts_its_last_sample_short_and_records_the_run_as_complete(work):
    """Ctrl-C while a run that has done all its iterations draws its final sample (a long one): the sample stops at
    once and is not recorded, the run is complete (result ok, nothing left to continue), the process exits 130 (it
    used to draw the whole sample, then exit 0)."""
    proc = start(work, "late", "trainer.max_iters=10", "callbacks.sample.max_new_tokens=1000000")
    ckpts = run_dir(work, "late") / "checkpoints"
    wait_until(lambda: (ckpts / "iter_0000010").is_dir(), proc)  # the evaluation at max_iters saved it: the sample next
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    err = (work / "late.err").read_text()
    assert last_line(err) == "mlxgpt: stopped by SIGINT after the last iteration (10): the run is complete", err[-2000:]
    assert json.loads((ckpts.parent / "result.json").read_text())["status"] == "ok" and "Traceback" not in err
    assert checkpoint.latest(ckpts) == (ckpts / "iter_0000010").resolve()
    assert not (ckpts.parent / "samples.jsonl").exists()
    again = train(work, "late", "trainer.max_iters=10", "trainer.resume=auto")
    assert "already trained 10 iterations" in again.stdout + again.stderr


@pytest.mark.slow
def test_a_run_started_from_another_runs_checkpoint_and_stopped_before_its_own_continues_from_that_one(work, base):
    start_from = f"{base}/checkpoints/iter_0000010"
    stopped = subprocess.run([sys.executable, str(ROOT / "tests/ctrl_c_in_setup.py"), "0",
                              *train_command(work, "forked_early", f"trainer.resume={start_from}")[1:]],
                             capture_output=True, text=True, cwd=work, env=env(work), timeout=300)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    command = shlex.split(last_line(stopped.stderr).split("continue with: ")[1])
    assert command[-2:] == ["run_name=forked_early", f"trainer.resume={start_from}"]  # auto would start afresh
    continued = subprocess.run([sys.executable, *command[1:], "trainer.max_iters=20"], capture_output=True, text=True,
                               cwd=work, env=env(work), timeout=300)
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert losses(run_dir(work, "forked_early")) == [r for r in losses(base) if r[1] > 10]  # on from base's iter 10


@pytest.mark.slow
def test_continuing_with_other_settings_warns_naming_them(work, base):
    changed = copy_run(work, base, "changed")
    proc = train(work, "changed", "trainer.resume=auto", "trainer.max_iters=22", "optimizer.lr=1e-3",
                 "trainer.seed=7", "trainer.compile=false", "trainer.log_interval=1")  # max_iters, compile, log_interval: same math
    (warning,) = [line for line in proc.stderr.splitlines() if "settings it was not trained with" in line]
    assert warning == (f"mlxgpt: warning: continuing {changed / 'checkpoints' / 'iter_0000020'} with settings it was "
                       f"not trained with: optimizer.lr=0.001 (was 0.0006), trainer.seed=7 (was 1337); the run's "
                       f"config now records these")
    train(work, "tuned", f"init_from={base}", "trainer.max_iters=10")  # data.chars: set from base's characters
    continued = train(work, "tuned", f"init_from={base}", "trainer.max_iters=12", "trainer.resume=auto")
    assert "settings it was not trained with" not in continued.stderr


@pytest.mark.slow
def test_continuing_on_a_text_that_changed_since_warns_that_the_data_differs(work):
    """Same settings, same characters, other text: the batches differ from an uninterrupted run's."""
    text = work / "edited.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 300)
    train(work, "edited", "data=text", f"data.path={text}", "trainer.max_iters=10")
    text.write_text("the lazy dog jumps over the quick brown fox\n" * 300)
    proc = train(work, "edited", "data=text", f"data.path={text}", "trainer.max_iters=12", "trainer.resume=auto")
    (warning,) = [line for line in proc.stderr.splitlines() if "settings it was not trained with" in line]
    assert re.search(r"with settings it was not trained with: the data's text \(prepared as text-\w+, was text-\w+\)",
                     warning), warning
    again = train(work, "edited", "data=text", f"data.path={text}", "trainer.max_iters=14", "trainer.resume=auto")
    assert "settings it was not trained with" not in again.stderr  # the checkpoint at 12 was trained on this text


@pytest.mark.slow
def test_a_stop_during_the_evaluation_before_training_ends_the_run_at_once(work):
    proc = start(work, "eval_stop", "trainer.eval_iters=1000000")  # an evaluation of hours
    try:
        wait_until(lambda: (run_dir(work, "eval_stop") / "metrics.jsonl").exists(), proc)  # the evaluation is next
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130  # not after the evaluation and a step
    finally:
        proc.kill()
    assert last_line((work / "eval_stop.err").read_text()).startswith(
        "mlxgpt: stopped by SIGINT at iteration 0; no checkpoint saved; continue with: python ")
    assert not (run_dir(work, "eval_stop") / "checkpoints").exists()


def stop_during_evaluation(work: Path, name: str, at: int, *extra: str) -> subprocess.CompletedProcess:
    """A run of ITERS iterations stopped by a Ctrl-C in the middle of its evaluation at iteration `at`."""
    stopped = subprocess.run([sys.executable, str(ROOT / "tests/ctrl_c_in_evaluation.py"), str(at),
                              *train_command(work, name, f"trainer.max_iters={ITERS}", *extra)[1:]],
                             capture_output=True, text=True, cwd=work, env=env(work), timeout=300)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    return stopped


@pytest.mark.slow
def test_sigterm_while_the_data_is_prepared_stops_as_ctrl_c_does_and_leaves_no_prepared_directory(work):
    (work / "sigterm.txt").write_text("a text to tokenize\n" * 100)
    data_dir = work / "sigterm_data"
    stopped = subprocess.run([sys.executable, str(ROOT / "tests/sigterm_in_prepare.py"),
                              *train_command(work, "sigterm_prepare", "data=text", "data.path=sigterm.txt")[1:]],
                             capture_output=True, text=True, cwd=work, env=env(work, MLXGPT_DATA_DIR=str(data_dir)),
                             timeout=300)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert last_line(stopped.stderr).startswith("mlxgpt: stopped by SIGTERM before training started; no checkpoint "
                                                "saved; continue with: python ")
    assert list((data_dir / "prepared").iterdir()) == []
    result = json.loads((run_dir(work, "sigterm_prepare") / "result.json").read_text())
    assert result["status"] == "interrupted"


WORKER_POOL = """
import multiprocessing, os, signal, sys, time
from mlxgpt.interrupt import sigterm_stops
with sigterm_stops():
    pool = multiprocessing.get_context("fork").Pool(2)
    pool.map_async(time.sleep, [10, 10])
    time.sleep(1)  # the workers are in their tasks
    for worker in pool._pool if sys.argv[1] == "ctrl_c" else []:
        os.kill(worker.pid, signal.SIGINT)
    time.sleep(0.5)
    pool.terminate()
"""


@pytest.mark.parametrize("stop", ["terminate", "ctrl_c"])
def test_worker_processes_forked_while_the_data_is_prepared_end_quietly_when_their_pool_is_stopped(stop):
    # datasets' num_proc pool forks workers with the job's signal handlers, and terminates them when loading fails or
    # when Ctrl-C (which the terminal sends to the workers too) interrupts it
    done = subprocess.run([sys.executable, "-c", WORKER_POOL, stop], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("at", [20, ITERS])
def test_a_stop_during_a_later_evaluation_saves_it_as_pending_and_the_continued_run_does_it_first(work, reference, at):
    name = f"eval_stop_{at}"
    stopped = stop_during_evaluation(work, name, at)
    ckpts = run_dir(work, name) / "checkpoints"
    m = re.fullmatch(r"mlxgpt: stopped by SIGINT at iteration (\d+); latest checkpoint (\S+); continue with: (.+)",
                     last_line(stopped.stderr))
    assert m and int(m[1]) == at and Path(m[2]) == (ckpts / f"iter_{at:07d}").resolve(), stopped.stderr[-2000:]
    assert checkpoint.read_state(Path(m[2]))["eval_pending"] is True
    assert losses(ckpts.parent) == [r for r in reference if r[1] < at or r[1] == at and r[0] != "eval"]

    command = shlex.split(m[3])
    continued = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=work,
                               env=env(work), timeout=300)
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert losses(ckpts.parent) == reference
    assert checkpoint.read_state(checkpoint.latest(ckpts))["eval_pending"] is False


@pytest.mark.slow
def test_a_continued_run_that_fails_after_the_pending_evaluation_leaves_no_second_record_of_it(work, reference):
    """The continued run records the pending evaluation (and its sample), then cannot save: the next one records
    them again, and only once."""
    samples = ["callbacks.sample.every_evals=1", "callbacks.sample.max_new_tokens=2"]  # no effect on the losses
    stop_during_evaluation(work, "eval_stop_disk_full", 20, *samples)
    failed = train(work, "eval_stop_disk_full", f"trainer.max_iters={ITERS}", "trainer.resume=auto", *samples,
                   check=False, preexec_fn=limit_file_size)
    assert_one_line_error(failed, "cannot write the checkpoint of iteration 20")
    train(work, "eval_stop_disk_full", f"trainer.max_iters={ITERS}", "trainer.resume=auto", *samples)
    path = run_dir(work, "eval_stop_disk_full")
    assert losses(path) == reference
    records = map(json.loads, (path / "samples.jsonl").read_text().splitlines())
    assert [r["iter"] for r in records] == [0, 10, 20, 30, 40, 50, 60]  # every evaluation's; the end's is the last


@pytest.mark.slow
def test_a_continued_run_samples_at_the_evaluations_the_uninterrupted_one_does(work):
    """every_evals=2 counts the run's evaluations (0, 10, 20, 30, 40), not those since the attempt started."""
    sampling = ["trainer.max_iters=40", "callbacks.sample.max_new_tokens=4", "callbacks.sample.every_evals=2"]
    train(work, "sampled", *sampling)
    stopped = subprocess.run([sys.executable, str(ROOT / "tests/ctrl_c_in_evaluation.py"), "30",
                              *train_command(work, "sampled_stopped", *sampling)[1:]],
                             capture_output=True, text=True, cwd=work, env=env(work), timeout=300)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    train(work, "sampled_stopped", *sampling, "trainer.resume=auto")
    samples = [(run_dir(work, name) / "samples.jsonl").read_text() for name in ("sampled", "sampled_stopped")]
    assert [json.loads(line)["iter"] for line in samples[0].splitlines()] == [10, 30, 40]  # the last: at the end
    assert samples[1] == samples[0]


@pytest.mark.slow
def test_the_printed_command_continues_a_run_in_its_own_hydra_run_dir(work):
    custom = work / "custom_dir"
    proc = start(work, "custom", f"trainer.max_iters={ITERS}", f"hydra.run.dir={custom}")
    wait_until(lambda: (custom / "checkpoints" / "iter_0000010").is_dir(), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    command = shlex.split(last_line((work / "custom.err").read_text()).split("continue with: ")[1])
    assert f"hydra.run.dir={custom}" in command
    resumed = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=work, env=env(work),
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing from {custom}/checkpoints/" in resumed.stdout


@pytest.mark.slow
def test_sigterm_saves_finishes_wandb_and_never_writes_the_api_key(work):
    from wandb_file import find_run_files, read_run

    key = "0123456789abcdef0123456789abcdef01234567"  # never sent anywhere: W&B is offline
    wandb_env = {k: v for k, v in env(work).items() if not k.startswith("WANDB_")}
    wandb_env.update(WANDB_MODE="offline", WANDB_API_KEY=key, WANDB_DIR=str(work / "wb"),
                     WANDB_CACHE_DIR=str(work / "wb_cache"), WANDB_CONFIG_DIR=str(work / "wb_config"),
                     WANDB_DATA_DIR=str(work / "wb_data"))
    proc = start(work, "sigterm", "trainer.max_iters=100000", "logger=wandb", "logger.mode=offline", env=wandb_env)
    ckpts = run_dir(work, "sigterm") / "checkpoints"
    wait_until(lambda: (ckpts / "iter_0000020").is_dir(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    err = (work / "sigterm.err").read_text()
    stopped = int(re.search(r"stopped by SIGTERM at iteration (\d+);", last_line(err))[1])
    assert checkpoint.read_state(checkpoint.latest(ckpts))["iter"] == stopped
    (run_file,) = find_run_files(ckpts.parent / "wandb")
    assert read_run(run_file).exit_code is not None  # the W&B run was finished
    assert key not in err
    for path in [*ckpts.parent.rglob("*"), *(work / "wb").rglob("*")]:
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_a_second_sigint_ends_the_process_at_once_and_corrupts_nothing(work, reference):
    proc = start(work, "twice", f"trainer.max_iters={ITERS}")
    ckpts = run_dir(work, "twice") / "checkpoints"
    wait_until(lambda: (ckpts / "iter_0000010").is_dir(), proc)
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: "SIGINT received" in (work / "twice.err").read_text(), proc, timeout=60)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) in (-signal.SIGINT, 130)  # killed by the second, or it had finished saving
    assert checkpoint.latest(ckpts) is not None
    train(work, "twice", f"trainer.max_iters={ITERS}", "trainer.resume=auto")
    assert losses(ckpts.parent) == reference



STARTING = {"train.py": ["--help"], "sample.py": ["--help"], "export.py": ["--help"], "bench.py": ["--help"],
            "compare.py": ["logs", "--out", "compared"]}  # busy for 0.3-1 s: Hydra composes its help; plots
IMPORTED_BLAS = re.compile(r"^import time:.*\|\s+mlxgpt\.blas$", re.M)  # -X importtime: the scripts' imports go on


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(STARTING))
def test_ctrl_c_while_a_script_imports_its_modules_ends_it_quietly(tmp_path, script):
    """Ctrl-C at several moments of a script's first 0.1 s past `import mlxgpt`'s fast BLAS set-up (still importing
    Hydra, MLX...; Python's own start-up, before any of our code, is out of reach): exit 130, one line, no traceback."""
    fake_run = tmp_path / "logs" / "run"
    (fake_run / ".hydra").mkdir(parents=True)
    (fake_run / ".hydra" / "config.yaml").write_text("{}\n")
    (fake_run / "metrics.jsonl").write_text("".join(json.dumps({"event": "eval", "iter": i, "val/loss": 3.0 - i})
                                                    + "\n" for i in range(3)))
    for delay in (0.0, 0.01, 0.03, 0.1):
        err = tmp_path / f"{delay}.err"
        with open(err, "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-X", "importtime", str(ROOT / script), *STARTING[script]],
                                    cwd=tmp_path, env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=stderr)
        wait_until(lambda: IMPORTED_BLAS.search(err.read_text()), proc, timeout=60)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        messages = [line for line in err.read_text().splitlines() if not line.startswith("import time:")]
        assert (proc.returncode, messages) == (130, ["mlxgpt: interrupted"]), (delay, messages[-20:])

# ------------------------------------------------------------------------------------------------------ kill -9
def is_writing(ckpts: Path) -> bool:
    try:
        return any(n.startswith(".iter_") and n.endswith(".tmp") for n in os.listdir(ckpts))
    except FileNotFoundError:
        return False


def assert_links_whole(ckpts: Path) -> None:
    """`last` and `best` (where present) point at complete checkpoints."""
    for link in ("last", "best"):
        if (ckpts / link).is_symlink():
            checkpoint.verify((ckpts / link).resolve())


@pytest.mark.slow
def test_kill_9_at_several_points_also_mid_checkpoint_write_then_resume_is_identical(work):
    """A checkpoint every 2 iterations of a model whose checkpoint takes milliseconds to write: a kill the moment a
    temporary checkpoint directory appears lands in the middle of a write."""
    mid = ["model.n_embd=128", "model.n_head=4", "trainer.batch_size=2", "trainer.eval_iters=1",
           "trainer.eval_interval=2", "trainer.log_interval=1", "callbacks.checkpoint.keep=1", "trainer.max_iters=400"]
    # long enough that no attempt finishes it (continuing a finished run does nothing, so there would be nothing to kill)
    train(work, "kill_reference", *mid)
    ckpts = run_dir(work, "kill") / "checkpoints"
    mid_write_kills, rng = 0, np.random.default_rng(0)
    for attempt in range(5):
        proc = start(work, "kill", *mid, "trainer.resume=auto")
        if attempt % 2 == 0:  # at the next checkpoint write
            wait_until(lambda: is_writing(ckpts), proc)
        else:  # anywhere: startup, data, compile, step, evaluation, write
            time.sleep(rng.uniform(0.5, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mid_write_kills += is_writing(ckpts)
        assert_links_whole(ckpts)
    assert mid_write_kills >= 2
    train(work, "kill", *mid, "trainer.resume=auto")
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # the debris was cleaned up
    assert_links_whole(ckpts)
    assert losses(ckpts.parent) == losses(run_dir(work, "kill_reference"))


def test_debris_of_killed_saves_is_ignored_then_removed_and_links_stay_whole(tmp_path):
    ckpts = tmp_path / "checkpoints"
    params, opt = {"w": mx.arange(4.0)}, {"m": mx.ones(4)}
    for it in (10, 20):
        checkpoint.save_checkpoint(ckpts, params, opt, {"iter": it}, is_best=it == 10, keep=5)
    (ckpts / ".iter_0000030.tmp").mkdir()  # killed while writing iteration 30
    (ckpts / ".iter_0000030.tmp" / "model.safetensors").write_bytes(b"\x10\x00\x00")
    os.symlink("iter_0000030", ckpts / ".last.tmp")  # killed between making a link and renaming it
    shutil.copytree(ckpts / "iter_0000010", ckpts / ".iter_0000005.del")  # killed while pruning
    assert checkpoint.latest(ckpts) == (ckpts / "iter_0000020").resolve()
    assert checkpoint.resolve(tmp_path, "best") == (ckpts / "iter_0000010").resolve()

    again = checkpoint.save_checkpoint(ckpts, {"w": mx.zeros(4)}, opt, {"iter": 20}, keep=0)  # iteration 20 again
    assert again.name == "iter_0000020-1"  # a complete checkpoint is never replaced in place
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "iter_0000010", "iter_0000020-1", "last"]
    assert checkpoint.latest(ckpts) == again.resolve() and os.readlink(ckpts / "best") == "iter_0000010"

    os.unlink(ckpts / "last")  # killed after the first checkpoint's rename, before its link
    assert checkpoint.latest(ckpts) == again.resolve()


@pytest.mark.parametrize("save_last, kept", [(True, ["iter_0000020", "iter_0000040"]),
                                             (False, ["iter_0000010", "iter_0000020"])])
def test_best_is_the_lowest_val_loss_and_keep_prunes_all_but_the_newest_and_best(tmp_path, save_last, kept):
    """keep=1 of evaluations at 10..40 (val loss 3.0, 2.5, 2.8, 2.9); save_last=false (finetune_shakespeare) saves
    only where the val loss improved."""
    trainer = make_trainer(tmp_path)
    trainer.callbacks.append(saver := CheckpointCallback(keep=1 if save_last else 5, save_last=save_last))
    saver.on_train_start(trainer)
    for iteration, val_loss in ((10, 3.0), (20, 2.5), (30, 2.8), (40, 2.9)):
        trainer.iter = iteration
        trainer.record_eval({"train/loss": val_loss, "val/loss": val_loss})
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", *kept, "last"]
    assert (os.readlink(ckpts / "best"), os.readlink(ckpts / "last")) == ("iter_0000020", kept[-1])
    assert checkpoint.read_state(ckpts / "best")["best_val_loss"] == 2.5


# ---------------------------------------------------------------------------------------------- checkpoint digests
def test_a_save_records_each_array_files_size_and_sha256_and_a_load_checks_them(tmp_path):
    state = {**dict.fromkeys(checkpoint.STATE_KEYS), "iter": 10}
    ckpt = checkpoint.save_checkpoint(tmp_path, {"w": mx.arange(64.0)}, {"m": mx.ones(64)}, state)
    saved = checkpoint.read_state(ckpt)
    for name in checkpoint.ARRAY_FILES:
        data = (ckpt / name).read_bytes()
        assert saved["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    flip_a_data_byte(ckpt / "optimizer.safetensors")
    assert checkpoint.load_arrays(ckpt, "model.safetensors", saved)["w"].tolist() == list(range(64))
    with pytest.raises(UserError, match="optimizer.safetensors is corrupt: its contents differ from what was saved"):
        checkpoint.load_arrays(ckpt, "optimizer.safetensors", saved)


@pytest.mark.parametrize("files", [[], {"model.safetensors": "0" * 64}, {"model.safetensors": {"sha256": "x"}},
                                   {"model.safetensors": {"sha256": "0" * 64, "bytes": "12"}}, None])
def test_a_damaged_digest_entry_is_a_damaged_state_json(tmp_path, files):
    ckpt = checkpoint.save_checkpoint(tmp_path, {"w": mx.zeros(4)}, {}, {**dict.fromkeys(checkpoint.STATE_KEYS),
                                                                        "iter": 1})
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "files": files}))
    with pytest.raises(UserError, match=r"has a damaged state.json \(its files entry is not a sha256 and bytes"):
        checkpoint.read_state(ckpt)


@pytest.mark.slow
def test_a_checkpoint_saved_before_digests_still_resumes_identically(work, base, reference):
    old = copy_run(work, base, "before_digests")
    for state_file in (old / "checkpoints").glob("iter_*/state.json"):
        state = json.loads(state_file.read_text())
        del state["files"]
        state_file.write_text(json.dumps(state, indent=2))
    train(work, "before_digests", "trainer.max_iters=30", "trainer.resume=auto")
    assert losses(old) == [r for r in reference if r[1] <= 30]


# --------------------------------------------------------------------------------------------- non-finite values
@pytest.mark.slow
@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_a_diverging_run_stops_keeps_the_last_good_checkpoint_and_says_what_to_try(work, base, on_nan):
    """optimizer.lr=1e30 from iteration 20 on: the first update sends the weights to ~1e30, the next loss is NaN."""
    path = copy_run(work, base, f"nan_{on_nan}")
    before = snapshot(path / "checkpoints")
    proc = train(work, f"nan_{on_nan}", f"trainer.max_iters={ITERS}", "trainer.resume=auto", "optimizer.lr=1e30",
                 f"trainer.on_nan={on_nan}", check=False)
    assert_one_line_error(proc, f"became non-finite at iteration {21 if on_nan == 'stop' else 30}")
    error = last_line(proc.stderr)
    assert f"the last good checkpoint {path.resolve()}/checkpoints/iter_0000020 is kept" in error
    assert "optimizer.lr=1e+29 (now 1e+30)" in error and "trainer.resume=auto" in error
    assert snapshot(path / "checkpoints") == before  # nothing was saved after the loss went bad
    if on_nan == "skip":  # the NaN steps were skipped; the evaluation at 30 found the weights themselves broken
        assert "skipped iteration 21" in proc.stderr and "the evaluation loss" in error
    else:
        assert "skipped" not in proc.stdout and "trainer.on_nan=skip" in error


def make_trainer(tmp_path: Path, *overrides: str) -> Trainer:
    """A real Trainer on the TINY model in this process (no callbacks)."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"paths.data_dir={tmp_path}/data", *overrides])
    data = load_data(cfg.data)
    model = _build_model(cfg, data.tokenizer)
    schedule = build_schedule(cfg.schedule, cfg.optimizer.lr, cfg.trainer.max_iters)
    return Trainer(cfg, model, data, build_optimizer(cfg.optimizer, schedule), tmp_path / "run", [],
                   data.tokenizer)


def test_skip_leaves_weights_and_optimizer_state_untouched(tmp_path):
    trainer = make_trainer(tmp_path, "optimizer.lr=1e30", "trainer.on_nan=skip", "trainer.compile=false")
    assert all(map(np.isfinite, trainer.train_step()))  # finite gradients: the update sends the weights to ~1e30
    trainer.iter += 1
    before = [np.array(a) for _, a in tree_flatten([trainer.model.parameters(), trainer.optimizer.state])]
    loss, norm = trainer.train_step()
    assert not (np.isfinite(loss) and np.isfinite(norm))
    after = [np.array(a) for _, a in tree_flatten([trainer.model.parameters(), trainer.optimizer.state])]
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after))


def test_stop_raises_with_the_iteration(tmp_path):
    trainer = make_trainer(tmp_path, "optimizer.lr=1e30")
    trainer.train_step()
    trainer.iter += 1
    with pytest.raises(NonFiniteLoss, match="at iteration 1; no checkpoint was written yet; try optimizer.lr=1e"):
        trainer.train_step()


# ------------------------------------------------------------------------------------------- disk full, lock
def limit_file_size(limit: int = CHECKPOINT_FILES_LIMIT) -> None:
    """In the child: writes beyond the limit fail with EFBIG (like a full disk), instead of killing it (SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_a_failing_checkpoint_write_stops_cleanly_and_keeps_the_previous_checkpoint(work, base, reference):
    path = copy_run(work, base, "disk_full")
    before = snapshot(path / "checkpoints")
    proc = train(work, "disk_full", f"trainer.max_iters={ITERS}", "trainer.resume=auto", check=False,
                 preexec_fn=limit_file_size)
    assert_one_line_error(proc, "cannot write the checkpoint of iteration 30")
    assert f"the previous checkpoint {path.resolve()}/checkpoints/iter_0000020 is intact" in proc.stderr
    assert snapshot(path / "checkpoints") == before  # the half-written one was removed, the rest untouched
    train(work, "disk_full", f"trainer.max_iters={ITERS}", "trainer.resume=auto")  # space again: continue
    assert losses(path) == reference


@pytest.mark.slow
def test_a_full_disk_before_a_continued_run_starts_is_one_line_and_keeps_its_records(work, base):
    """The run's records (.hydra/, result.json) are copied aside before Hydra rewrites them: when that copy fails,
    the run stops there (was: Hydra's warning, the run went on and left a truncated .hydra/config.yaml)."""
    path = copy_run(work, base, "disk_full_at_start")
    before = snapshot(path / ".hydra"), (path / "result.json").read_bytes()
    proc = train(work, "disk_full_at_start", f"trainer.max_iters={ITERS}", "trainer.resume=auto", check=False,
                 preexec_fn=lambda: limit_file_size(1000))  # .hydra/config.yaml has ~2000 bytes
    assert_one_line_error(proc, f"cannot write {path}/.previous_attempt/.hydra/config.yaml (File too large)")
    assert (snapshot(path / ".hydra"), (path / "result.json").read_bytes()) == before


@pytest.mark.slow
def test_a_train_log_that_cannot_grow_is_one_warning_not_a_traceback_per_message(work, base):
    path = copy_run(work, base, "log_full")
    with open(path / "train.log", "a") as f:
        f.write("-" * (CHECKPOINT_FILES_LIMIT - f.tell()))  # at the size limit, as on a full disk
    proc = train(work, "log_full", f"trainer.max_iters={ITERS}", "trainer.resume=auto", check=False,
                 preexec_fn=limit_file_size)
    assert_one_line_error(proc, "cannot write the checkpoint of iteration 30")
    assert proc.stderr.count(f"warning: cannot write {path.resolve()}/train.log (") == 1


@pytest.mark.slow
def test_a_second_run_on_a_directory_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(work, base, reference):
    path = copy_run(work, base, "locked")
    first = start(work, "locked", f"trainer.max_iters={ITERS}", "trainer.resume=auto")
    wait_until(lambda: (path / ".lock").read_text().startswith(f"pid {first.pid} "), first)
    first.send_signal(signal.SIGSTOP)  # frozen while holding the lock
    config = (path / ".hydra" / "config.yaml").read_bytes()
    second = train(work, "locked", f"trainer.max_iters={ITERS}", "trainer.resume=auto", "trainer.eval_iters=3",
                   check=False)
    assert_one_line_error(second, f"is in use by pid {first.pid} on ")
    assert (path / ".hydra" / "config.yaml").read_bytes() == config  # the refused run wrote nothing
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (path / ".lock").read_text().startswith(f"pid {first.pid} ")  # a stale lock file...
    train(work, "locked", f"trainer.max_iters={ITERS}", "trainer.resume=auto")  # ...is taken over
    assert losses(path) == reference


# ------------------------------------------------------------------------------------------------- bad input
def bad_input_cases(work: Path, base: Path) -> dict[str, tuple[list[str], str, Path | None]]:
    """name -> (command, the error's words, a run dir that must stay unchanged)."""
    (work / "empty.txt").write_text("")
    (work / "accents.txt").write_text("Größe, façade, naïve café. " * 200)
    (work / "latin1.txt").write_bytes("Größe".encode("latin-1"))
    truncated = copy_run(work, base, "truncated")
    model_file = truncated / "checkpoints" / "last" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    flipped = copy_run(work, base, "flipped")
    flip_a_data_byte(flipped / "checkpoints" / "last" / "model.safetensors")
    bad_digest = copy_run(work, base, "bad_digest")
    digest_state = bad_digest / "checkpoints" / "last" / "state.json"
    state = json.loads(digest_state.read_text())
    digest_state.write_text(json.dumps({**state, "files": {**state["files"], "model.safetensors": "0" * 64}}))
    damaged = copy_run(work, base, "damaged")
    state_file = damaged / "checkpoints" / "iter_0000020" / "state.json"
    state_file.write_text(json.dumps({k: v for k, v in json.loads(state_file.read_text()).items() if k != "model_config"}))
    (work / "not_a_checkpoint").mkdir()
    (work / "not_a_checkpoint" / "notes.txt").write_text("hello")
    (work / "foreign").mkdir()
    (work / "foreign" / "state.json").write_text('{"iter": 3}')
    other_size = copy_run(work, base, "other_size")
    vocab = json.loads((base / "checkpoints/last/state.json").read_text())["model_config"]["vocab_size"]  # by Python version
    other_optimizer = copy_run(work, base, "other_optimizer")
    failed_retry = copy_run(work, base, "failed_retry")
    forked = copy_run(work, base, "forked")
    evaluated, evaluated2 = copy_run(work, base, "evaluated"), copy_run(work, base, "evaluated2")
    oversized = copy_run(work, base, "oversized")
    sample = [sys.executable, str(ROOT / "sample.py"), "max_new_tokens=5"]
    export_hf(GPT(GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=2, n_embd=32)), work / "bpe_export")

    def run(name: str, *extra: str) -> list[str]:
        return train_command(work, name, *extra)

    sweep = run("b22", f"paths.log_dir={work}/empty.txt")  # -m goes before the overrides

    return {
        "missing data file": (run("b1", "data=text", "data.path=missing.txt"), "matches no file", None),
        "empty data file": (run("b2", "data=text", f"data.path={work}/empty.txt"), "empty", None),
        "characters outside the char vocab": (
            run("b3", "data=text", f"data.path={work}/accents.txt", f"init_from={base}"),
            "characters outside the fixed", base),
        "block_size above the model's": (run("b4", "trainer.block_size=64"), "trainer.block_size", None),
        "n_embd not divisible by n_head": (run("b5", "model.n_head=3"), "model.n_embd", None),
        "eval_iters 0": (run("b6", "trainer.eval_iters=0"), "trainer.eval_iters", None),
        "bad callback option": (run("b7", "callbacks.checkpoint.keep=-1"), "callbacks.checkpoint", None),
        "resume: missing": (run("b8", "trainer.resume=nowhere"), "does not exist", None),
        "resume: truncated": (run("truncated", "trainer.resume=auto"), "corrupt or truncated", truncated),
        "resume: a changed byte in the weights": (
            run("flipped", "trainer.resume=auto"),
            f"checkpoint file {flipped}/checkpoints/iter_0000020/model.safetensors is corrupt: its contents differ "
            f"from what was saved (its SHA-256 is not the one in state.json); use another checkpoint, e.g. "
            f"{flipped}/checkpoints/iter_0000010", flipped),
        "resume: a damaged digest in state.json": (run("bad_digest", "trainer.resume=auto"),
                                                   "has a damaged state.json (its files entry", bad_digest),
        "resume: other model size": (run("other_size", "trainer.resume=auto", "model.n_embd=64"),
                                     "for a different model (n_layer=2/n_head=2/n_embd=32/block_size=32/vocab_size="
                                     f"{vocab}, trained with model=nano) than this config (n_layer=2/n_head=2/n_embd=64/"
                                     "block_size=32/vocab_size=None); use the checkpoint's model settings "
                                     "(model.n_embd=32) or start a new run", other_size),
        "resume: other optimizer": (  # SGD would take AdamW's second moments ("v") for its momentum
            run("other_optimizer", "trainer.resume=auto", "optimizer=sgd", "optimizer.weight_decay=0.1"),
            "(optimizer=adamw with weight_decay=0.1) does not fit this run's optimizer=sgd", other_optimizer),
        "resume: not a checkpoint": (run("b9", f"trainer.resume={work}/foreign"),
                                     "is not an mlxgpt checkpoint", None),
        "init_from: missing": (run("b10", "init_from=nowhere"), "does not exist", None),
        "init_from: truncated": (run("b11", f"init_from={truncated}/checkpoints/last"),
                                 "corrupt or truncated", truncated),
        "init_from: other model size": (run("b12", f"init_from={base}", "model.n_embd=64"),
                                        "is for a different model", base),
        "init_from: not a checkpoint": (run("b13", f"init_from={work}/not_a_checkpoint"),
                                        "no checkpoint found", None),
        "init_from: a GPT-2 (BPE) directory with char data": (run("b14", f"init_from={work}/bpe_export"),
                                                               "trained with the gpt2 tokenizer, this data uses char",
                                                               None),
        "resume: a failed attempt keeps the run's records": (
            run("failed_retry", "trainer.resume=auto", "data=text", "data.path=missing.txt"), "matches no file",
            failed_retry),
        "resume: another run's checkpoint into a used run": (
            run("forked", f"trainer.resume={base}/checkpoints/iter_0000010"), "another run's checkpoint", forked),
        "resume: a batch that cannot fit in memory": (
            run("oversized", "trainer.resume=auto", "trainer.batch_size=100000000"),
            "the batch does not fit in memory: a micro-batch of 100000000 x 32 tokens needs at least", oversized),
        "eval_only: no weights to evaluate": (run("evaluated", "trainer.eval_only=true"), "evaluates saved weights",
                                              evaluated),
        "eval_only: into a used run": (run("evaluated2", "trainer.eval_only=true", f"init_from={base}"),
                                       "already has checkpoints", evaluated2),
        "callback option: evaluation interval 0": (run("b15", "callbacks.evaluation.interval=0"),
                                                   "callbacks.evaluation: interval=0", None),
        "callback option: patience not a number": (
            run("b16", "callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=abc"),
            "callbacks.early_stopping: patience='abc'", None),
        "callback option: sample prompt outside the vocabulary": (run("b17", "callbacks.sample.prompt=\u03b6"),
                                                                  "callbacks.sample.prompt", None),
        "callback option: checked before the data is read": (
            run("b18", "callbacks.sample.temperature=-1", "data=text", f"data.path={work}/accents.txt"),
            "callbacks.sample: temperature=-1", None),
        "callback option: early stopping without evaluations": (
            run("b19", "callbacks=[sample,early_stopping]"), "use callbacks=[default,early_stopping]", None),
        "callback option: a class that does not exist": (
            run("b20", "+callbacks.mine._target_=mlxgpt.callbacks.Mine"), "callbacks.mine: Error loading 'mlxgpt.callbacks.Mine'", None),
        "sample: no checkpoint given": (sample, "checkpoint= is required", None),
        "sample: which": ([*sample, f"checkpoint={base}", "which=worst"], "which=worst", None),
        "sample: missing checkpoint": ([*sample, "checkpoint=nowhere"], "does not exist", None),
        "sample: truncated checkpoint": ([*sample, f"checkpoint={truncated}", "which=last"], "corrupt or truncated",
                                         truncated),
        "sample: a changed byte in the weights": (
            [*sample, f"checkpoint={flipped}", "which=last"],
            f"{flipped}/checkpoints/iter_0000020/model.safetensors is corrupt: its contents differ from what was "
            f"saved", flipped),
        "sample: not a checkpoint": ([*sample, f"checkpoint={work}/foreign"], "is not an mlxgpt checkpoint", None),
        "sample: damaged state.json": (  # the older checkpoint of the run is the way out
            [*sample, f"checkpoint={damaged}", "which=last"],
            f"has a damaged state.json (no model_config); use another checkpoint, e.g. {damaged}/checkpoints/iter_0000010",
            damaged),
        "sample: missing prompt file": ([*sample, f"checkpoint={base}", "prompt=FILE:nowhere.txt"],
                                        "prompt file nowhere.txt does not exist; give an existing file", None),
        "sample: negative seed": ([*sample, f"checkpoint={base}", "seed=-1"], "invalid seed=-1: must be >= 0", None),
        "sample: seed past 64 bits": ([*sample, f"checkpoint={base}", "seed=18446744073709551616"],
                                      "invalid seed=18446744073709551616", None),
        "sample: prompt file not UTF-8": ([*sample, f"checkpoint={base}", f"prompt=FILE:{work}/latin1.txt"],
                                          "latin1.txt is not UTF-8 text (invalid start byte at byte 2); "
                                          "convert it to UTF-8 or give another prompt=FILE:<path>", None),
        "log dir: a file": (run("b21", f"paths.log_dir={work}/empty.txt"),  # MLXGPT_LOG_DIR=<file> as well
                            "cannot create the run directory", None),
        "log dir: a file, in a sweep": ([*sweep[:2], "-m", *sweep[2:]], "cannot create the sweep directory", None),
        "export: out= below a file": (
            [sys.executable, str(ROOT / "export.py"), f"checkpoint={base}", f"out={work}/empty.txt/hf"],
            "cannot create the out= directory", None),
    }


@pytest.fixture(scope="module")
def bad_input_results(work, base):
    """Every bad-input command, two at a time (one per core): name -> (process, unchanged?)."""
    cases = bad_input_cases(work, base)
    before = {name: snapshot(guarded) for name, (_, _, guarded) in cases.items() if guarded}
    results, names = {}, list(cases)
    for pair in (names[i:i + 2] for i in range(0, len(names), 2)):
        running = {name: subprocess.Popen(cases[name][0], cwd=work, env=env(work), text=True, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE) for name in pair}
        for name, proc in running.items():
            out, err = proc.communicate(timeout=300)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    unchanged = {name: snapshot(cases[name][2]) == before[name] for name in before}
    return cases, results, unchanged


BAD_INPUTS = ["missing data file", "empty data file", "characters outside the char vocab",
              "block_size above the model's", "n_embd not divisible by n_head", "eval_iters 0", "bad callback option",
              "resume: missing", "resume: truncated", "resume: a changed byte in the weights",
              "resume: a damaged digest in state.json", "resume: other model size", "resume: other optimizer",
              "resume: not a checkpoint",
              "init_from: missing", "init_from: truncated", "init_from: other model size",
              "init_from: not a checkpoint", "init_from: a GPT-2 (BPE) directory with char data",
              "resume: a failed attempt keeps the run's records", "resume: another run's checkpoint into a used run",
              "resume: a batch that cannot fit in memory",
              "eval_only: no weights to evaluate", "eval_only: into a used run",
              "callback option: evaluation interval 0", "callback option: patience not a number",
              "callback option: sample prompt outside the vocabulary", "callback option: checked before the data is read",
              "callback option: early stopping without evaluations", "callback option: a class that does not exist",
              "sample: no checkpoint given", "sample: which",
              "sample: missing checkpoint", "sample: truncated checkpoint", "sample: a changed byte in the weights",
              "sample: not a checkpoint",
              "sample: damaged state.json",
              "sample: negative seed", "sample: seed past 64 bits",
              "sample: missing prompt file", "log dir: a file", "log dir: a file, in a sweep",
              "export: out= below a file", "sample: prompt file not UTF-8"]


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(bad_input_results, name):
    cases, results, unchanged = bad_input_results
    assert set(BAD_INPUTS) == set(cases)
    assert_one_line_error(results[name], cases[name][1])
    assert unchanged.get(name, True)


@pytest.mark.slow
def test_a_missing_data_file_or_init_from_is_refused_before_the_run_directory_is_made(bad_input_results, work):
    for name, run_name in [("missing data file", "b1"), ("init_from: missing", "b10"), ("init_from: truncated", "b11"),
                           ("init_from: not a checkpoint", "b13")]:
        assert bad_input_results[1][name].returncode == 2 and not run_dir(work, run_name).exists(), name


def test_a_bug_in_the_preflight_check_ends_the_process_instead_of_running_the_job_unchecked(monkeypatch, capsys):
    """Hydra turns a callback's exception into a warning and goes on: the run would start unlocked and unchecked."""
    monkeypatch.setattr(rundir, "validate", lambda cfg: 1 / 0)
    with pytest.raises(SystemExit) as exit_:
        rundir.PreflightCheck().on_run_start(config=OmegaConf.create())
    assert exit_.value.code == 1 and "ZeroDivisionError" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(mx.is_available(mx.gpu), reason="needs a machine without a GPU")
def test_sample_on_a_gpu_without_one_names_its_own_option(work, base):
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"checkpoint={base}", "device=gpu"],
                          capture_output=True, text=True, cwd=work, env=env(work), timeout=300)
    assert_one_line_error(proc, "error: device=gpu but no GPU is available")
    assert "use device=auto or cpu" in proc.stderr and "trainer." not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(mx.is_available(mx.gpu), reason="needs a machine without a GPU")
def test_training_on_a_gpu_without_one_is_refused_before_any_work(work):
    proc = train(work, "gpu", "trainer.device=gpu", check=False)
    assert_one_line_error(proc, "error: trainer.device=gpu but no GPU is available")
    assert "use trainer.device=auto or cpu" in proc.stderr and not (run_dir(work, "gpu") / "checkpoints").exists()


@pytest.mark.slow
def test_resume_from_another_runs_checkpoint_continues_it_in_a_new_run(work, base, reference):
    """trainer.resume=<checkpoint dir>: the new run goes on from there as the original would have; the original's
    directory is only read."""
    before = snapshot(base)
    train(work, "fork", f"trainer.max_iters={ITERS}", f"trainer.resume={base}/checkpoints/iter_0000010")
    assert losses(run_dir(work, "fork")) == [r for r in reference if r[1] > 10]
    assert checkpoint.read_state(checkpoint.latest(run_dir(work, "fork") / "checkpoints"))["iter"] == ITERS
    assert snapshot(base) == before


@pytest.mark.slow
def test_continuing_a_finished_run_does_nothing_and_writes_nothing(work, base):
    finished = copy_run(work, base, "finished")
    before, log = snapshot(finished), (finished / "train.log").read_text()
    proc = train(work, "finished", "trainer.resume=auto", "trainer.max_iters=20")
    assert "already trained 20 iterations (trainer.max_iters=20): nothing to do" in proc.stdout
    assert snapshot(finished) == before
    after = (finished / "train.log").read_text()  # the attempt is appended to the run's log, which keeps its past
    assert after.startswith(log) and "nothing to do" in after[len(log):]


@pytest.mark.slow
def test_early_stopping_counts_on_across_a_resume_and_a_run_it_stopped_is_finished(work):
    stopping = ["callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=3",
                "callbacks.early_stopping.min_delta=100"]  # no evaluation after the first improves: it stops at 30
    train(work, "stopped_early", *stopping, f"trainer.max_iters={ITERS}")
    train(work, "stopped_early_resumed", *stopping, "trainer.max_iters=20")  # two evaluations without improvement
    train(work, "stopped_early_resumed", *stopping, f"trainer.max_iters={ITERS}", "trainer.resume=auto")
    stopped = losses(run_dir(work, "stopped_early"))
    assert stopped[-1][1] == 30 and losses(run_dir(work, "stopped_early_resumed")) == stopped
    before = snapshot(run_dir(work, "stopped_early"))
    proc = train(work, "stopped_early", *stopping, f"trainer.max_iters={ITERS}", "trainer.resume=auto")
    assert "stopped early at iteration 30 (callbacks.early_stopping.patience=3): nothing to do" in proc.stdout
    assert snapshot(run_dir(work, "stopped_early")) == before


@pytest.mark.slow
def test_init_from_a_run_without_a_best_checkpoint_uses_its_last(work, base):
    stopped = copy_run(work, base, "no_best")
    (stopped / "checkpoints" / "best").unlink()  # as a run stopped before its first evaluation
    proc = train(work, "from_no_best", f"init_from={stopped}", "trainer.eval_only=true")
    assert f"initialised from {stopped / 'checkpoints'}" in proc.stdout


# -------------------------------------------------------------------------------------------------- security
def test_no_pickle_in_the_source():
    """Checkpoints, data meta and caches are safetensors, JSON and raw arrays: nothing that executes code on load."""
    forbidden = re.compile(r"\bpickle\b|\bdill\b|torch\.load|allow_pickle\s*=\s*True|\bmarshal\b|yaml\.load\(|"
                           r"yaml\.unsafe_load|\bshelve\b|joblib")
    offenders = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
                 for p in [*(ROOT / "src").rglob("*.py"), *ROOT.glob("*.py")]
                 for i, line in enumerate(p.read_text().splitlines(), 1) if forbidden.search(line)]
    assert offenders == []


def test_loading_a_pickle_disguised_as_a_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"format": checkpoint.FORMAT, **dict.fromkeys(checkpoint.STATE_KEYS)}))
    for name in checkpoint.ARRAY_FILES:
        (ckpt / name).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match="corrupt or truncated"):
        checkpoint.verify(ckpt)
    with pytest.raises(UserError, match="corrupt or truncated"):
        checkpoint.load_arrays(ckpt, "model.safetensors", checkpoint.read_state(ckpt))
    assert not marker.exists()


def test_url_datasets_pin_a_checksum_and_a_file_that_does_not_match_is_refused(tmp_path):
    url_configs = [p for p in (ROOT / "conf" / "data").glob("*.yaml") if OmegaConf.load(p).get("source") == "url"]
    assert url_configs and all(OmegaConf.load(p).get("sha256") for p in url_configs)
    (tmp_path / "input.txt").write_text("not the file the checksum names\n")
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["data=shakespeare_char", f"data.path={tmp_path}/input.txt"])
    with pytest.raises(UserError, match="sha256"):
        read_text(cfg.data)
