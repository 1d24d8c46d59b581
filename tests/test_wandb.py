"""W&B logging: offline run files read back record by record (config, group, history, summary), resume, failures."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from mlxgpt.callbacks.wandb import RUN_ID_KEY, flat_config, job_name_and_group, resolve_mode
from mlxgpt.wandb_file import BLOCK_SIZE, read_records
from wandb_file import find_run_files, read_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=nano", "model.n_embd=32", "model.block_size=32", "trainer.batch_size=4", "trainer.max_iters=10",
        "trainer.eval_interval=5", "trainer.eval_iters=2", "trainer.log_interval=5",
        "callbacks.sample.max_new_tokens=8"]
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # never sent anywhere: every run here is offline


def wandb_env(tmp: Path, **extra) -> dict:
    """W&B offline with all its directories under tmp; a fake API key that must never show up in outputs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wb"), "WANDB_CACHE_DIR": str(tmp / "wb_cache"),
            "WANDB_CONFIG_DIR": str(tmp / "wb_config"), "WANDB_DATA_DIR": str(tmp / "wb_data"),
            "WANDB_API_KEY": FAKE_KEY, "MLXGPT_DATA_DIR": str(tmp / "data"), **extra}


def train(tmp: Path, *args: str, env=None, returncode: int = 0) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), *TINY, f"paths.log_dir={tmp}/logs", *args]  # `-m` too
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp, env=env or wandb_env(tmp), timeout=300)
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(run_dir: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One 2x2 multirun (lr x depth) with W&B offline: (sweep dir, process)."""
    tmp = tmp_path_factory.mktemp("wandb_grid")
    proc = train(tmp, "-m", "optimizer.lr=1e-3,3e-3", "model.n_layer=1,2", "logger.mode=offline",
                 "logger.log_checkpoints=true", "logger.tags=[tiny,grid]", "hydra.sweep.dir=logs/grid")
    return tmp / "logs" / "grid", proc


@pytest.mark.slow
def test_each_job_of_a_grid_is_its_own_wandb_run_in_one_group(grid):
    sweep_dir, _ = grid
    run_dirs = sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())
    assert len(run_dirs) == 4
    runs = {}
    for run_dir in run_dirs:
        files = find_run_files(run_dir / "wandb")
        assert len(files) == 1, files
        runs[run_dir] = read_run(files[0])
    assert len({r.run_id for r in runs.values()}) == 4
    assert {r.group for r in runs.values()} == {"grid"}  # the sweep dir's name
    assert {(r.project, r.job_type, tuple(r.tags)) for r in runs.values()} == {("mlxgpt", "train", ("tiny", "grid"))}
    swept = {(r.config["optimizer.lr"], r.config["model.n_layer"]) for r in runs.values()}
    assert swept == {(1e-3, 1), (1e-3, 2), (3e-3, 1), (3e-3, 2)}
    for run_dir, run in runs.items():
        overrides = OmegaConf.load(run_dir / ".hydra/overrides.yaml")
        assert f"optimizer.lr={run.config['optimizer.lr']}" in overrides
        assert run.name == f"lr={run.config['optimizer.lr']},n_layer={run.config['model.n_layer']}"
        assert run.config["model.n_embd"] == 32 and run.config["trainer.max_iters"] == 10  # the whole resolved config
        assert run.config["run_name"] == f"grid/{run_dir.name}"  # the job's directory, not a timestamp
        evals, logs = metrics(run_dir, "eval"), metrics(run_dir, "train")
        assert run.values("val/loss") == [e["val/loss"] for e in evals]  # iterations 0, 5, 10
        assert run.values("train/loss") == [r["train/loss"] for r in logs]
        # every log interval with all of its metrics (W&B gets no None: mfu on a device of unknown peak FLOP/s)
        assert all({"lr", "grad_norm", "tok_per_s", "mfu", "memory_gb", "tokens"} <= set(r) for r in logs)
        expected = [{k: v for k, v in r.items() if k != "event" and v is not None} for r in logs]
        logged = [row for row in run.history if "train/loss" in row]
        assert [{k: row.get(k) for k in e} for row, e in zip(logged, expected)] == expected
        assert run.values("train/eval_loss") == [e["train/loss"] for e in evals]
        assert [row["iter"] for row in run.history if "val/loss" in row] == [0, 5, 10]
        best = min(e["val/loss"] for e in evals)
        assert run.summary["best/val_loss"] == best
        assert run.summary["val/loss"]["min"] == best
        assert json.loads((run_dir / "result.json").read_text())["best/val_loss"] == best
        assert run.metrics["*"].step_metric == "iter" and run.metrics["val/loss"].summary.min
        assert run.exit_code == 0
        state = json.loads((run_dir / "checkpoints/last/state.json").read_text())
        assert state["extra"][RUN_ID_KEY] == run.run_id  # what resume continues
        assert {a.type for a in run.artifacts} == {"model", "run_table"}  # checkpoints and the samples table
        assert any("best" in a.aliases for a in run.artifacts if a.type == "model")


@pytest.mark.slow
def test_an_optuna_searchs_values_are_read_to_4_digits_in_run_names_and_the_summary_but_kept_whole_in_its_csv(
        tmp_path):
    proc = train(tmp_path, "-m", "hparams_search=lr_depth_optuna", "hydra.sweeper.n_trials=2", "trainer.max_iters=2",
                 "logger.mode=offline", "hydra.sweep.dir=logs/search")
    sweep_dir = tmp_path / "logs" / "search"
    rows = {r["run"]: r for r in csv.DictReader(open(sweep_dir / "summary.csv"))}  # best first
    summary = (sweep_dir / "summary.md").read_text()
    best = next(line for line in proc.stdout.splitlines() if line.startswith("mlxgpt: best job"))
    for job in ("0", "1"):
        run = read_run(find_run_files(sweep_dir / job / "wandb")[0])
        lr, layers = run.config["optimizer.lr"], run.config["model.n_layer"]  # Optuna's draw, e.g. 0.0002438047803638
        short = f"{lr:.4g}"
        assert len(repr(lr)) > len(short) + 4 and float(rows[job]["optimizer.lr"]) == lr  # the CSV: every digit
        assert run.name == f"lr={short},n_layer={layers}"
        assert f"| {job} | optimizer.lr={short}" in summary and repr(lr) not in summary
        assert (f"best job {job}: optimizer.lr={short}" in best) == (rows[job]["is_best"] == "True")


@pytest.mark.slow
def test_the_api_key_never_appears_in_outputs(grid):
    sweep_dir, proc = grid
    assert FAKE_KEY not in proc.stdout + proc.stderr
    for path in sweep_dir.parents[1].rglob("*"):  # the run dirs, and W&B's own cache, config and data dirs
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_resume_continues_the_same_wandb_run(tmp_path):
    train(tmp_path, "run_name=r", "logger.mode=offline", "trainer.max_iters=5")
    train(tmp_path, "run_name=r", "logger.mode=offline", "trainer.max_iters=10", "trainer.resume=auto")
    files = find_run_files(tmp_path / "logs/runs/r/wandb")
    first, second = map(read_run, files)
    assert first.run_id == second.run_id and first.name == "r"  # named by its run_name
    assert first.values("iter")[-1] == 5 and second.values("val/loss") and min(second.values("iter")) >= 5
    table = json.loads((files[1].parent / "files" / second.values("samples.path")[-1]).read_text())
    assert [row[0] for row in table["data"]] == [5, 10]  # the samples table keeps the first attempt's sample


EVERY_STEP = ["logger.mode=offline", "trainer.log_interval=1", "callbacks.sample.every_evals=1",
              "schedule.warmup_iters=2"]  # then the lr decays over trainer.max_iters
TESTS_ON_PATH = {"PYTHONPATH": str(ROOT / "tests")}  # for +callbacks.<name>._target_=wandb_callbacks.<class>
FLUSH_OFTEN = {"WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0.05"}  # W&B writes its run file every 50 ms (default 15 s)


def crash_at_7(tmp: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    """Run `r` fails at iteration 7, after its checkpoint at 5 and its W&B rows of 6 and 7."""
    return train(tmp, "run_name=r", *EVERY_STEP, "+callbacks.crash._target_=wandb_callbacks.Crash",
                 "+callbacks.crash.at_iter=7", *args, env=env or wandb_env(tmp, **TESTS_ON_PATH), returncode=1)


def sample_table(run_file: Path, run) -> list:
    return json.loads((run_file.parent / "files" / run.values("samples.path")[-1]).read_text())["data"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The W&B run file of run `full`, 10 iterations with EVERY_STEP, never stopped: (its path, its OfflineRun)."""
    tmp = tmp_path_factory.mktemp("wandb_full")
    train(tmp, "run_name=full", *EVERY_STEP)
    (path,) = find_run_files(tmp / "logs/runs/full/wandb")
    return path, read_run(path)


def test_the_samples_table_holds_each_sample_of_the_run_once(uninterrupted):
    """The end's sample, drawn by the last evaluation already, is neither drawn nor recorded again."""
    path, run = uninterrupted
    records = [json.loads(line) for line in (path.parents[2] / "samples.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 5, 10]  # every evaluation's; the one at 10 is the end's
    assert sample_table(path, run) == [[r["iter"], r["prompt"], r["text"]] for r in records]


def assert_history_of_an_uninterrupted_run(files: list[Path], uninterrupted) -> None:
    """The attempts' W&B files (in order) hold each iteration of the uninterrupted run once, with its values."""
    full_file, full = uninterrupted
    attempts = [read_run(path) for path in files]
    assert len({run.run_id for run in attempts}) == 1  # one W&B run
    for key in ("train/loss", "val/loss", "samples.path"):
        rows = [(row["iter"], row[key]) for run in attempts for row in run.history if key in row]
        expected = [(row["iter"], row[key]) for row in full.history if key in row]
        assert [i for i, _ in rows] == [i for i, _ in expected], key  # each iteration once
        if key != "samples.path":
            np.testing.assert_allclose([v for _, v in rows], [v for _, v in expected], rtol=1e-6)
    assert sample_table(files[-1], attempts[-1]) == sample_table(full_file, full)  # every evaluation's samples, once
    assert attempts[-1].summary["best/val_loss"] == full.summary["best/val_loss"] and attempts[-1].exit_code == 0


@pytest.mark.slow
def test_a_run_resumed_after_a_crash_logs_each_iteration_to_wandb_once(tmp_path, uninterrupted):
    """The resumed run (from 5) logs 8 on, and the two W&B files hold the history of an uninterrupted run."""
    crash_at_7(tmp_path)
    train(tmp_path, "run_name=r", *EVERY_STEP, "trainer.resume=auto")
    files = find_run_files(tmp_path / "logs/runs/r/wandb")
    crashed, resumed = map(read_run, files)
    assert max(crashed.values("iter")) == 7 and crashed.exit_code == 1 and min(resumed.values("iter")) == 8
    assert "injected crash" in crashed.summary["error"]
    assert resumed.summary_removed == ["error"]  # W&B merges the summaries
    assert_history_of_an_uninterrupted_run(files, uninterrupted)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_logs_each_iteration_to_wandb_once(tmp_path, uninterrupted):
    """Killed at 8 (after its checkpoint at 5) once W&B wrote its rows up to 8: the resumed run logs 9 on."""
    env = wandb_env(tmp_path, **TESTS_ON_PATH, **FLUSH_OFTEN)
    train(tmp_path, "run_name=r", *EVERY_STEP, "+callbacks.kill._target_=wandb_callbacks.KillSelf",
          "+callbacks.kill.at_iter=8", "+callbacks.kill.wait_s=1", env=env, returncode=-9)
    train(tmp_path, "run_name=r", *EVERY_STEP, "trainer.resume=auto")
    files = find_run_files(tmp_path / "logs/runs/r/wandb")
    assert [max(read_run(path).values("iter")) for path in files] == [8, 10]
    assert_history_of_an_uninterrupted_run(files, uninterrupted)


@pytest.mark.slow
def test_a_run_whose_wandb_died_logs_each_iteration_to_wandb_once_when_resumed(tmp_path, uninterrupted):
    """W&B's service is killed at 6 (once it wrote the rows up to 6): training goes on without W&B and fails at 7;
    the resumed run (from 5) logs 7 on, W&B working again, and completes."""
    env = wandb_env(tmp_path, **TESTS_ON_PATH, **FLUSH_OFTEN)
    proc = crash_at_7(tmp_path, "+callbacks.kill._target_=wandb_callbacks.KillWandbService",
                      "+callbacks.kill.at_iter=6", "+callbacks.kill.wait_s=1", env=env)
    assert proc.stderr.count("W&B logging stopped") == 1
    proc = train(tmp_path, "run_name=r", *EVERY_STEP, "trainer.resume=auto")
    assert "W&B logging stopped" not in proc.stderr
    assert json.loads((tmp_path / "logs/runs/r/result.json").read_text())["status"] == "ok"
    files = find_run_files(tmp_path / "logs/runs/r/wandb")
    assert [max(read_run(path).values("iter")) for path in files] == [6, 10]
    assert_history_of_an_uninterrupted_run(files, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("other", ["optimizer.lr=1e-3", "trainer.max_iters=12"])
def test_a_run_resumed_after_a_crash_with_other_settings_logs_its_own_rows_again(tmp_path, other):
    """With another lr, or a longer run (its lr decays later), the iterations after the checkpoint have other losses:
    W&B gets those too."""
    crash_at_7(tmp_path)
    train(tmp_path, "run_name=r", *EVERY_STEP, "trainer.resume=auto", other)
    crashed, resumed = map(read_run, find_run_files(tmp_path / "logs/runs/r/wandb"))
    assert [row["iter"] for row in resumed.history if "train/loss" in row][:5] == [6, 7, 8, 9, 10]
    assert resumed.values("train/loss")[:2] != crashed.values("train/loss")[-2:]


@pytest.mark.slow
def test_the_config_groups_chosen_are_in_the_wandb_config(tmp_path):
    train(tmp_path, "run_name=r", "experiment=shakespeare_char_cpu", "data=pydoc", "trainer.cpu_streams=1")
    (path,) = find_run_files(tmp_path / "logs/runs/r/wandb")
    config = read_run(path).config
    assert config["experiment"] == "shakespeare_char_cpu" and config["model"] == "nano" and config["data"] == "pydoc"
    assert config["schedule"] == "cosine" and not any(key.startswith("hydra") for key in config)


@pytest.mark.slow
def test_credentials_in_the_config_reach_no_log_no_checkpoint_and_no_wandb_file(tmp_path):
    secrets = {"secret_key": "s3cret-a", "hf_token": "s3cret-b", "apiKey": "s3cret-c", "db_password": "s3cret-d"}
    env = wandb_env(tmp_path, **TESTS_ON_PATH,
                    **{f"MY_{k.upper()}": v for k, v in secrets.items()})  # read from the environment, as one would
    options = [f"+callbacks.mine.{k}=${{oc.env:MY_{k.upper()}}}" for k in secrets]
    proc = train(tmp_path, "run_name=r", "logger.log_checkpoints=true", "+callbacks.mine._target_=wandb_callbacks.Options",
                 *options, env=env)
    (path,) = find_run_files(tmp_path / "logs/runs/r/wandb")
    config = read_run(path).config
    assert {k: config[f"callbacks.mine.{k}"] for k in secrets} == dict.fromkeys(secrets, "***")
    assert config["data.tokenizer"] == "char" and config["callbacks.sample.max_new_tokens"] == 8  # not credentials
    for path in [p for p in tmp_path.rglob("*") if p.is_file()]:  # train.log, state.json, W&B files and artifacts
        assert not any(v.encode() in path.read_bytes() for v in secrets.values()), path
    assert not any(v in proc.stdout + proc.stderr for v in secrets.values())


@pytest.mark.slow
def test_a_run_resumed_from_another_runs_checkpoint_is_a_wandb_run_of_its_own(tmp_path):
    train(tmp_path, "run_name=r", "logger.mode=offline", "trainer.max_iters=5")
    train(tmp_path, "run_name=fork", "logger.mode=offline", "trainer.max_iters=10",
          f"trainer.resume={tmp_path}/logs/runs/r")
    original, fork = (read_run(*find_run_files(tmp_path / f"logs/runs/{name}/wandb")) for name in ("r", "fork"))
    assert fork.run_id != original.run_id and fork.name == "fork" and min(fork.values("iter")) >= 5


@pytest.mark.slow
def test_wandb_failure_warns_once_and_training_goes_on(tmp_path):
    proc = train(tmp_path, "run_name=r", env=wandb_env(tmp_path, WANDB_MODE="no-such-mode"))  # logger.mode=auto
    assert proc.stderr.count("W&B logging stopped") == 1
    run_dir = tmp_path / "logs/runs/r"
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"
    assert [e["iter"] for e in metrics(run_dir, "eval")] == [0, 5, 10]


@pytest.mark.slow
def test_a_wandb_error_of_several_lines_is_a_one_line_warning(tmp_path):
    proc = train(tmp_path, "run_name=r", f"logger.tags=[{'x' * 70}]")  # W&B refuses tags over 64 characters
    (warning,) = [line for line in proc.stderr.splitlines() if "W&B logging stopped" in line]
    assert "ValidationError" in warning and warning.endswith("training continues, metrics.jsonl is still written")


@pytest.mark.slow
def test_a_crash_of_wandb_warns_in_one_line_and_leaves_no_traceback(tmp_path):
    env = wandb_env(tmp_path, **TESTS_ON_PATH)  # kills wandb-core at iteration 5
    proc = train(tmp_path, "run_name=r", "+callbacks.crash._target_=wandb_callbacks.KillWandbService",
                 "+callbacks.crash.at_iter=5", env=env)
    warnings = [line for line in proc.stderr.splitlines() if "W&B" in line and "wandb:" not in line]
    assert len(warnings) == 1 and warnings[0].startswith("mlxgpt: warning: W&B logging stopped (")
    assert warnings[0].endswith("training continues, metrics.jsonl is still written")  # whole, on one line
    assert "Traceback" not in proc.stderr  # none from wandb's exit hook
    run_dir = tmp_path / "logs/runs/r"
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"
    assert [e["iter"] for e in metrics(run_dir, "eval")] == [0, 5, 10]


@pytest.mark.slow
def test_an_unreachable_wandb_server_logs_offline_and_a_sweeps_later_jobs_do_not_wait_for_it(tmp_path):
    env = wandb_env(tmp_path, WANDB_BASE_URL="http://127.0.0.1:9", WANDB_INIT_TIMEOUT="3")  # no server there
    del env["WANDB_MODE"]  # logger.mode=online, with the test's fake API key
    proc = train(tmp_path, "-m", "trainer.seed=1,2", "logger.mode=online", "hydra.sweep.dir=logs/sweep", env=env)
    warnings = [line for line in proc.stderr.splitlines() if "mlxgpt: warning: W&B" in line]
    assert ["W&B is unreachable (" in w for w in warnings] == [True, False]  # the second job did not try again
    assert "W&B was unreachable for an earlier job (" in warnings[1]
    assert all(w.endswith("logging offline; upload later with `wandb sync`") for w in warnings)
    for job in ("0", "1"):
        run_dir = tmp_path / "logs/sweep" / job
        (path,) = [p for p in find_run_files(run_dir / "wandb") if p.parent.name.startswith("offline-run-")]
        assert read_run(path).values("val/loss") == [e["val/loss"] for e in metrics(run_dir, "eval")]


@pytest.mark.slow
def test_a_diverged_run_ends_its_wandb_run_with_exit_code_1_and_the_error(tmp_path):
    train(tmp_path, "run_name=r", "optimizer.lr=1e4", "trainer.grad_clip=0", returncode=2)  # diverges: NaN
    (path,) = find_run_files(tmp_path / "logs/runs/r/wandb")
    run = read_run(path)
    assert run.exit_code == 1 and "non-finite" in run.summary["error"]
    assert json.loads((tmp_path / "logs/runs/r/result.json").read_text())["error"] in run.summary["error"]


@pytest.mark.slow
def test_disabled_writes_nothing(tmp_path):
    train(tmp_path, "run_name=r", "logger.mode=disabled")
    assert not (tmp_path / "logs/runs/r/wandb").exists()


def test_reader_reassembles_records_split_across_blocks_and_stops_at_a_torn_one(tmp_path, monkeypatch):
    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    import wandb

    big = "x" * 100_000  # spans four 32 KiB blocks
    run = wandb.init(project="p", mode="offline", dir=str(tmp_path), group="g", name="n", config={"big": big})
    run.log({"iter": 1, "loss": 2.5})
    run.finish()
    wandb.teardown()  # waits for W&B's service process to flush the file (finish() alone may return earlier)
    (path,) = find_run_files(tmp_path)
    records = list(read_records(path))
    assert len(records) > 5
    back = read_run(path)
    assert back.config["big"] == big and (back.group, back.name) == ("g", "n")
    assert back.values("loss") == [2.5] and back.summary["loss"] == 2.5
    torn = tmp_path / "torn.wandb"  # as a kill can leave it: the first two blocks of the big run record written
    torn.write_bytes(path.read_bytes()[:2 * BLOCK_SIZE])
    assert list(read_records(torn)) == records[:1]  # the header record, then the torn one: the end


def test_mode_auto_is_online_only_with_an_api_key(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("online") == "offline"  # never a login prompt
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    (tmp_path / "netrc").chmod(0o600)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    assert resolve_mode("offline") == "offline"


def test_flat_config_uses_override_keys_and_masks_credentials():
    cfg = OmegaConf.create({"optimizer": {"lr": 3e-4, "betas": [0.9, 0.95]}, "model": {"n_layer": 6},
                            "callbacks": {"hub": {"api_key": "s3cret", "max_new_tokens": 5, "secret_key": "s3cret",
                                                  "authToken": "s3cret", "tokenizer": "char", "token": None}},
                            "lr2": "${optimizer.lr}"})
    assert flat_config(cfg) == {"optimizer.lr": 3e-4, "optimizer.betas": [0.9, 0.95], "model.n_layer": 6,
                                "callbacks.hub.api_key": "***", "callbacks.hub.max_new_tokens": 5,
                                "callbacks.hub.secret_key": "***", "callbacks.hub.authToken": "***",
                                "callbacks.hub.tokenizer": "char", "callbacks.hub.token": None, "lr2": 3e-4}


def test_outside_hydra_a_run_is_named_and_grouped_by_its_dir(tmp_path):
    assert job_name_and_group(tmp_path / "my_run") == ("my_run", "my_run")
